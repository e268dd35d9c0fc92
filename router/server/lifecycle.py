"""One owner per model for its life: admission, sleep and wake.

The proxy calls ``await lifecycle.admit()`` before picking a replica and
``lifecycle.release()`` when the request (or stream) has ended. While the
model is awake `admit` is a state check and a counter increment, with no
await, so the hot path pays nothing for sleep support.

Every transition (sleep, wake, reconciliation with the engine) runs under the
model's one `asyncio.Lock`, inside a task the lifecycle owns, and re-checks
the state after taking the lock, so no decision is made from a stale snapshot
and a client that disconnects cannot abandon a half-done transition:

- sleep: state ``draining`` (new requests are held, not refused) until no
  request is in flight, then ``falling_asleep`` while every replica's sleep
  call runs, then ``sleeping``. A failed call rolls the slept replicas back,
  and the idle loop backs off before its next try (router/server/idle.py).
- wake: requests arriving at a sleeping model share ONE wake task (one wake
  call per replica however many requests arrive); they are admitted when it
  succeeds, and get `ModelUnavailable` (503 + Retry-After) when it fails or
  takes longer than ``wake_timeout_seconds``. A request arriving during a
  sleep call starts a wake that waits for the lock, i.e. for the sleep to
  finish, and then wakes the model.
- reconcile: asks each engine that can tell (vLLM ``GET /is_sleeping``)
  whether it sleeps, on start-up and on every idle-loop check, so a
  restarted router does not believe a sleeping engine is awake.

Engine APIs, as verified (sources: vLLM ``vllm/entrypoints/serve/dev/sleep/
api_router.py`` and ``vllm/v1/engine/__init__.py``; SGLang ``python/sglang/
srt/entrypoints/http_server.py``, ``managers/io_struct.py`` and the
scheduler's ``release_memory_occupation``; vLLM docs ``features/sleep_mode``):

- vLLM ``POST /sleep``: query parameters ``level`` and, in recent versions
  (0.32 included), ``mode``: ``abort`` (the default) ends running requests
  at once, ``wait`` answers only once they have finished, ``keep`` freezes
  them until the wake. Older versions read only ``level`` and ignore
  ``mode``. We send ``sleep_manager.vllm_sleep_mode`` (kvcached's key;
  default ``wait``, after draining, as a second guard) and wait
  ``vllm_sleep_timeout_seconds`` for the answer. 0.32 answers 200 ``{"status":"sleeping","level":N}`` and 400 for an
  unknown level or mode (tests/real_vllm/FINDINGS.md); we only look at the
  status code.
- vLLM ``POST /wake_up``: optional repeated query parameter ``tags``
  (``weights``, ``kv_cache``); none wakes everything. 200 (0.32:
  ``{"status":"awake","tags":null}``), also when the engine was awake.
- vLLM ``GET /is_sleeping``: ``{"is_sleeping": true|false}``. All three exist
  only with ``VLLM_SERVER_DEV_MODE=1`` (and ``--enable-sleep-mode`` on GPU).
  While asleep, vLLM 0.32 still answers ``/health`` 200 and holds (neither
  answers nor refuses) generation requests until ``/wake_up``, so the router
  must know the state and wake the engine itself.
- SGLang ``POST /release_memory_occupation`` and ``POST
  /resume_memory_occupation``: JSON body ``{"tags": [...]}`` with ``tags``
  optional (absent/null = weights and KV cache); we send ``{}``, which every
  version accepts. Needs ``--enable-memory-saver``. Recent SGLang asserts the
  server is idle before releasing (hence drain first) and answers 400 with
  ``{"success": false, "message"}`` on failure.
- SGLang has NO call that says whether memory is released (no
  ``/is_sleeping``; ``/get_server_info`` does not report it), and resuming a
  server that was not released fails inside its scheduler. So for SGLang the
  router's own memory is the state: a router restarted while an SGLang engine
  was released believes it awake (documented in README "Sleep and wake").

Replicas: sleep and wake apply to every replica of the model. A model is
sleepable only if every replica allows it; one replica with ``sleep: false``
keeps the whole model awake (the idle loop skips it and a manual sleep is
refused with 409), since a half-asleep model would hold some requests behind
a wake and not others. If some replicas are found asleep and others awake,
the model counts as sleeping and the next request wakes the sleeping ones.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from router.config import SleepSettings
from router.engines import Call
from router.observe.events import Events
from router.server.control import EngineCallError, EngineControl
from router.server.replica import Replica

log = logging.getLogger("router.lifecycle")

AWAKE = "awake"
DRAINING = "draining"
FALLING_ASLEEP = "falling_asleep"
SLEEPING = "sleeping"
WAKING = "waking"

#: Seconds a client is told to wait after a failed wake (Retry-After).
RETRY_AFTER_SECONDS = 5
#: Longest pause of the idle loop's sleep attempts after failures in a row
#: (longer only if ``check_interval_seconds`` itself is).
MAX_SLEEP_BACKOFF_SECONDS = 3600.0


class ModelUnavailable(Exception):
    """The model cannot take requests now (e.g. its wake failed): answer 503."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Outcome:
    """Result of a sleep or wake, with the HTTP status the admin API answers."""

    ok: bool
    message: str
    status: int = 200


