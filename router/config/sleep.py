"""The ``sleep_manager`` block (kvcached's keys): when idle models are put to sleep and woken."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from router.config.kinds import NON_NEGATIVE, POSITIVE, Choice, Flag
from router.config.schema import setting

#: What vLLM's sleep call does with running requests (kvcached's sleep_manager.vllm_sleep_mode).
VLLM_SLEEP_MODES = ("abort", "wait")


@dataclass(frozen=True)
class SleepSettings:
    auto_sleep_enabled: bool = setting(Flag(), False, "put idle models to sleep automatically")
    idle_threshold_seconds: float = setting(NON_NEGATIVE, 300.0, "idle this long after the last request -> may sleep")
    check_interval_seconds: float = setting(POSITIVE, 60.0, (
        "the longest the idle loop waits between rounds (reconciling with the engines); it also runs at each "
        "idle deadline, so sleeps and stops are on time"))
    wakeup_on_request: bool = setting(Flag(), True, "a request for a sleeping model wakes it")
    #: Against thrashing.
    min_sleep_duration: float = setting(NON_NEGATIVE, 80.0, (
        "least time a model stays awake after a wake before the idle loop may sleep it again"))
    wake_timeout_seconds: float = setting(POSITIVE, 120.0, "a slower wake (or sleep) call fails")
    #: The idle loop only sleeps models with none in flight.
    drain_timeout_seconds: float = setting(POSITIVE, 60.0, "a manual sleep waits this long for running requests")
    vllm_sleep_mode: str = setting(Choice(VLLM_SLEEP_MODES), "wait", (
        "vLLM's sleep `mode` (kvcached's key): `wait` lets running requests finish, `abort` ends them"))
    vllm_sleep_timeout_seconds: Optional[float] = setting(POSITIVE, None, (
        "how long vLLM's sleep call may take (with `wait`, as long as its requests)"), shown="`wake_timeout_seconds`")
    idle_deep_sleep_seconds: Optional[float] = setting(POSITIVE, None, (
        "a model asleep at level 1 this long is deepened to level 2 where its engine can be (vLLM; SGLang's weights "
        "backup stays until a stop): its weights leave host RAM and its wake reloads them from disk"),
        shown="none (never deepened)")
