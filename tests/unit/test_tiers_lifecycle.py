"""The lifecycle's sleep and wake at each instance's tier, on an in-memory engine control and a fake
clock: the sleep call of the instance's level, the wake steps of the level it slept at in order and
within one time limit, the first failure ending the wake, and each transition's measured time."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Optional

import yaml

from router.config import SleepSettings, parse_config
from router.engines import Call
from router.observe.events import Events
from router.server.fleet.control import EngineCallError, EngineControl
from router.server.fleet.costs import SLEEP, Costs, wake_kind
from router.server.fleet.idle import deepen_due
from router.server.fleet.lifecycle import AWAKE, SLEEPING, Lifecycle
from router.server.fleet.replica import Replica

#: Seconds each call takes on the fake clock.
TAKES = {"/sleep": 2.0, "/wake_up": 1.0, "/collective_rpc": 4.0, "/reset_prefix_cache": 0.5,
         "/release_memory_occupation": 0.0}


class FakeControl(EngineControl):
    """Answers every call at once, moving the fake clock by what the call takes; `refuse` fails one path."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now = now
        self.calls: list[tuple[str, float]] = []
        self.refuse: Optional[str] = None

    @property
    def is_open(self) -> bool:
        return True

    async def call(self, replica: Replica, call: Call, timeout: float) -> None:
        self.calls.append((str(call), timeout))
        if call.path == self.refuse:
            raise EngineCallError(f"{replica.name}: {call.method} {call.path} answered 500: no weights")
        self.now[0] += TAKES[call.path]


def lifecycle(level: int) -> tuple[Lifecycle, FakeControl, Costs]:
    doc = {"instances": [{"name": "a", "model": "m", "engine": "vllm", "engine_args": ["--port=9001"],
                          "sleep_level": level}]}
    (inst,) = parse_config(yaml.safe_dump(doc), "c.yaml", sim=True).instances
    replica, now, costs = Replica(inst, Events()), [100.0], Costs()
    control = FakeControl(now)
    lc = Lifecycle("m", lambda: (replica,), SleepSettings(wake_timeout_seconds=10), control, Events(),
                   clock=lambda: now[0], costs=costs)
    return lc, control, costs


def test_level_2_sleeps_at_2_and_wakes_with_the_reload_steps_in_order_in_one_time_limit() -> None:
    lc, control, costs = lifecycle(2)
    assert asyncio.run(lc.sleep()).ok and lc.state == SLEEPING
    assert control.calls == [("POST /sleep?level=2&mode=wait", 10.0)]
    control.calls.clear()
    assert asyncio.run(lc.wake()).ok and lc.state == AWAKE
    # each step gets what is left of wake_timeout_seconds
    assert control.calls == [("POST /wake_up?tags=weights", 10.0), ("POST /collective_rpc reload_weights", 9.0),
                             ("POST /wake_up?tags=kv_cache", 5.0), ("POST /reset_prefix_cache", 4.0)]
    assert costs.estimate("a", SLEEP).seconds == 2.0 and costs.estimate("a", wake_kind(2)).seconds == 6.5
    assert costs.estimate("a", wake_kind(1)).samples == 0


def test_level_1_wakes_with_one_call_and_is_measured_as_a_level_1_wake() -> None:
    lc, control, costs = lifecycle(1)
    asyncio.run(lc.sleep())
    assert asyncio.run(lc.wake()).ok
    assert [c for c, _ in control.calls] == ["POST /sleep?level=1&mode=wait", "POST /wake_up"]
    assert costs.estimate("a", wake_kind(1)).seconds == 1.0


def test_the_wake_uses_the_level_the_model_slept_at_not_a_level_changed_since() -> None:
    lc, control, _ = lifecycle(2)
    asyncio.run(lc.sleep())
    object.__setattr__(lc.members()[0].instance, "sleep_level", 1)  # a reload changed the key meanwhile
    asyncio.run(lc.wake())
    assert [c for c, _ in control.calls][1:] == ["POST /wake_up?tags=weights", "POST /collective_rpc reload_weights",
                                                 "POST /wake_up?tags=kv_cache", "POST /reset_prefix_cache"]


def test_a_failed_step_ends_the_wake_the_model_stays_asleep_and_the_error_names_the_step() -> None:
    lc, control, costs = lifecycle(2)
    asyncio.run(lc.sleep())
    control.calls.clear()
    control.refuse = "/collective_rpc"
    outcome = asyncio.run(lc.wake())
    assert not outcome.ok and lc.state == SLEEPING and lc.members()[0].asleep
    assert "step 2 of 4 (POST /collective_rpc reload_weights) failed, the rest not run" in outcome.message
    assert "no weights" in outcome.message
    assert [c for c, _ in control.calls] == ["POST /wake_up?tags=weights", "POST /collective_rpc reload_weights"]
    assert costs.estimate("a", wake_kind(2)).samples == 0  # a failed wake is not a measurement


def test_a_level_1_sleeper_is_deepened_to_2_and_then_wakes_with_the_reload_steps() -> None:
    lc, control, _ = lifecycle(1)
    assert not lc.deepenable  # awake
    asyncio.run(lc.sleep())
    assert lc.deepenable and lc.held_level(lc.members()[0]) == 1
    outcome = asyncio.run(lc.deepen("test"))
    assert outcome.ok and lc.state == SLEEPING and lc.held_level(lc.members()[0]) == 2 and not lc.deepenable
    asyncio.run(lc.wake())
    assert [c for c, _ in control.calls] == [
        "POST /sleep?level=1&mode=wait", "POST /sleep?level=2&mode=wait", "POST /wake_up?tags=weights",
        "POST /collective_rpc reload_weights", "POST /wake_up?tags=kv_cache", "POST /reset_prefix_cache"]
    assert lc.held_level(lc.members()[0]) == 1  # awake: its next sleep is at its own level again


def test_idle_deep_sleep_is_due_only_after_its_time_asleep_and_only_where_the_engine_can_deepen() -> None:
    lc, control, _ = lifecycle(1)
    model = SimpleNamespace(lifecycle=lc)
    asyncio.run(lc.sleep())
    slept = lc.slept_at
    assert slept is not None
    assert not deepen_due(model, 60.0, slept + 59.0) and deepen_due(model, 60.0, slept + 60.0)
    assert not deepen_due(model, None, slept + 1e6)  # idle_deep_sleep_seconds not set
    doc = {"instances": [{"name": "s", "model": "m", "engine": "sglang", "engine_args": [
        "--port=9001", "--enable-memory-saver", "--enable-weights-cpu-backup"]}]}
    (inst,) = parse_config(yaml.safe_dump(doc), "c.yaml", sim=True).instances
    replica = Replica(inst, Events())
    sgl = Lifecycle("m", lambda: (replica,), SleepSettings(), control, Events(), clock=lambda: control.now[0])
    control.calls.clear()
    asyncio.run(sgl.sleep())
    assert sgl.state == SLEEPING and not sgl.deepenable  # its host backup is a launch flag: only a stop frees it
    assert not deepen_due(SimpleNamespace(lifecycle=sgl), 1.0, control.now[0] + 10)
    assert asyncio.run(sgl.deepen("test")).status == 409