#: Why an automatic sleep may not happen now (None: it may); re-asked under the model's lock.
SleepCheck = Callable[[], Optional[str]]


class Lifecycle:
    """Sleep state and admission of one model (all its replicas).

    `members` gives the model's replicas as they are at each transition (a
    reload may change them); each replica keeps its own `asleep` flag, and
    this object the model-wide state and history.
    """

    def __init__(self, model: str, members: Callable[[], tuple[Replica, ...]], settings: SleepSettings,
                 control: EngineControl, events: Events, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.members = members
        self.settings = settings
        self.state = AWAKE
        #: Requests admitted and not finished (including those queued for a replica slot).
        self.in_flight = 0
        #: Requests held while the model drains, sleeps or wakes.
        self.waiting = 0
        #: When the last request ended (clock time); creation counts as one.
        self.last_end = clock()
        #: When the model last became awake through a wake, if ever.
        self.last_wake_at: Optional[float] = None
        self.slept_at: Optional[float] = None
        #: True when the current sleep was asked for through the admin API.
        self.manual = False
        self.sleep_count = 0
        self.wake_count = 0
        self.sleep_failures = 0
        #: Sleeps the engines refused since the last one that worked.
        self.sleep_failures_in_row = 0
        #: Before this clock time the idle loop does not try again (back-off).
        self.sleep_retry_at: Optional[float] = None
        self.wake_failures = 0
        self.last_wake_seconds: Optional[float] = None
        self.wake_seconds_total = 0.0
        self.last_error: Optional[str] = None
        self._control = control
        self._events = events
        self.clock = clock
        self._lock = asyncio.Lock()
        self._drained = asyncio.Event()
        self._sleep_task: Optional[asyncio.Task[Outcome]] = None
        self._wake_task: Optional[asyncio.Task[Outcome]] = None

    # ------------------------------------------------------------------ hot path

    async def admit(self) -> None:
        """Let one request in, waking the model first if it sleeps."""
        if self.state == AWAKE:
            self.in_flight += 1
            return
        await self._admit_slow()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_end = self.clock()
        if self.in_flight == 0 and self.state == DRAINING:
            self._drained.set()

    async def _admit_slow(self) -> None:
        self.waiting += 1
        try:
            while self.state != AWAKE:
                if not self.settings.wakeup_on_request and self.state != WAKING:
                    if self.state == SLEEPING or self._sleep_task is None:
                        raise ModelUnavailable(
                            f"model {self.model!r} is asleep and wakeup_on_request is off; wake it with "
                            f"POST /action/wakeup/{self.model}", RETRY_AFTER_SECONDS)
                    await asyncio.shield(self._sleep_task)  # draining or falling asleep
                    continue
                outcome = await asyncio.shield(self._start_wake())
                if not outcome.ok:
                    raise ModelUnavailable(outcome.message, RETRY_AFTER_SECONDS)
        finally:
            self.waiting -= 1
        self.in_flight += 1

    # --------------------------------------------------------------- transitions

    @property
    def sleepable(self) -> bool:
        replicas = self.members()
        return bool(replicas) and all(r.instance.sleep and r.instance.spec.has_sleep_api for r in replicas)

    def opt_out_reason(self) -> str:
        replicas = self.members()
        if not replicas:
            return "no replica to sleep"
        no_api = [r for r in replicas if not r.instance.spec.has_sleep_api]
        if no_api:
            return (f"instance {', '.join(r.name for r in no_api)}: engine '{no_api[0].instance.engine}' has no "
                    "sleep API, which keeps the model awake")
        names = ", ".join(r.name for r in replicas if not r.instance.sleep)
        return f"instance {names} has 'sleep: false', which keeps the model awake"

    def idle_seconds(self, now: Optional[float] = None) -> float:
        """Time since the model was last used: the end of its last request or its last wake."""
        if self.in_flight:
            return 0.0
        now = self.clock() if now is None else now
        return now - max(self.last_end, self.last_wake_at or self.last_end)

    @property
    def busy(self) -> bool:
        """A transition is under way (its lock is held)."""
        return self._lock.locked()

    async def sleep(self, check: Optional[SleepCheck] = None) -> Outcome:
        """Put every replica to sleep (drained first).

        Without `check` it is an operator's request; with it, the idle loop's,
        and `check` is asked again under the lock before anything is done.
        """
        if self._sleep_task is None or self._sleep_task.done():
            self._sleep_task = asyncio.ensure_future(self._do_sleep(check))
        return await asyncio.shield(self._sleep_task)

    async def wake(self) -> Outcome:
        """Wake every sleeping replica (shares a wake already under way)."""
        return await asyncio.shield(self._start_wake())

    def _start_wake(self) -> "asyncio.Task[Outcome]":
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.ensure_future(self._do_wake())
        return self._wake_task

    async def _do_sleep(self, check: Optional[SleepCheck]) -> Outcome:
        manual = check is None
        async with self._lock:
            if check is not None:
                blocker = check()
                if blocker:
                    return Outcome(False, f"not put to sleep: {blocker}", 409)
            if not self._control.is_open:
                return Outcome(False, "the sleep manager is not running", 503)
            if self.state == SLEEPING:
                self.manual = self.manual or manual
                return Outcome(True, f"model {self.model!r} is already asleep")
            if not self.sleepable:
                return Outcome(False, f"model {self.model!r} is not put to sleep: {self.opt_out_reason()}", 409)
            self._enter(DRAINING)
            if self.in_flight:
                self._drained.clear()
                try:
                    await asyncio.wait_for(self._drained.wait(), self.settings.drain_timeout_seconds)
                except asyncio.TimeoutError:
                    self._enter(AWAKE)
                    return Outcome(False, f"model {self.model!r} still had {self.in_flight} requests in flight after "
                                          f"{self.settings.drain_timeout_seconds:g}s (drain_timeout_seconds); not put to sleep", 409)
            self._enter(FALLING_ASLEEP)
            targets = [r for r in self.members() if not r.asleep]
            errors = await self._call_all(targets, self._sleep_request, asleep_after=True)
            if errors:
                pause = self._sleep_failed()
                await self._roll_back([r for r in targets if r.name not in errors])
                self._enter(SLEEPING if any(r.asleep for r in self.members()) else AWAKE)
                return self._failed("sleep", errors, f"; the idle loop tries again in {pause:g}s at the earliest")
            self.sleep_failures_in_row = 0
            self.sleep_retry_at = None
            self._enter(SLEEPING)
            self.manual = manual
            self.slept_at = self.clock()
            self.sleep_count += 1
            log.info("model %s is asleep (%s)", self.model, "manual" if manual else "idle")
            return Outcome(True, f"model {self.model!r} is asleep")

    async def _roll_back(self, slept: Sequence[Replica]) -> None:
        """Wake the replicas a failed sleep did put to sleep, so none is left behind."""
        if slept:
            errors = await self._call_all(slept, self._wake_request, asleep_after=False)
            if errors:
                log.warning("model %s: rolling back a failed sleep failed too: %s", self.model, "; ".join(errors.values()))

    async def _do_wake(self) -> Outcome:
        async with self._lock:
            if self.state == AWAKE:
                return Outcome(True, f"model {self.model!r} is already awake")
            if not self._control.is_open:
                return Outcome(False, "the sleep manager is not running", 503)
            self._enter(WAKING)
            started = self.clock()
            targets = [r for r in self.members() if r.asleep]
            errors = await self._call_all(targets, self._wake_request, asleep_after=False)
            if errors:
                self._enter(SLEEPING)
                self.wake_failures += 1
                return self._failed("wake", errors)
            now = self.clock()
            self._enter(AWAKE)
            self.manual = False
            self.last_wake_at = now
            self.last_wake_seconds = now - started
            self.wake_seconds_total += now - started
            self.wake_count += 1
            log.info("model %s is awake after %.3fs", self.model, now - started)
            return Outcome(True, f"model {self.model!r} is awake after {now - started:.3f}s")

    def _sleep_request(self, replica: Replica) -> tuple[Optional[Call], float]:
        s = self.settings
        return replica.instance.spec.sleep_request(s.vllm_sleep_mode, s.vllm_sleep_timeout_seconds or s.wake_timeout_seconds,
                                                   s.wake_timeout_seconds)

    def _wake_request(self, replica: Replica) -> tuple[Optional[Call], float]:
        return replica.instance.spec.wake_call, self.settings.wake_timeout_seconds

    async def _call_all(self, targets: Sequence[Replica], request: Callable[[Replica], tuple[Optional[Call], float]],
                        asleep_after: bool) -> dict[str, str]:
        """Run one call per replica at once, each within its time limit.

        Replicas whose call succeeded are marked `asleep_after`; the errors of
        the others are returned by replica name.
        """
        results = await asyncio.gather(*(self._call(r, *request(r)) for r in targets), return_exceptions=True)
        errors: dict[str, str] = {}
        for replica, res in zip(targets, results):
            if res is None:
                replica.asleep = asleep_after
            elif isinstance(res, EngineCallError):
                errors[replica.name] = str(res)
            elif isinstance(res, BaseException):
                errors[replica.name] = f"{replica.name}: {type(res).__name__}: {res}"
        return errors

    def _enter(self, state: str) -> None:
        """Move to `state` and tell the followers."""
        if state != self.state:
            self.state = state
            self._events.publish("model", state, self.model)

    def _sleep_failed(self) -> float:
        """Back off: an engine that cannot sleep (no sleep API, no memory to
        offload to) would otherwise be asked, and its refusal logged, at every
        check. The idle loop waits check_interval x 2, x 4, x 8... (at most an
        hour) after each failure in a row; requests and manual sleeps never wait.
        Returns the pause in seconds."""
        self.sleep_failures += 1
        self.sleep_failures_in_row += 1
        interval = self.settings.check_interval_seconds
        pause = min(max(MAX_SLEEP_BACKOFF_SECONDS, interval), interval * 2.0 ** min(self.sleep_failures_in_row, 32))
        self.sleep_retry_at = self.clock() + pause
        return pause

    async def _call(self, replica: Replica, call: Optional[Call], timeout: float) -> None:
        if call is None:  # sleepable() keeps such a model awake; a replica added by a reload may still meet it
            raise EngineCallError(f"{replica.name}: engine '{replica.instance.engine}' has no sleep API")
        await self._control.call(replica, call, timeout)

    def _failed(self, what: str, errors: dict[str, str], then: str = "") -> Outcome:
        self.last_error = "; ".join(errors.values())
        self._events.publish("model", f"{what}_failed", self.model, error=self.last_error)
        log.warning("model %s: %s failed: %s%s", self.model, what, self.last_error, then)
        return Outcome(False, f"could not {what} model {self.model!r}: {self.last_error}", 502)

    async def reconcile(self) -> None:
        """Align the state with what the engines say (where they can say)."""
        if not self._control.is_open or self._lock.locked():
            return  # a transition is under way; it knows the state
        askable = [r for r in self.members() if r.instance.spec.is_sleeping_path and r.running]
        if not askable:
            return
        async with self._lock:
            if self.state not in (AWAKE, SLEEPING):
                return
            answers = await asyncio.gather(*(self._control.is_sleeping(r, r.instance.spec.is_sleeping_path or "")
                                             for r in askable))
            for replica, answer in zip(askable, answers):
                if answer is not None:
                    replica.asleep = answer
            now_asleep = any(r.asleep for r in self.members())
            if now_asleep and self.state == AWAKE:
                log.warning("model %s: engine reports it is asleep; routing will wake it", self.model)
                self._enter(SLEEPING)
                self.manual = False
                self.slept_at = self.clock()
                if self.in_flight and self.settings.wakeup_on_request:
                    self._start_wake()  # requests already sent are held by the engine: wake it for them
            elif not now_asleep and self.state == SLEEPING:
                log.warning("model %s: engine reports it is awake (woken or restarted outside the router)", self.model)
                self._enter(AWAKE)
                self.last_wake_at = self.clock()

    async def close(self) -> None:
        """Cancel transitions still running (router shutdown, or the model removed by a reload)."""
        for task in (self._sleep_task, self._wake_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
