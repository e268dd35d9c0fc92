"""The victim that costs least to bring back, weighted by recency (router/server/fleet/victims.py), and
how residency uses it and explains it, over fake engines and a fake clock."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from fakes import Clock, FakeControl, Recorder, instance, process

from router.config import ResidencySettings, SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.costs import START, Costs, wake_kind
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.residency import Residency
from router.server.fleet.victims import Candidate, cheapest, explain


def test_equal_costs_pick_the_least_recently_used() -> None:
    cands = [Candidate("a", "sleep", "wake_1", 2.0, 10.0), Candidate("b", "sleep", "wake_1", 2.0, 50.0),
             Candidate("c", "sleep", "wake_1", 2.0, 30.0)]
    assert cheapest(cands).model == "b"


def test_a_cheap_wake_goes_before_an_older_model_only_a_cold_start_brings_back() -> None:
    wakes = Candidate("recent", "sleep", "wake_1", 1.0, 10.0)  # 0.1 per idle second
    starts = Candidate("older", "stop", "start", 60.0, 100.0)  # 0.6
    assert cheapest([starts, wakes]) is wakes
    # ... but a model idle long enough goes even if it must be started again.
    ancient = Candidate("ancient", "stop", "start", 60.0, 1000.0)  # 0.06
    assert cheapest([starts, wakes, ancient]) is ancient


def test_a_model_used_a_moment_ago_scores_by_the_least_idle_time_not_infinity() -> None:
    now = Candidate("now", "sleep", "wake_1", 1.0, 0.0)
    assert now.score == 1.0
    assert cheapest([now, Candidate("x", "sleep", "wake_2", 8.0, 4.0)]) is now


def test_the_explanation_names_the_choice_and_what_was_kept() -> None:
    a, b = Candidate("a", "sleep", "wake_1", 1.0, 10.0), Candidate("b", "stop", "start", 60.0, 100.0)
    text = explain(a, [a, b])
    assert text.startswith("least expected cost: wake_1 1.00s to bring back / idle 10s = 0.1")
    assert "kept: b start 60.00s, idle 100s (0.6)" in text
    assert a.shown() == {"model": "a", "action": "sleep", "cost_kind": "wake_1", "cost_seconds": 1.0,
                         "idle_seconds": 10.0, "score": 0.1}


Fleet = tuple[ModelTable, Residency, Clock, Recorder]


def fleet(specs: dict[str, dict[str, Any]], costs: Costs, budget: float = 20.0) -> Fleet:
    """One 10 GB model per spec on GPU 0 with a `budget` GB GPU budget and a roomy host budget."""
    events = Events()
    control = FakeControl()
    clock = Clock()
    recorder = Recorder(events)
    table: list[ModelTable] = []
    residency = Residency(lambda: table[0], lambda: ResidencySettings(gpu_memory_gb=(("*", budget),),
                                                                      host_memory_gb=100.0), lambda: 0.0, costs)

    def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
        return Lifecycle(name, members, SleepSettings(), control, events, residency, clock=clock,  # type: ignore[arg-type]
                         costs=costs)

    models = {}
    for name, extra in specs.items():
        replica = Replica(instance(f"{name}-0", model=name, gpu_memory_gb=10.0, host_memory_gb=10.0, **extra), events)
        models[name] = Model(name, (replica,), lifecycle, ModelMetrics(name), 1)
        if extra.get("on_demand"):
            replica.set_process(process(replica.name, "STOPPED"))
            models[name].lifecycle.process_changed()
    table.append(ModelTable(models, {n: n for n in models}))
    return table[0], residency, clock, recorder


def used(table: ModelTable, clock: Clock, at: dict[str, float]) -> None:
    """Each model last used at `at[name]` seconds from now (in the past); the clock ends at now."""
    start = clock.now
    for name, ago in sorted(at.items(), key=lambda kv: -kv[1]):
        clock.now = start - ago
        model = table.get(name)
        assert model is not None
        model.lifecycle.touch()
    clock.now = start


def test_room_goes_to_the_model_cheapest_to_bring_back_not_the_oldest_and_the_choice_is_explained() -> None:
    async def test() -> None:
        costs = Costs()
        costs.observe("fast", ["fast-0"], wake_kind(1), 1.0)
        costs.observe("slow", ["slow-0"], START, 60.0)
        # `slow` cannot sleep (sleep: false): evicting it means a stop and a 60 s start; `fast` wakes in 1 s.
        table, residency, clock, recorder = fleet({"fast": {}, "slow": {"sleep": False}, "new": {"on_demand": True}},
                                                  costs)
        clock.advance(1000)
        used(table, clock, {"slow": 100.0, "fast": 10.0})
        new = table.get("new")
        assert new is not None and (await new.lifecycle.start()).ok
        assert {m.name: m.lifecycle.state for m in table} == {"fast": "sleeping", "slow": "awake", "new": "awake"}
        record = residency.evictions[-1]
        assert (record["model"], record["action"], record["reason"]) == ("fast", "sleep", "gpu_budget")
        assert (record["cost_kind"], record["cost_seconds"]) == ("wake_1", 1.0)
        assert "kept: slow start 60.00s, idle 100s" in str(record["why"])
        event = next(e for e in recorder.seen if e.state == "evicted")
        assert (event.model, event.detail["cost_kind"], event.detail["cost_seconds"]) == ("fast", "wake_1", 1.0)
        assert event.detail["why"] == record["why"]
        shown = residency.report()
        assert shown["evictions"] == [record]
        models = shown["models"]
        assert isinstance(models, dict)
        assert models["fast"]["costs"]["wake_1"] == {"seconds": 1.0, "samples": 1, "last": 1.0}
        assert {"start", "sleep", "wake_1", "wake_2"} <= set(models["slow"]["costs"])
    asyncio.run(test())


@pytest.mark.parametrize("fast_idle, gone", [(10.0, "fast"), (0.5, "old")])
def test_recency_weighs_against_cost(fast_idle: float, gone: str) -> None:
    """A model that wakes in 1 s goes before one that wakes in 8 s unless it was used 8 times as recently."""
    async def test() -> None:
        costs = Costs()
        costs.observe("fast", ["fast-0"], wake_kind(1), 1.0)
        costs.observe("old", ["old-0"], wake_kind(2), 8.0)
        table, residency, clock, _ = fleet({"fast": {}, "old": {"sleep_level": 2}, "new": {"on_demand": True}}, costs)
        clock.advance(1000)
        used(table, clock, {"old": 40.0, "fast": fast_idle})  # old: 8/40 = 0.2; fast: 0.1 or 2
        new = table.get("new")
        assert new is not None and (await new.lifecycle.start()).ok
        assert residency.evictions[-1]["model"] == gone
    asyncio.run(test())


def test_an_unmeasured_instance_is_guessed_at_what_the_others_measured() -> None:
    costs = Costs()
    costs.observe("a", ["a-0"], wake_kind(1), 1.0)
    costs.observe("b", ["b-0"], wake_kind(1), 3.0)
    got = costs.estimate("c-0", wake_kind(1))
    assert (got.seconds, got.samples) == (2.0, 0)
    assert costs.estimate("c-0", START).seconds == 60.0  # nothing measured of that kind: the default guess


def test_a_model_never_slept_is_not_kept_for_ever_by_the_default_guess() -> None:
    """The others wake in 10 ms: the one never slept is guessed at that, not at 5 s, so recency decides."""
    async def test() -> None:
        costs = Costs()
        costs.observe("b", ["b-0"], wake_kind(1), 0.01)
        table, residency, clock, _ = fleet({"a": {}, "b": {}, "new": {"on_demand": True}}, costs)
        clock.advance(1000)
        used(table, clock, {"a": 50.0, "b": 10.0})
        new = table.get("new")
        assert new is not None and (await new.lifecycle.start()).ok
        assert residency.evictions[-1]["model"] == "a"
    asyncio.run(test())
