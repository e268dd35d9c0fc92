"""Sleep and wake of one model (all its replicas), and reconciling with what the engines say.

- sleep: state ``draining`` (new requests are held, not refused) until no
  request is in flight, then ``falling_asleep`` while every replica's sleep
  call runs, then ``sleeping``. A failed call rolls the slept replicas back,
  and the idle loop backs off before its next try (router/server/fleet/idle.py).
- wake: requests arriving at a sleeping model share ONE wake task (one wake
  call per replica however many requests arrive); they are admitted when it
  succeeds, and get `ModelUnavailable` (503 + Retry-After) when it fails or
  takes longer than ``wake_timeout_seconds``. A request arriving during a
  sleep call starts a wake that waits for the lock, i.e. for the sleep to
  finish, and then wakes the model.
- reconcile: asks each engine that can tell (vLLM ``GET /is_sleeping``)
  whether it sleeps, on start-up and on every idle-loop check, so a
  restarted router does not believe a sleeping engine is awake. SGLang cannot
  tell: for it the router's own memory is the state (router/engines/sglang.py).

Replicas: sleep and wake apply to every replica of the model. A model is
sleepable only if every replica allows it; one replica with ``sleep: false``
keeps the whole model awake (the idle loop skips it and a manual sleep is
refused with 409), since a half-asleep model would hold some requests behind
a wake and not others. If some replicas are found asleep and others awake,
the model counts as sleeping and the next request wakes the sleeping ones.
The engines' sleep and wake APIs are described in router/engines/vllm.py and
router/engines/sglang.py.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional, Sequence

from router.engines import Call
from router.server.fleet.control import EngineCallError
from router.server.fleet.costs import SLEEP, wake_kind
from router.server.fleet.follow import delegate
from router.server.fleet.life import DEEP_LEVEL, ModelLife, SleepCheck
from router.server.fleet.machine import (
    DRAIN_SLEEP,
    DRAIN_TIMEOUT,
    ENGINE_ASLEEP,
    ENGINE_AWAKE,
    FALL_ASLEEP,
    SLEEP_FAILED,
    SLEEP_FAILED_ASLEEP,
    SLEPT,
    WAKE,
    WAKE_FAILED,
    WOKE,
)
from router.server.fleet.outcome import Outcome
from router.server.fleet.replica import Replica
from router.server.fleet.tiers import run_steps
from router.util.states import AWAKE, FAILED, SLEEPING, STOPPED

log = logging.getLogger("router.lifecycle")

#: Longest pause of the idle loop's sleep attempts after failures in a row
#: (longer only if ``check_interval_seconds`` itself is).
MAX_SLEEP_BACKOFF_SECONDS = 3600.0

#: How a replica is asked to sleep or wake: the calls, in order (none: its engine has no sleep API), and
#: their time limit.
Request = Callable[[ModelLife, Replica], "tuple[tuple[Call, ...], float]"]


def begin_sleep(lc: ModelLife, check: Optional[SleepCheck]) -> "asyncio.Task[Outcome]":
    """The sleep under way, or a new one. Without `check` it is an operator's request; with it, the
    idle loop's, and `check` is asked again under the lock before anything is done."""
    if lc.sleep_task is None or lc.sleep_task.done():
        lc.sleep_task = asyncio.ensure_future(_do_sleep(lc, check))
    return lc.sleep_task


def begin_wake(lc: ModelLife) -> "asyncio.Task[Outcome]":
    """The wake under way (shared by every request that waits for it), or a new one."""
    if lc.wake_task is None or lc.wake_task.done():
        lc.wake_task = asyncio.ensure_future(_do_wake(lc))
    return lc.wake_task


async def _do_sleep(lc: ModelLife, check: Optional[SleepCheck]) -> Outcome:
    if lc.delegated():
        return await delegate(lc, "sleep", SLEEPING)
    async with lc.lock:
        if check is not None:
            blocker = check()
            if blocker:
                return Outcome(False, f"not put to sleep: {blocker}", 409)
        return await sleep_locked(lc, manual=check is None)


