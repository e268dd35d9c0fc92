"""A key's counters under ``router.workers``: the controller owns them, every worker asks it, and a
worker's requests end with its link (over the in-memory link pair of test_link_messages)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from router_support import instance
from test_link_messages import Worker, run, settle

from router.config import Config
from router.server.state import RouterState
from router.server.workers.messages import Quota, QuotaDone
from router.server.workers.relayed import ControllerGate
from router.tenants.classes import HIGH, LOW
from router.tenants.quota import Refusal, Standing

KEYS = [{"name": "k", "key": "sk-kkkkkkkk", "rpm": 3, "max_concurrency": 2}, "sk-plain"]


def test_one_keys_limits_hold_across_workers_and_end_with_a_worker(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a, b = Worker(state.workers, 1), Worker(state.workers, 2)
        await settle()
        ga, gb = ControllerGate(a.link), ControllerGate(b.link)
        counters = state.quotas.keys["k"]
        t1, first = await ga.admit("k", 10)
        assert isinstance(first, Standing) and first.remaining_requests == 2
        _, second = await gb.admit("k", 10)
        assert isinstance(second, Standing) and counters.in_flight == 2
        _, third = await ga.admit("k", 10)  # two in flight, one in each worker: the key's max_concurrency
        assert isinstance(third, Refusal) and third.status == 429 and "max_concurrency 2" in third.message
        ga.finish(t1, "k", 10, 7)
        await settle()
        assert counters.in_flight == 1 and counters.reserved == 10
        _, fourth = await gb.admit("k", 10)
        assert isinstance(fourth, Standing) and fourth.remaining_requests == 0
        b.die()  # with two requests in flight: they end with its link, charged their bound
        await settle()
        assert counters.in_flight == 0 and counters.reserved == 0
        _, fifth = await ga.admit("k", 10)  # three requests this minute, whichever worker let them in
        assert isinstance(fifth, Refusal) and "3 requests per minute" in fifth.message and fifth.retry_after >= 59
        assert sum(isinstance(m, Quota) for m in a.end.sent) == 3 and sum(isinstance(m, QuotaDone) for m in a.end.sent) == 1
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1)], scenario, api_keys=KEYS)


def test_the_controllers_lease_queue_serves_higher_classes_first(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a, b = Worker(state.workers, 1), Worker(state.workers, 2)
        await settle()
        held = await a.model().acquire(time.monotonic(), (), 30.0)
        order: list[str] = []

        async def lease(worker: Worker, name: str, klass: int) -> None:
            model = worker.model()
            replica = await model.acquire(time.monotonic(), (), 30.0, klass=klass)
            order.append(name)
            model.release(replica)
        waits = [asyncio.ensure_future(lease(a, "low-a", LOW)), asyncio.ensure_future(lease(b, "low-b", LOW))]
        await settle()
        waits.append(asyncio.ensure_future(lease(b, "high-b", HIGH)))
        await settle()
        assert state.table.get("m").queued == 3  # type: ignore[union-attr]
        a.model().release(held)
        await asyncio.gather(*waits)
        assert order == ["high-b", "low-a", "low-b"]
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1, max_concurrency=1, max_queue=5)], scenario)
