"""Which waiting model a busy resident gives way to, when several wait for its place: driven through residency
and the models' lifecycles over fake engines and a fake clock (router/server/fleet/contention.next_in_line)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from fakes import Clock, FakeControl, instance, settle

from router.config import Group, ResidencySettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.costs import SLEEP, Costs, wake_kind
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.residency import Residency

NAMES = ("x", "y", "z")


class Trio:
    """Models x, y and z in one exclusive group; x awake serving one request, y and z asleep."""

    def __init__(self, policy: str, **residency: Any):
        events = Events()
        self.clock = Clock()
        costs = Costs()
        for n in NAMES:  # a switch: 0.5 s sleep + 1 s wake
            costs.observe(n, [f"{n}-0"], SLEEP, 0.5)
            costs.observe(n, [f"{n}-0"], wake_kind(1), 1.0)
        settings = ResidencySettings(groups=(Group("trio", tuple(f"{n}-0" for n in NAMES)),), policy=policy,
                                     **residency)
        table: list[ModelTable] = []
        self.residency = Residency(lambda: table[0], lambda: settings, lambda: 0.0, costs)
        self.residency.poll_seconds = 0.0
        control = FakeControl()

        def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
            return Lifecycle(name, members, SleepSettings(drain_timeout_seconds=5.0), control,  # type: ignore[arg-type]
                             events, self.residency, clock=self.clock, costs=costs)

        models = {n: Model(n, (Replica(instance(f"{n}-0", model=n, gpu_memory_gb=10.0), events),), lifecycle,
                           ModelMetrics(n), 1) for n in NAMES}
        table.append(ModelTable(models, {n: n for n in models}))
        self.x, self.y, self.z = (models[n].lifecycle for n in NAMES)

    async def begin(self) -> tuple["list[asyncio.Future[None]]", "list[asyncio.Future[None]]"]:
        """One request for y, then a second later three for z, while x serves one; a second later still."""
        assert (await self.y.sleep()).ok and (await self.z.sleep()).ok
        await self.x.admit()
        for_y = [asyncio.ensure_future(self.y.admit())]
        await settle()
        self.clock.advance(1.0)
        for_z = [asyncio.ensure_future(self.z.admit()) for _ in range(3)]
        await settle()
        self.clock.advance(1.0)  # y: 2 request-seconds waited, z: 3
        await settle()
        return for_y, for_z

    def states(self) -> tuple[str, str, str]:
        return self.x.state, self.y.state, self.z.state


def test_the_resident_gives_way_to_the_model_that_has_waited_most_not_to_the_first_that_asked() -> None:
    async def test() -> None:
        trio = Trio("cost_aware")
        for_y, for_z = await trio.begin()
        assert trio.states() == ("awake", "sleeping", "sleeping")
        trio.x.release()  # x has nothing left: after a pause, its place goes to z's three, though y asked first
        trio.clock.advance(0.375)  # a quarter of the 1.5 s switch
        await settle()
        assert trio.states() == ("sleeping", "sleeping", "awake")
        assert all(f.done() for f in for_z) and not for_y[0].done()
        record = trio.residency.evictions[-1]
        assert record["model"] == "x" and "no queued work" in str(record["why"])
        assert "next of 2 waiting models: z (4.1s accumulated" in str(record["why"])
        assert "ahead of y, which asked first" in str(record["why"])
        decision = trio.residency.last_decision
        assert decision is not None and decision["resident"] == "z" and decision["waiting"] == "y"
        for _ in for_z:  # z's requests end, and once z has served its window (its switch), y gets the place
            trio.z.release()
        trio.clock.advance(1.5)
        await settle()
        assert trio.states() == ("sleeping", "awake", "sleeping") and for_y[0].done()
    asyncio.run(test())


def test_a_request_past_max_wait_seconds_goes_first_whatever_the_crowd_behind_it() -> None:
    async def test() -> None:
        trio = Trio("cost_aware", max_wait_seconds=3.0)
        for_y, for_z = await trio.begin()
        trio.clock.advance(0.9)  # y 2.9 s (its one request), z 5.7 request-seconds: still x's, busy
        await settle()
        assert trio.states() == ("awake", "sleeping", "sleeping")
        trio.clock.advance(0.1)  # y's request reaches max_wait_seconds: x is drained for y, not for z
        await settle()
        assert trio.x.state == "draining"
        trio.x.release()
        await settle()
        assert trio.states() == ("sleeping", "awake", "sleeping") and for_y[0].done()
        assert not any(f.done() for f in for_z)
        assert "max_wait_seconds 3" in str(trio.residency.evictions[-1]["why"])
    asyncio.run(test())