async def sleep_locked(lc: ModelLife, manual: bool) -> Outcome:
    """The sleep itself, under the lock the caller holds."""
    if not lc.control.is_open:
        return Outcome(False, "the sleep manager is not running", 503)
    if lc.state == SLEEPING:
        lc.manual = lc.manual or manual
        return Outcome(True, f"model {lc.model!r} is already asleep")
    if lc.state in (STOPPED, FAILED):
        return Outcome(False, f"model {lc.model!r} is stopped, not awake", 409)
    if not lc.sleepable:
        return Outcome(False, f"model {lc.model!r} is not put to sleep: {lc.opt_out_reason()}", 409)
    refused = await lc.drain(DRAIN_SLEEP, DRAIN_TIMEOUT, "put to sleep")
    if refused is not None:
        return refused
    lc.machine.fire(FALL_ASLEEP)
    falling_from = lc.clock()
    targets = [r for r in lc.members() if not r.asleep]
    errors = await call_all(lc, targets, sleep_request, asleep_after=True)
    if errors:
        pause = sleep_failed(lc)
        await _roll_back(lc, [r for r in targets if r.name not in errors])
        lc.machine.fire(SLEEP_FAILED_ASLEEP if any(r.asleep for r in lc.members()) else SLEEP_FAILED)
        return lc.failed("sleep", errors, f"; the idle loop tries again in {pause:g}s at the earliest")
    lc.sleep_failures_in_row = 0
    lc.sleep_retry_at = None
    lc.machine.fire(SLEPT)
    lc.manual = manual
    lc.slept_at = lc.clock()
    lc.sleep_count += 1
    lc.measured(SLEEP, lc.slept_at - falling_from, targets)
    log.info("model %s is asleep (%s)", lc.model, "manual" if manual else "idle")
    return Outcome(True, f"model {lc.model!r} is asleep")


def sleep_failed(lc: ModelLife) -> float:
    """Back off: an engine that cannot sleep (no sleep API, no memory to
    offload to) would otherwise be asked, and its refusal logged, at every
    check. The idle loop waits check_interval x 2, x 4, x 8... (at most an
    hour) after each failure in a row; requests and manual sleeps never wait.
    Returns the pause in seconds."""
    lc.sleep_failures += 1
    lc.sleep_failures_in_row += 1
    interval = lc.settings.check_interval_seconds
    pause = min(max(MAX_SLEEP_BACKOFF_SECONDS, interval), interval * 2.0 ** min(lc.sleep_failures_in_row, 32))
    lc.sleep_retry_at = lc.clock() + pause
    return pause


async def _roll_back(lc: ModelLife, slept: Sequence[Replica]) -> None:
    """Wake the replicas a failed sleep did put to sleep, so none is left behind."""
    if slept:
        errors = await call_all(lc, slept, wake_request, asleep_after=False)
        if errors:
            log.warning("model %s: rolling back a failed sleep failed too: %s", lc.model, "; ".join(errors.values()))


async def _do_wake(lc: ModelLife) -> Outcome:
    if lc.delegated():
        return await delegate(lc, "wakeup", AWAKE)
    async with lc.lock:
        if lc.state == AWAKE:
            return Outcome(True, f"model {lc.model!r} is already awake")
        if lc.state in (STOPPED, FAILED):
            return Outcome(False, f"model {lc.model!r} is stopped, not asleep; start it with "
                                  f"POST /action/start/{lc.model}", 409)
        if not lc.control.is_open:
            return Outcome(False, "the sleep manager is not running", 503)
        started = lc.clock()
        refused = await lc.room(WAKE)
        if refused is not None:
            return refused
        waking_from = lc.clock()
        targets = [r for r in lc.members() if r.asleep]
        tier = max((lc.wake_level(r) for r in targets), default=1)
        errors = await call_all(lc, targets, wake_request, asleep_after=False)
        if errors:
            lc.machine.fire(WAKE_FAILED)
            lc.wake_failures += 1
            return lc.failed("wake", errors)
        now = lc.clock()
        lc.machine.fire(WOKE)
        lc.manual = False
        lc.last_wake_at = now
        lc.last_wake_seconds = now - started
        lc.wake_seconds_total += now - started
        lc.wake_count += 1
        lc.measured(wake_kind(tier), now - waking_from, targets)
        for replica in targets:  # awake: a sleep found later by reconcile is at the configured level
            if lc.wake_level(replica) >= 2:
                replica.loras.lost()  # the weights were read again; adapters are loaded again on demand
                replica.events.publish("lora", "lost", replica.instance.model, replica.name)
            lc.slept_levels.pop(replica.name, None)
        log.info("model %s is awake after %.3fs", lc.model, now - started)
        return Outcome(True, f"model {lc.model!r} is awake after {now - started:.3f}s")


