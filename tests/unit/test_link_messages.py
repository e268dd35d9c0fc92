"""The controller/worker link's messages over an in-memory channel pair (no socket, no sleep).

Each message crosses as it does on the wire (pickled, in order). The
controller is a real `RouterState`; each worker a real `WorkerState` over
its own end of a pair.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import pytest
from router_support import config_from, instance

from router.config import Config
from router.server.fleet.models import NoReplica, Overloaded
from router.server.fleet.outcome import ModelUnavailable
from router.server.fleet.replica import Replica
from router.server.state import RouterState
from router.server.workers.controller_end import WorkerLinks
from router.server.workers.messages import KINDS, PROTOCOL, Hello, Lease, Message, Refused, Report, Unlease, decode, encode
from router.server.workers.remote import RemoteAdmission
from router.server.workers.worker import WorkerState
from router.server.workers.worker_end import ControllerLink, LeasedModel

T = TypeVar("T")


class End:
    """One end of an in-memory link: what it sends is encoded as on the wire, and read by the other."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Optional[Message]] = asyncio.Queue()
        self.peer: Optional[End] = None
        self.closed = False
        self.sent: list[Message] = []

    def send(self, message: Message) -> None:
        assert self.peer is not None
        if self.closed or self.peer.closed:
            return
        self.sent.append(message)
        self.peer.inbox.put_nowait(decode(encode(message)))

    async def receive(self) -> Optional[Message]:
        return await self.inbox.get()

    def close(self) -> None:
        """The process at this end is gone: both ends read the end of the stream."""
        if not self.closed:
            self.closed = True
            self.inbox.put_nowait(None)
            assert self.peer is not None
            self.peer.inbox.put_nowait(None)


def pair() -> tuple[End, End]:
    a, b = End(), End()
    a.peer, b.peer = b, a
    return a, b


async def settle() -> None:
    """Let every message in flight be read and answered (each hop is one turn of the loop)."""
    for _ in range(30):
        await asyncio.sleep(0)


class Worker:
    """A proxy worker's state over one end of a pair, connected to `links`."""

    def __init__(self, links: WorkerLinks, pid: int, protocol: int = PROTOCOL):
        controller_end, self.end = pair()
        self.state: Optional[WorkerState] = None
        self.link = ControllerLink(
            self.end, on_table=self.on_table, model=lambda n: self.state.lifecycle(n) if self.state else None,
            replica_changed=lambda m: self.state.replica_changed(m) if self.state else None,
            breaker_changed=lambda m: self.state.breaker_changed(m) if self.state else None,
            owner=lambda m: self.state.owner(m) if self.state else None)
        self.end.send(Hello(protocol, pid))
        self.tasks = [asyncio.ensure_future(links.connect(controller_end)), asyncio.ensure_future(self.link.run())]

    def on_table(self, message: Any) -> None:
        if self.state is None:
            self.state = WorkerState(self.link, message.config)
        self.state.apply_table(message)

    def model(self, name: str = "m") -> LeasedModel:
        assert self.state is not None
        model = self.state.table.get(name)
        assert isinstance(model, LeasedModel)
        return model

    def die(self) -> None:
        self.end.close()


def run(tmp: Path, instances: list[dict[str, Any]], scenario: Callable[[RouterState, Config], Awaitable[T]],
        **router: Any) -> T:
    config = config_from(tmp, instances, {"workers": 2, **router})

    async def main() -> T:
        state = RouterState(config)
        try:
            return await scenario(state, config)
        finally:
            assert state.workers is not None
            await state.workers.close()
            await state.idle.stop()
    return asyncio.run(main())


def acquiring(model: LeasedModel) -> asyncio.Task[Replica]:
    return asyncio.ensure_future(model.acquire(time.monotonic(), (), 30.0))


