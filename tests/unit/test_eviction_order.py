"""Which model makes room for another: the least recently used one that may go, over a fake clock."""
from __future__ import annotations

import asyncio
from typing import Callable

from fakes import Clock, FakeControl, Recorder, instance, process

from router.config import ResidencySettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.residency import Residency


def fleet(names: str, pinned: str = "", host_gb: float = 100.0) -> tuple[ModelTable, FakeControl, Clock, Recorder]:
    """One 10 GB model per letter on GPU 0 with a 30 GB budget; `d` is on demand and stopped."""
    events = Events()
    control = FakeControl()
    clock = Clock()
    recorder = Recorder(events)
    table: list[ModelTable] = []
    residency = Residency(lambda: table[0], lambda: ResidencySettings(gpu_memory_gb=(("*", 30.0),),
                                                                      host_memory_gb=host_gb), lambda: 0.0)

    def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, SleepSettings(), control, events, residency, clock=clock)  # type: ignore[arg-type]

    models = {}
    for letter in names:
        replica = Replica(instance(f"{letter}-0", model=letter, gpu_memory_gb=10.0, host_memory_gb=40.0,
                                   on_demand=letter == "d", pin=letter in pinned), events)
        models[letter] = Model(letter, (replica,), lifecycle, ModelMetrics(letter), 1)
    table.append(ModelTable(models, {n: n for n in models}))
    d = models["d"]
    d.replicas[0].set_process(process("d-0", "STOPPED"))
    d.lifecycle.process_changed()
    return table[0], control, clock, recorder


def used(table: ModelTable, clock: Clock, order: str) -> None:
    """The models' last use, in `order` (oldest first), one second apart."""
    for letter in order:
        clock.advance(1)
        model = table.get(letter)
        assert model is not None
        model.lifecycle.touch()
    clock.advance(1)


def evicted(recorder: Recorder) -> list[tuple[str, object]]:
    return [(e.model or "", e.detail["action"]) for e in recorder.seen if e.state == "evicted"]


def test_a_start_puts_the_least_recently_used_model_to_sleep() -> None:
    async def test() -> None:
        table, _, clock, recorder = fleet("abcd")
        used(table, clock, "cab")
        d = table.get("d")
        assert d is not None and (await d.lifecycle.start()).ok
        assert evicted(recorder) == [("c", "sleep")]
        assert {m.name: m.lifecycle.state for m in table} == {"a": "awake", "b": "awake", "c": "sleeping", "d": "awake"}
    asyncio.run(test())


def test_pinned_and_busy_models_are_passed_over_and_no_host_room_means_a_stop() -> None:
    async def test() -> None:
        table, control, clock, recorder = fleet("abcd", pinned="c", host_gb=30.0)
        used(table, clock, "cab")
        a = table.get("a")
        assert a is not None
        await a.lifecycle.admit()  # in flight: not idle, not a candidate
        d = table.get("d")
        assert d is not None and (await d.lifecycle.start()).ok
        # c (oldest) is pinned, a (next) is busy: b goes; 40 GB of weights do not fit a 30 GB host: stopped.
        assert evicted(recorder) == [("b", "stop")]
        assert [c for c in control.calls if c[0] != "probe"] == [("stop", "b-0", ""), ("start", "d-0", "")]
        assert {m.name: m.lifecycle.state for m in table} == {"a": "awake", "b": "stopped", "c": "awake", "d": "awake"}
    asyncio.run(test())