def sleep_request(lc: ModelLife, replica: Replica) -> tuple[tuple[Call, ...], float]:
    """The sleep call at the instance's `sleep_level`, which its wake will then use."""
    return _sleep_at(lc, replica, replica.instance.sleep_level)


def deepen_request(lc: ModelLife, replica: Replica) -> tuple[tuple[Call, ...], float]:
    """The sleep call of `DEEP_LEVEL`, sent to a replica asleep at a lighter one. It counts as deep even if
    the call fails: the deep wake is right after a light sleep too, the light one not after a deep one."""
    return _sleep_at(lc, replica, DEEP_LEVEL)


def _sleep_at(lc: ModelLife, replica: Replica, level: int) -> tuple[tuple[Call, ...], float]:
    s = lc.settings
    lc.slept_levels[replica.name] = level
    call, timeout = replica.instance.spec.sleep_request(
        level, s.vllm_sleep_mode, s.vllm_sleep_timeout_seconds or s.wake_timeout_seconds, s.wake_timeout_seconds)
    return ((call,) if call else ()), timeout


def wake_request(lc: ModelLife, replica: Replica) -> tuple[tuple[Call, ...], float]:
    """The wake steps of the level the replica sleeps at (router/engines/: `EngineSpec.wake_sequence`)."""
    return replica.instance.spec.wake_sequence(lc.wake_level(replica), replica.instance.model), \
        lc.settings.wake_timeout_seconds


async def call_all(lc: ModelLife, targets: Sequence[Replica], request: Request, asleep_after: bool) -> dict[str, str]:
    """Run each replica's calls at once (one replica's in order: router/server/fleet/tiers.py), each replica's
    within its time limit.

    Replicas whose call succeeded are marked `asleep_after`; the errors of
    the others are returned by replica name.
    """
    results = await asyncio.gather(*(_call(lc, r, *request(lc, r)) for r in targets), return_exceptions=True)
    errors: dict[str, str] = {}
    for replica, res in zip(targets, results):
        if res is None:
            replica.mark_asleep(asleep_after)
        elif isinstance(res, EngineCallError):
            errors[replica.name] = str(res)
        elif isinstance(res, BaseException):
            errors[replica.name] = f"{replica.name}: {type(res).__name__}: {res}"
    return errors


async def _call(lc: ModelLife, replica: Replica, steps: tuple[Call, ...], timeout: float) -> None:
    # No steps: sleepable() keeps such a model awake; a replica added by a reload may still meet it.
    await run_steps(lc.control, replica, steps, timeout, lc.clock)


async def reconcile(lc: ModelLife) -> None:
    """Align the state with what the engines say (where they can say)."""
    if not lc.control.is_open or lc.busy:
        return  # a transition is under way; it knows the state
    askable = [r for r in lc.members() if r.instance.spec.is_sleeping_path and r.running]
    if not askable:
        return
    async with lc.lock:
        if lc.state not in (AWAKE, SLEEPING):
            return
        answers = await asyncio.gather(*(lc.control.is_sleeping(r, r.instance.spec.is_sleeping_path or "")
                                         for r in askable))
        for replica, answer in zip(askable, answers):
            if answer is not None:
                replica.mark_asleep(answer)
        now_asleep = any(r.asleep for r in lc.members())
        if now_asleep and lc.state == AWAKE:
            log.warning("model %s: engine reports it is asleep; routing will wake it", lc.model)
            lc.machine.fire(ENGINE_ASLEEP)
            lc.manual = False
            lc.slept_at = lc.clock()
            if lc.in_flight and lc.settings.wakeup_on_request:
                begin_wake(lc)  # requests already sent are held by the engine: wake it for them
        elif not now_asleep and lc.state == SLEEPING:
            log.warning("model %s: engine reports it is awake (woken or restarted outside the router)", lc.model)
            lc.machine.fire(ENGINE_AWAKE)
            lc.last_wake_at = lc.clock()