def test_slots_of_a_limited_instance_are_leased_from_one_fifo_queue_across_workers(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a, b = Worker(state.workers, 1), Worker(state.workers, 2)
        await settle()
        engine = state.table.get("m").replicas[0]  # type: ignore[union-attr]
        first = await a.model().acquire(time.monotonic(), (), 30.0)
        await b.model().acquire(time.monotonic(), (), 30.0)
        assert engine.outstanding == 2
        a3, b4, a5 = acquiring(a.model()), acquiring(b.model()), acquiring(a.model())
        await settle()
        assert not (a3.done() or b4.done() or a5.done())
        with pytest.raises(Overloaded):  # max_queue 3: the one queue is full, whichever worker asks
            await b.model().acquire(time.monotonic(), (), 30.0)
        a.model().release(first)
        await settle()
        assert a3.done() and not b4.done() and not a5.done()  # first come, first served
        assert engine.outstanding == 2
        a3.result()
        a.die()  # with a slot (a3) and a queued lease (a5)
        await settle()
        assert b4.done() and b4.result().name == engine.name  # a's slot went to the queue's next
        assert engine.outstanding == 2 and len(state.workers.links) == 1
        assert a5.done() and isinstance(a5.exception(), Exception)  # the controller went away for a
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1, max_concurrency=2, max_queue=3)], scenario)


def test_a_worker_that_dies_mid_request_frees_its_slots_and_counts(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a, b = Worker(state.workers, 1), Worker(state.workers, 2)
        await settle()
        limited, free = state.table.get("m"), state.table.get("u")
        assert limited is not None and free is not None
        for worker in (a, b):
            for name in ("m", "u"):
                model = worker.model(name)
                await model.lifecycle.admit()
                await model.acquire(time.monotonic(), (), 30.0)
        a.link.flush()
        b.link.flush()
        await settle()
        assert limited.lifecycle.in_flight == 2 and free.lifecycle.in_flight == 2
        assert limited.replicas[0].outstanding == 2 and free.replicas[0].outstanding == 2
        a.die()
        await settle()
        assert limited.lifecycle.in_flight == 1 and free.lifecycle.in_flight == 1
        assert limited.replicas[0].outstanding == 1 and free.replicas[0].outstanding == 1
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1, max_concurrency=4), instance("u", 2)], scenario)


def test_a_lease_granted_after_its_request_gave_up_goes_back(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a = Worker(state.workers, 1)
        await settle()
        model = a.model()
        held = await model.acquire(time.monotonic(), (), 30.0)
        waiting = acquiring(model)
        await settle()
        waiting.cancel()  # the client left while its request queued at the controller
        model.release(held)
        await settle()
        assert state.table.get("m").replicas[0].outstanding == 0  # type: ignore[union-attr]
        # The held slot's, then the late lease's (the worker had no request for it any more).
        assert sum(isinstance(m, Unlease) for m in a.end.sent) == 2
        for task in a.tasks:
            task.cancel()

    run(tmp_path, [instance("m", 1, max_concurrency=1, max_queue=2)], scenario)


def test_a_model_without_a_limit_takes_slots_with_no_message(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a = Worker(state.workers, 1)
        await settle()
        before = len(a.end.sent)
        model = a.model()
        await model.lifecycle.admit()
        replica = await model.acquire(time.monotonic(), (), 30.0)
        model.release(replica)
        model.lifecycle.release()
        assert len(a.end.sent) == before  # nothing sent on the request's path; counts follow in a Report
        a.link.flush()
        assert isinstance(a.end.sent[-1], Report) and not any(isinstance(m, Lease) for m in a.end.sent)
        for task in a.tasks:
            task.cancel()

    run(tmp_path, [instance("m", 1)], scenario)


def test_a_breaker_one_worker_opens_is_open_in_the_others_and_closes_in_all(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a, b = Worker(state.workers, 1), Worker(state.workers, 2)
        await settle()
        now = time.monotonic()
        bad_a = a.model().replicas[0]
        a.model().failed(bad_a, now, config.router)
        await settle()
        controller = state.table.get("m").replicas[0]  # type: ignore[union-attr]
        bad_b = b.model().replicas[0]
        assert controller.breaker.state == "open" and not controller.routable(now)
        assert bad_b.breaker.state == "open" and not bad_b.routable(now)
        assert bad_b.ejected_until == controller.ejected_until
        assert [e.state for e in state.events.recent() if e.kind == "breaker"] == ["open"]
        with pytest.raises(NoReplica):  # b sends nothing to it, though its own requests never failed
            b.model().pick(now)
        # A half-open trial that succeeds in a closes the breaker everywhere.
        bad_a.succeeded()
        await settle()
        assert controller.breaker.state == "closed" and bad_b.breaker.state == "closed"
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1)], scenario, eject_seconds=30)


