"""A replica's circuit breaker on a fake clock, through the replica and the model's pick: when it
opens, how long it stays open, how many trials go while it is half-open, and what closes or
reopens it, with the events it publishes.

The rules (router/server/fleet/replica.py, Breaker): one failure opens the breaker for
eject_seconds; at the end of that time ONE trial request may go (half-open), and no other
while it is out; the trial's success closes it, its failure reopens it for twice as long, up
to breaker_max_seconds.
"""
from __future__ import annotations

import asyncio

from fakes import Clock, FakeControl, Recorder, instance

from router.config import RouterSettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, NoReplica
from router.server.fleet.replica import Replica

SETTINGS = RouterSettings(eject_seconds=10.0, breaker_max_seconds=35.0)


def replicas(*names: str) -> tuple[Model, Recorder, Clock]:
    """A model over replicas `names` (no engine behind them: the breaker needs none)."""
    events = Events()
    clock = Clock()
    reps = tuple(Replica(instance(n), events) for n in names)
    control = FakeControl()
    model = Model("m", reps, lambda name, members: Lifecycle(name, members, SleepSettings(), control,  # type: ignore[arg-type]
                                                             events, clock=clock), ModelMetrics("m"), 1)
    return model, Recorder(events), clock


def breaker_events(recorder: Recorder) -> list[tuple[str, object]]:
    return [(e.state, e.detail.get("seconds")) for e in recorder.seen if e.kind == "breaker"]


def test_one_failure_opens_the_breaker_for_eject_seconds_and_then_one_trial_goes() -> None:
    async def test() -> None:
        model, recorder, clock = replicas("a")
        (a,) = model.replicas
        assert a.breaker.state == "closed" and a.routable(clock())
        a.take_slot(clock())
        model.failed(a, clock(), SETTINGS)  # one failure is enough: N is 1
        model.release(a)
        assert a.breaker.state == "open" and breaker_events(recorder) == [("open", 10.0)]
        clock.advance(9.99)
        assert not a.routable(clock())
        try:
            model.pick(clock())
            raise AssertionError("an open breaker's replica was picked")
        except NoReplica:
            pass
        clock.advance(0.01)  # eject_seconds are over: half-open, the next request is the trial
        assert a.routable(clock())
        assert model.pick(clock()) is a
        assert a.breaker.state == "half_open"
        # One trial at a time: while it is out, the replica takes nothing else.
        assert not a.routable(clock())
        clock.advance(100)
        assert not a.routable(clock())
        a.succeeded()
        model.release(a)
        assert a.breaker.state == "closed" and a.routable(clock())
        assert breaker_events(recorder) == [("open", 10.0), ("closed", None)]
    asyncio.run(test())


def test_a_failed_trial_reopens_for_twice_as_long_up_to_the_cap_and_a_success_starts_over() -> None:
    async def test() -> None:
        model, recorder, clock = replicas("a")
        (a,) = model.replicas
        opened = []
        model.failed(a, clock(), SETTINGS)
        for _ in range(4):  # trial, failure: 20, 35 (the cap), 35, 35
            clock.advance(a.ejected_until - clock())
            assert model.pick(clock()) is a and a.breaker.state == "half_open"
            model.failed(a, clock(), SETTINGS)
            model.release(a)
            assert a.breaker.state == "open" and not a.routable(clock())
            opened.append(a.ejected_until - clock())
        assert opened == [20.0, 35.0, 35.0, 35.0]
        clock.advance(35)
        assert model.pick(clock()) is a
        a.succeeded()
        model.release(a)
        # Closed: the next failure opens it for eject_seconds again, not for the last length.
        model.failed(a, clock(), SETTINGS)
        assert a.ejected_until - clock() == 10.0
        assert [s for s, _ in breaker_events(recorder)] == ["open"] * 5 + ["closed", "open"]
    asyncio.run(test())


def test_failures_of_requests_sent_before_it_opened_neither_extend_nor_double_it() -> None:
    async def test() -> None:
        model, _, clock = replicas("a")
        (a,) = model.replicas
        for _ in range(3):
            a.take_slot(clock())
        model.failed(a, clock(), SETTINGS)  # an engine died under three streams: they fail one by one
        clock.advance(4)
        model.failed(a, clock(), SETTINGS)
        model.failed(a, clock(), SETTINGS)
        assert a.ejected_until - clock() == 6.0 and a.breaker.opened_for == 10.0
    asyncio.run(test())


def test_while_one_replica_is_open_the_other_takes_every_request_and_the_trial_goes_alone() -> None:
    async def test() -> None:
        model, _, clock = replicas("bad", "good")
        bad, good = model.replicas
        model.failed(bad, clock(), SETTINGS)
        # Open: every pick goes to the other replica, however loaded it is.
        picks = [model.pick(clock()) for _ in range(5)]
        assert picks == [good] * 5
        clock.advance(10)
        # Half-open: the least-loaded pick sends the trial to the idle bad replica...
        assert model.pick(clock()) is bad
        # ...and while it is out, the rest go to the good one even though it is busier.
        assert [model.pick(clock()) for _ in range(3)] == [good] * 3
        assert bad.outstanding == 1 and good.outstanding == 8
    asyncio.run(test())


def test_a_trial_that_ends_without_a_verdict_lets_the_next_request_be_the_trial() -> None:
    """The client of the trial left, or the engine answered 500 (neither counts): the replica must
    not stay half-open with a trial out for ever."""
    async def test() -> None:
        model, _, clock = replicas("a")
        (a,) = model.replicas
        model.failed(a, clock(), SETTINGS)
        clock.advance(10)
        assert model.pick(clock()) is a and not a.routable(clock())
        model.release(a)  # no success, no failure
        assert a.routable(clock()) and a.breaker.state == "open"
        assert model.pick(clock()) is a and a.breaker.state == "half_open"
    asyncio.run(test())
