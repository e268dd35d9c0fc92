"""Priority classes: a header may lower a key's class, never raise it; every wait queue serves
higher classes first and is first come first served within a class."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson
from fakes import instance

from router.engines import ENGINES
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.models import Model
from router.server.fleet.replica import Replica
from router.server.proxy.request import Outgoing
from router.tenants.classes import HIGH, LOW, NORMAL, ClassQueue, requested


def test_the_header_may_lower_the_class_never_raise_it() -> None:
    assert requested(NORMAL, None) == NORMAL
    assert requested(NORMAL, b"low") == LOW
    assert requested(NORMAL, b" HIGH ") == NORMAL
    assert requested(LOW, b"high") == LOW
    assert requested(HIGH, b"normal") == NORMAL
    assert requested(HIGH, b"urgent") == HIGH  # a word it does not know changes nothing


def test_the_queue_serves_higher_classes_first_and_fifo_within_one() -> None:
    q: ClassQueue[str] = ClassQueue()
    for item, klass in (("low-1", LOW), ("normal-1", NORMAL), ("low-2", LOW), ("high-1", HIGH), ("normal-2", NORMAL)):
        q.append(item, klass)
    q.remove("normal-2")
    assert len(q) == 4 and q.first() == "high-1"
    assert [q.popleft() for _ in range(4)] == ["high-1", "normal-1", "low-1", "low-2"]
    assert not q


def test_a_freed_slot_goes_to_the_high_request_that_came_last() -> None:
    async def go() -> list[str]:
        replica = Replica(instance("a", max_concurrency=1, max_queue=10), Events())
        replica.health = "healthy"
        model = Model("m", (replica,), lambda name, members: None, ModelMetrics("m"), 1)  # type: ignore[arg-type,return-value]
        first = await model.acquire(0.0, (), 30.0)
        served: list[str] = []

        async def wait(name: str, klass: int) -> None:
            got = await model.acquire(0.0, (), 30.0, klass=klass)
            served.append(name)
            await asyncio.sleep(0)
            model.release(got)
        waiters = [asyncio.ensure_future(wait(f"low-{i}", LOW)) for i in range(3)]
        await asyncio.sleep(0)
        waiters.append(asyncio.ensure_future(wait("high", HIGH)))
        await asyncio.sleep(0)
        assert model.queued == 4
        model.release(first)
        await asyncio.gather(*waiters)
        return served
    assert asyncio.run(go()) == ["high", "low-0", "low-1", "low-2"]


def test_only_vllm_with_the_priority_policy_orders_by_the_field() -> None:
    vllm = ENGINES["vllm"]
    assert vllm.orders_by_priority(("--port", "1", "--scheduling-policy", "priority"))
    assert vllm.orders_by_priority(("--scheduling-policy=priority",))
    assert not vllm.orders_by_priority(("--scheduling-policy", "fcfs"))
    assert not vllm.orders_by_priority(("--scheduling-policy",))
    assert not any(spec.orders_by_priority(("--scheduling-policy", "priority"))
                   for name, spec in ENGINES.items() if name != "vllm")


def test_the_class_is_forwarded_as_vllms_priority_only_where_it_orders_by_it() -> None:
    ranked = Replica(replace(instance("r"), engine_args=("--scheduling-policy", "priority"), served_names=("m",)),
                     Events())
    plain = Replica(replace(instance("p"), served_names=("m",)), Events())
    body = b'{"model": "m", "prompt": "hi"}'

    def out(klass: int, payload: dict[str, object]) -> Outgoing:
        o = Outgoing("m", payload, body if payload == orjson.loads(body) else orjson.dumps(payload), False)
        o.priority = klass
        return o
    assert ranked.ranks and not plain.ranks
    assert orjson.loads(out(HIGH, orjson.loads(body)).data_for(ranked))["priority"] == -10
    assert orjson.loads(out(LOW, orjson.loads(body)).data_for(ranked))["priority"] == 10
    assert out(NORMAL, orjson.loads(body)).data_for(ranked) == body  # normal: vLLM's default, nothing added
    assert out(HIGH, orjson.loads(body)).data_for(plain) == body  # no other engine gets the field
    # a client's own value may lower its rank, never raise it above its class
    assert orjson.loads(out(NORMAL, {"model": "m", "priority": -50}).data_for(ranked))["priority"] == 0
    assert orjson.loads(out(NORMAL, {"model": "m", "priority": 7}).data_for(ranked))["priority"] == 7