def test_each_worker_acknowledges_the_table_generation_it_serves(tmp_path: Path) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        links = state.workers
        assert links is not None
        a, b = Worker(links, 1), Worker(links, 2)
        await settle()
        assert links.report() == [{"pid": 1, "generation": 1}, {"pid": 2, "generation": 1}]
        links.table_changed()
        assert [w["generation"] for w in links.report()] == [1, 1]  # sent, not yet applied
        await settle()
        assert links.report() == [{"pid": 1, "generation": 2}, {"pid": 2, "generation": 2}]
        for task in (*a.tasks, *b.tasks):
            task.cancel()

    run(tmp_path, [instance("m", 1)], scenario)


def test_a_worker_of_another_protocol_is_refused_with_a_clear_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        caplog.set_level(logging.ERROR)
        old = Worker(state.workers, 1, protocol=PROTOCOL - 1)
        await settle()
        assert old.state is None and state.workers.links == []
        assert old.link.refused is not None and f"link protocol {PROTOCOL}" in old.link.refused
        assert any(isinstance(m, Refused) for m in old.end.peer.sent)  # type: ignore[union-attr]
        assert any("proxy worker refused" in r.getMessage() and f"protocol {PROTOCOL - 1}" in r.getMessage()
                   for r in caplog.records)
        for task in old.tasks:
            task.cancel()

    run(tmp_path, [instance("m", 1)], scenario)


def test_every_kind_crosses_the_wire_whole_as_a_plain_tuple() -> None:
    """Each kind is sent as its number and fields (a NamedTuple pickles ten times slower), and read
    back as the same kind with the same fields."""
    samples = {kind: kind._make(range(len(kind._fields))) for kind in KINDS}  # type: ignore[attr-defined]
    assert len(samples) == len(KINDS) == len(set(KINDS))
    for kind, message in samples.items():
        data = encode(message)
        assert kind.__name__.encode() not in data
        back = decode(data)
        assert type(back) is kind and back == message
    report = Report({"m": 1}, {"m-1": 1}, [("m", 200, 0.5, 0.1, True, "anonymous", "m-1", 0, 7, 4)], [("m", "503")], [],
                    {"m": (3, 1)})
    assert decode(encode(report)) == report and b"Report" not in encode(report)


def test_a_request_that_needs_the_controller_after_it_went_away_is_answered_at_once(tmp_path: Path) -> None:
    """A worker goes on serving for a moment after its controller died (until it has stopped): what it
    would ask the controller for (a slot of a limited model, a wake, an answer) fails at once with
    the 503 "the router's controller went away" rather than waiting for an answer that cannot come."""
    async def scenario(state: RouterState, config: Config) -> None:
        assert state.workers is not None
        a = Worker(state.workers, 1)
        await settle()
        a.die()  # the controller's end of the link is gone
        await settle()
        admission = a.model().lifecycle.admission
        assert isinstance(admission, RemoteAdmission)
        asking = [acquiring(a.model()), asyncio.ensure_future(a.link.sync()),
                  asyncio.ensure_future(a.link.whose("resp_1")), asyncio.ensure_future(a.link.ready(admission))]
        await settle()
        assert all(t.done() for t in asking)
        assert all(isinstance(t.exception(), ModelUnavailable) and "controller went away" in str(t.exception())
                   for t in asking)
        for task in a.tasks:
            task.cancel()

    run(tmp_path, [instance("m", 1, max_concurrency=2, max_queue=3)], scenario)
