"""The scheduler driven through residency and the models' lifecycles, over fake engines and a fake clock:
an exclusive group (and a full budget) whose resident is busy, under each policy."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from fakes import Clock, FakeControl, Recorder, instance, settle

from router.config import Group, ResidencySettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.costs import SLEEP, Costs, wake_kind
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.residency import Residency


class Pair:
    """Models x and y, one 10 GB replica each; x awake with one request in flight, y asleep."""

    def __init__(self, policy: str, group: bool = True, min_awake: float = 0.0, **residency: Any):
        events = Events()
        self.control = FakeControl()
        self.clock = Clock()
        self.recorder = Recorder(events)
        self.costs = Costs()
        self.costs.observe("x", ["x-0"], SLEEP, 0.5)  # a switch: 0.5 s sleep + 1 s wake
        self.costs.observe("y", ["y-0"], wake_kind(1), 1.0)
        groups = (Group("pair", ("x-0", "y-0")),) if group else ()
        settings = ResidencySettings(gpu_memory_gb=None if group else (("*", 10.0),), groups=groups, policy=policy,
                                     **residency)
        table: list[ModelTable] = []
        self.residency = Residency(lambda: table[0], lambda: settings, lambda: min_awake, self.costs)
        self.residency.poll_seconds = 0.0  # ask again at every turn of the loop: the fake clock says when

        def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
            return Lifecycle(name, members, SleepSettings(drain_timeout_seconds=5.0), self.control,  # type: ignore[arg-type]
                             events, self.residency, clock=self.clock, costs=self.costs)

        models = {n: Model(n, (Replica(instance(f"{n}-0", model=n, gpu_memory_gb=10.0), events),), lifecycle,
                           ModelMetrics(n), 1) for n in ("x", "y")}
        table.append(ModelTable(models, {n: n for n in models}))
        self.x, self.y = models["x"].lifecycle, models["y"].lifecycle

    async def begin(self) -> "asyncio.Future[None]":
        """y asleep, x serving one request; then a request for y arrives and waits."""
        assert (await self.y.sleep()).ok
        await self.x.admit()
        waiter = asyncio.ensure_future(self.y.admit())
        await settle()
        return waiter

    def states(self) -> tuple[str, str]:
        return self.x.state, self.y.state


def test_cost_aware_keeps_serving_the_busy_resident_and_switches_once_the_wait_outweighs_the_switch() -> None:
    async def test() -> None:
        pair = Pair("cost_aware")
        waiter = await pair.begin()
        # x has 1 in flight (counted twice), y 1 waiting: a 1.5 s switch holds up 3 = 4.5 request-seconds.
        pair.clock.advance(4.4)
        await settle()
        assert pair.states() == ("awake", "sleeping") and not waiter.done()
        await pair.x.admit()  # x keeps taking new work meanwhile (2 in flight now: 7.5 request-seconds)
        pair.clock.advance(3.0)
        await settle()
        assert pair.states() == ("awake", "sleeping")
        pair.clock.advance(0.1)  # 7.5 s waited
        await settle()
        assert pair.x.state == "draining"  # the switch began: x finishes what it runs, nothing more
        pair.x.release()
        pair.x.release()
        await settle()
        assert pair.states() == ("sleeping", "awake") and waiter.done()
        decision = pair.residency.last_decision
        assert decision is not None and decision["switch"] and decision["switch_seconds"] == 1.5
        record = pair.residency.evictions[-1]
        assert (record["model"], record["reason"]) == ("x", "group_swap")
        assert "request-seconds" in str(record["why"])
    asyncio.run(test())


def test_cost_aware_switches_by_max_wait_seconds_whatever_the_switch_costs() -> None:
    async def test() -> None:
        pair = Pair("cost_aware", max_wait_seconds=5.0)
        pair.costs.observe("y", ["y-0"], wake_kind(1), 500.0)  # so the accumulated wait never outweighs it
        waiter = await pair.begin()
        pair.clock.advance(4.9)
        await settle()
        assert pair.states() == ("awake", "sleeping")
        pair.clock.advance(0.1)
        await settle()
        assert pair.x.state == "draining"
        pair.x.release()
        await settle()
        assert pair.states() == ("sleeping", "awake") and waiter.done()
        assert "max_wait_seconds 5" in str(pair.residency.evictions[-1]["why"])
    asyncio.run(test())


def test_cost_aware_takes_an_idle_resident_after_a_pause_and_fifo_drains_a_busy_one_at_once() -> None:
    async def test() -> None:
        idle = Pair("cost_aware")
        waiter = await idle.begin()
        assert idle.x.state == "awake"
        idle.x.release()  # x's last request ends: nothing queued
        idle.clock.advance(0.37)  # a 1.5 s switch: a pause is 0.375 s, within which x's next request may come
        await settle()
        assert idle.states() == ("awake", "sleeping") and not waiter.done()
        idle.clock.advance(0.005)
        await settle()
        assert idle.states() == ("sleeping", "awake") and waiter.done()
        assert "no queued work (idle 0.4s)" in str(idle.residency.evictions[-1]["why"])

        fifo = Pair("fifo")
        waiter = await fifo.begin()
        assert fifo.x.state == "draining"  # x still runs a request, and is drained for y all the same
        fifo.x.release()
        await settle()
        assert fifo.states() == ("sleeping", "awake") and waiter.done()
    asyncio.run(test())


def test_cost_aware_keeps_a_resident_just_switched_in_for_half_as_long_as_its_switch_took() -> None:
    async def test() -> None:
        pair = Pair("cost_aware")
        pair.x.last_wake_at = pair.clock.now  # x just came in; its switch is estimated at 1.5 s
        waiter = await pair.begin()
        pair.x.release()  # idle, but inside its window
        pair.clock.advance(0.74)
        await settle()
        assert pair.states() == ("awake", "sleeping") and not waiter.done()
        pair.clock.advance(0.01)
        await settle()
        assert pair.states() == ("sleeping", "awake") and waiter.done()
    asyncio.run(test())


def test_fifo_waits_min_sleep_duration_as_before() -> None:
    async def test() -> None:
        pair = Pair("fifo", min_awake=10.0)
        pair.x.last_wake_at = pair.clock.now
        waiter = await pair.begin()
        pair.clock.advance(9.9)
        await settle()
        assert pair.x.state == "awake"
        pair.clock.advance(0.1)
        await settle()
        pair.x.release()
        await settle()
        assert pair.states() == ("sleeping", "awake") and waiter.done()
    asyncio.run(test())


def test_a_full_budget_of_busy_models_refuses_under_fifo_and_waits_its_turn_under_cost_aware() -> None:
    async def test() -> None:
        fifo = Pair("fifo", group=False)
        waiter = await fifo.begin()
        assert waiter.done() and "no room on GPU 0" in str(waiter.exception())
        assert fifo.states() == ("awake", "sleeping")

        aware = Pair("cost_aware", group=False, max_wait_seconds=5.0)
        waiter = await aware.begin()
        aware.clock.advance(4.4)
        await settle()
        assert aware.states() == ("awake", "sleeping") and not waiter.done()
        aware.clock.advance(0.1)  # 4.5 request-seconds: the 1.5 s switch x 3 requests (x's one counted twice)
        await settle()
        aware.x.release()
        await settle()
        assert aware.states() == ("sleeping", "awake") and waiter.done() and waiter.exception() is None
        assert aware.residency.evictions[-1]["reason"] == "gpu_budget"
    asyncio.run(test())
