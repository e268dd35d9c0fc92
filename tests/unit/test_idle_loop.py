"""The idle loop on fakes and a fake clock: an idle stop is recorded as an eviction, and the loop's next
wake is the next idle deadline (sleep, stop, deeper sleep), found again as requests come and go."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from fakes import Clock, FakeControl, instance

from router.config import ResidencySettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.idle import LOOK_AGAIN_SECONDS, IdleSleeper, stop_due
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.report import StateCollector
from router.server.fleet.residency import Residency


class RoundsByHand(IdleSleeper):
    """The loop whose rounds the test runs (`check`), on the fake clock, as if its task were running."""

    running = True  # type: ignore[assignment]


class Fleet:
    """Models on one fake control and clock, a residency over them and an idle loop (not started: each
    round is run by the test)."""

    def __init__(self, settings: SleepSettings, decides: Callable[[], bool] = lambda: True, **models: dict[str, Any]):
        self.events, self.control, self.clock, self.settings = Events(), FakeControl(), Clock(), settings
        self.residency = Residency(lambda: self.table, lambda: ResidencySettings(), lambda: 0.0)
        built = {}
        for name, keys in models.items():
            replica = Replica(instance(f"{name}-0", model=name, **keys), self.events)
            built[name] = Model(name, (replica,), self.lifecycle, ModelMetrics(name), 1)
        self.table = ModelTable(built, {n: n for n in built})
        self.idle = RoundsByHand(lambda: self.table, lambda: settings, self.residency, decides, self.events, self.clock)

    def lifecycle(self, name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, self.settings, self.control, self.events, self.residency,  # type: ignore[arg-type]
                         clock=self.clock)

    def __getitem__(self, name: str) -> Model:
        model = self.table.get(name)
        assert model is not None
        return model

    def evictions_metric(self, reason: str) -> Optional[float]:
        for family in StateCollector(lambda: self.table, self.residency).collect():
            for sample in family.samples:
                if sample.name == "router_model_evictions_total" and sample.labels == {"reason": reason}:
                    return sample.value
        return None


def test_an_idle_stop_is_an_eviction_in_residency_and_the_metric() -> None:
    async def test() -> None:
        fleet = Fleet(SleepSettings(), a={"on_demand": True, "idle_stop_seconds": 3.0}, b={})
        fleet.clock.advance(3.0)
        await fleet.idle.check()
        assert fleet["a"].lifecycle.state == "stopped" and fleet["b"].lifecycle.state == "awake"
        assert fleet.control.count("stop") == 1
        assert [(e["model"], e["action"], e["reason"]) for e in fleet.residency.evictions] == [("a", "stop", "idle_stop")]
        report = fleet.residency.report()
        assert report["eviction_counts"] == {"idle_stop": 1}
        assert fleet.evictions_metric("idle_stop") == 1.0
        await fleet.idle.check()  # stopped: nothing more to do
        assert fleet.control.count("stop") == 1 and fleet.residency.eviction_counts["idle_stop"] == 1
    asyncio.run(test())


def test_an_idle_stop_that_is_no_longer_due_under_the_lock_keeps_the_model_and_is_not_counted() -> None:
    async def test() -> None:
        fleet = Fleet(SleepSettings(), a={"on_demand": True, "idle_stop_seconds": 3.0})
        a = fleet["a"]
        fleet.clock.advance(3.0)
        assert stop_due(a)
        await a.lifecycle.admit()  # a request came while the stop waited for the placement lock
        outcome = await fleet.residency.stop_idle(a, lambda: stop_due(a))
        assert not outcome.ok and outcome.status == 409 and a.lifecycle.state == "awake"
        assert fleet.control.count("stop") == 0 and not fleet.residency.evictions
    asyncio.run(test())


def test_the_next_wake_is_the_idle_stop_deadline_and_a_request_moves_it() -> None:
    async def test() -> None:
        fleet = Fleet(SleepSettings(check_interval_seconds=60.0), a={"on_demand": True, "idle_stop_seconds": 3.0})
        a, start = fleet["a"], fleet.clock.now
        assert fleet.idle.next_due() == start + 3.0 and fleet.idle.next_in() == 3.0
        fleet.clock.advance(2.0)
        await a.lifecycle.admit()
        # In flight: idle no sooner than 3 s from now; the loop looks again then.
        assert fleet.idle.next_due() == fleet.clock.now + 3.0
        fleet.clock.advance(3.0)
        await fleet.idle.check()  # that look: still in flight, so another 3 s on
        assert a.lifecycle.state == "awake" and fleet.idle.next_due() == fleet.clock.now + 3.0
        fleet.clock.advance(1.0)
        a.lifecycle.release()
        ended = fleet.clock.now
        assert fleet.idle.next_due() == ended + 3.0
        fleet.clock.advance(2.9)
        await fleet.idle.check()
        assert a.lifecycle.state == "awake"  # 0.1 s early: not stopped
        assert fleet.idle.next_due() == ended + 3.0
        fleet.clock.advance(0.1)
        assert fleet.idle.next_in() == 0.0
        await fleet.idle.check()
        assert a.lifecycle.state == "stopped" and fleet.idle.next_due() is None  # until a start, which pokes the loop
    asyncio.run(test())


def test_the_idle_sleep_deadline_waits_for_min_sleep_duration_and_the_deep_sleep_follows_it() -> None:
    async def test() -> None:
        settings = SleepSettings(auto_sleep_enabled=True, idle_threshold_seconds=5.0, min_sleep_duration=10.0,
                                 idle_deep_sleep_seconds=7.0)
        fleet = Fleet(settings, a={})
        a = fleet["a"]
        assert fleet.idle.next_due() == fleet.clock.now + 5.0
        fleet.clock.advance(5.0)
        await fleet.idle.check()
        assert a.lifecycle.state == "sleeping"
        slept = fleet.clock.now
        assert fleet.idle.next_due() == slept + 7.0  # to level 2
        await a.lifecycle.wake()
        woke = fleet.clock.now
        assert fleet.idle.next_due() == woke + 10.0  # idle after 5 s, but awake at least min_sleep_duration
        fleet.clock.advance(9.9)
        await fleet.idle.check()
        assert a.lifecycle.state == "awake"
        fleet.clock.advance(0.1)
        await fleet.idle.check()
        assert a.lifecycle.state == "sleeping"
        fleet.clock.advance(7.0)
        await fleet.idle.check()
        assert a.lifecycle.held_level(a.replicas[0]) == 2 and fleet.idle.next_due() is None
    asyncio.run(test())


def test_a_deadline_a_round_could_not_act_on_is_not_given_again_until_the_interval() -> None:
    async def test() -> None:
        fleet = Fleet(SleepSettings(), a={"on_demand": True, "idle_stop_seconds": 3.0})
        fleet.control.refuse_stop.add("a-0")
        fleet.clock.advance(3.0)
        outcomes = await fleet.idle.check()
        assert [o.ok for o in outcomes] == [False] and fleet["a"].lifecycle.state == "awake"
        assert stop_due(fleet["a"]) and fleet.idle.next_due() is None  # tried again at check_interval_seconds
        assert not fleet.residency.evictions
    asyncio.run(test())


def test_a_model_in_flight_with_a_zero_threshold_is_looked_at_again_a_second_later_not_at_once() -> None:
    async def test() -> None:
        fleet = Fleet(SleepSettings(auto_sleep_enabled=True, idle_threshold_seconds=0.0), a={})
        a = fleet["a"]
        await a.lifecycle.admit()
        await fleet.idle.check()
        assert a.lifecycle.state == "awake" and fleet.idle.next_in() == LOOK_AGAIN_SECONDS
        fleet.clock.advance(0.5)
        a.lifecycle.release()
        assert fleet.idle.next_in() == 0.0  # idle since the round, and a threshold of 0: due at once
    asyncio.run(test())


def test_no_deadline_for_a_pinned_model_or_for_a_router_that_follows_a_leader() -> None:
    assert Fleet(SleepSettings(), a={"on_demand": True, "idle_stop_seconds": 3.0, "pin": True}).idle.next_due() is None
    follower = Fleet(SleepSettings(), decides=lambda: False, a={"on_demand": True, "idle_stop_seconds": 3.0})
    assert follower.idle.next_due() is None
