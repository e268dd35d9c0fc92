"""One owner per model for its life: admission, sleep and wake.

The proxy calls ``await lifecycle.admit()`` before picking a backend and
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
  and the idle loop backs off before its next try (`Lifecycle._sleep_failed`).
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
  ``mode``, so we always send ``mode=wait`` (after draining, as a second
  guard). 0.32 answers 200 ``{"status":"sleeping","level":N}`` and 400 for an
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
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import aiohttp

from router.config import SleepSettings

if TYPE_CHECKING:
    from router.config import Instance
    from router.engines import Call

log = logging.getLogger("router.lifecycle")

AWAKE = "awake"
DRAINING = "draining"
FALLING_ASLEEP = "falling_asleep"
SLEEPING = "sleeping"
WAKING = "waking"

#: Seconds a client is told to wait after a failed wake (Retry-After).
RETRY_AFTER_SECONDS = 5
#: Time limit of one ``/is_sleeping`` question.
ASK_TIMEOUT_SECONDS = 2.0
#: Longest pause of the idle loop's sleep attempts after failures in a row
#: (longer only if ``check_interval_seconds`` itself is).
MAX_SLEEP_BACKOFF_SECONDS = 3600.0


class ModelUnavailable(Exception):
    """The model cannot take requests now (e.g. its wake failed): answer 503."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class EngineCallError(Exception):
    """An engine control call failed; the message says which and why."""


@dataclass(frozen=True)
class Outcome:
    """Result of a sleep or wake, with the HTTP status the admin API answers."""

    ok: bool
    message: str
    status: int = 200


async def engine_call(session: aiohttp.ClientSession, inst: "Instance", call: "Call", timeout: float) -> None:
    """Run one control call on `inst`; raise EngineCallError unless it answers 2xx."""
    url = inst.url + call.path
    try:
        async with session.request(call.method, url, params=dict(call.params), json=call.json,
                                   headers=inst.auth_headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.read()
            if r.status >= 300:
                text = body[:300].decode("utf-8", "replace")
                raise EngineCallError(f"{inst.name}: {call.method} {call.path} answered {r.status}: {text}")
    except asyncio.TimeoutError:
        raise EngineCallError(f"{inst.name}: {call.method} {call.path} got no answer within {timeout:g}s") from None
    except aiohttp.ClientError as e:
        raise EngineCallError(f"{inst.name}: {call.method} {call.path} failed: {e}") from None


async def ask_is_sleeping(session: aiohttp.ClientSession, inst: "Instance", path: str) -> Optional[bool]:
    """The engine's own answer, or None when it cannot tell (down, no dev mode)."""
    try:
        async with session.get(inst.url + path, headers=inst.auth_headers,
                               timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_SECONDS)) as r:
            if r.status != 200:
                return None
            data: Any = await r.json(content_type=None)
    except (asyncio.TimeoutError, aiohttp.ClientError, ValueError):
        return None
    value = data.get("is_sleeping") if isinstance(data, dict) else None
    return value if isinstance(value, bool) else None


class Lifecycle:
    """Sleep state and admission of one model (all its replicas).

    Built by the model table with just the model name; the sleep manager then
    `bind`s it to the upstream session, the replicas and the settings. An
    unbound lifecycle admits everything and cannot sleep.
    """

    def __init__(self, model: str, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.state = AWAKE
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
        self.settings = SleepSettings()
        self.replicas: tuple["Instance", ...] = ()
        #: Replica name -> believed asleep.
        self.asleep: dict[str, bool] = {}
        self._clock = clock
        self._session: Optional[aiohttp.ClientSession] = None
        self._lock = asyncio.Lock()
        self._drained = asyncio.Event()
        self._sleep_task: Optional[asyncio.Task] = None
        self._wake_task: Optional[asyncio.Task] = None

    def bind(self, session: aiohttp.ClientSession, replicas: Sequence["Instance"], settings: SleepSettings) -> None:
        self._session = session
        self.replicas = tuple(replicas)
        self.settings = settings
        self.asleep = {i.name: self.asleep.get(i.name, False) for i in self.replicas}

    # ------------------------------------------------------------------ hot path

    async def admit(self) -> None:
        """Let one request in, waking the model first if it sleeps."""
        if self.state == AWAKE:
            self.in_flight += 1
            return
        await self._admit_slow()

    def release(self) -> None:
        self.in_flight -= 1
        self.last_end = self._clock()
        if self.in_flight == 0 and self.state == DRAINING:
            self._drained.set()

    async def _admit_slow(self) -> None:
        self.waiting += 1
        try:
            while self.state != AWAKE:
                if not self.settings.wakeup_on_request and self.state != WAKING:
                    if self.state == SLEEPING:
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
        return bool(self.replicas) and all(i.sleep for i in self.replicas)

    def idle_seconds(self, now: Optional[float] = None) -> float:
        """Time since the model was last used: the end of its last request or its last wake."""
        if self.in_flight:
            return 0.0
        now = self._clock() if now is None else now
        return now - max(self.last_end, self.last_wake_at or self.last_end)

    def auto_sleep_blocker(self, now: Optional[float] = None) -> Optional[str]:
        """Why the idle loop may not sleep this model now, or None if it may."""
        now = self._clock() if now is None else now
        s = self.settings
        if self._session is None:
            return "the sleep manager is not running"
        if not s.auto_sleep_enabled:
            return "auto sleep is disabled (sleep_manager.auto_sleep_enabled)"
        if not self.sleepable:
            return self._opt_out_reason()
        if self.state != AWAKE:
            return f"model is {self.state}"
        if self.in_flight or self.waiting:
            return f"{self.in_flight} requests in flight, {self.waiting} waiting"
        idle = self.idle_seconds(now)
        if idle < s.idle_threshold_seconds:
            return f"idle {idle:.1f}s of the {s.idle_threshold_seconds:g}s threshold"
        if self.last_wake_at is not None and now - self.last_wake_at < s.min_sleep_duration:
            return f"woke {now - self.last_wake_at:.1f}s ago; min_sleep_duration is {s.min_sleep_duration:g}s"
        if self.sleep_retry_at is not None and now < self.sleep_retry_at:
            return (f"the last {self.sleep_failures_in_row} sleeps failed (see last_error); next try in "
                    f"{self.sleep_retry_at - now:.1f}s")
        return None

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
        self.sleep_retry_at = self._clock() + pause
        return pause

    def _opt_out_reason(self) -> str:
        if not self.replicas:
            return "no replica to sleep"
        names = ", ".join(i.name for i in self.replicas if not i.sleep)
        return f"instance {names} has 'sleep: false', which keeps the model awake"

    async def sleep(self, manual: bool = True) -> Outcome:
        """Put every replica to sleep (drained first).

        `manual` is an operator's request; otherwise it is the idle loop's,
        and the auto-sleep rules are re-checked under the lock.
        """
        if self._sleep_task is None or self._sleep_task.done():
            self._sleep_task = asyncio.ensure_future(self._do_sleep(manual))
        return await asyncio.shield(self._sleep_task)

    async def wake(self) -> Outcome:
        """Wake every sleeping replica (shares a wake already under way)."""
        return await asyncio.shield(self._start_wake())

    def _start_wake(self) -> "asyncio.Task[Outcome]":
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.ensure_future(self._do_wake())
        return self._wake_task

    async def _do_sleep(self, manual: bool) -> Outcome:
        async with self._lock:
            if not manual:
                blocker = self.auto_sleep_blocker()
                if blocker:
                    return Outcome(False, f"not put to sleep: {blocker}", 409)
            if self._session is None:
                return Outcome(False, "the sleep manager is not running", 503)
            if self.state == SLEEPING:
                self.manual = self.manual or manual
                return Outcome(True, f"model {self.model!r} is already asleep")
            if not self.sleepable:
                return Outcome(False, f"model {self.model!r} is not put to sleep: {self._opt_out_reason()}", 409)
            self.state = DRAINING
            if self.in_flight:
                self._drained.clear()
                try:
                    await asyncio.wait_for(self._drained.wait(), self.settings.drain_timeout_seconds)
                except asyncio.TimeoutError:
                    self.state = AWAKE
                    return Outcome(False, f"model {self.model!r} still had {self.in_flight} requests in flight after "
                                          f"{self.settings.drain_timeout_seconds:g}s (drain_timeout_seconds); not put to sleep", 409)
            self.state = FALLING_ASLEEP
            targets = [i for i in self.replicas if not self.asleep[i.name]]
            errors = await self._call_all(targets, lambda i: i.spec.sleep_call)
            if errors:
                pause = self._sleep_failed()
                await self._roll_back([i for i in targets if i.name not in errors])
                self.state = SLEEPING if any(self.asleep.values()) else AWAKE
                return self._failed("sleep", errors, f"; the idle loop tries again in {pause:g}s at the earliest")
            self.sleep_failures_in_row = 0
            self.sleep_retry_at = None
            self.state = SLEEPING
            self.manual = manual
            self.slept_at = self._clock()
            self.sleep_count += 1
            log.info("model %s is asleep (%s)", self.model, "manual" if manual else "idle")
            return Outcome(True, f"model {self.model!r} is asleep")

    async def _roll_back(self, slept: Sequence["Instance"]) -> None:
        """Wake the replicas a failed sleep did put to sleep, so none is left behind."""
        if slept:
            errors = await self._call_all(slept, lambda i: i.spec.wake_call, asleep_after=False)
            if errors:
                log.warning("model %s: rolling back a failed sleep failed too: %s", self.model, "; ".join(errors.values()))

    async def _do_wake(self) -> Outcome:
        async with self._lock:
            if self.state == AWAKE:
                return Outcome(True, f"model {self.model!r} is already awake")
            if self._session is None:
                return Outcome(False, "the sleep manager is not running", 503)
            self.state = WAKING
            started = self._clock()
            targets = [i for i in self.replicas if self.asleep[i.name]]
            errors = await self._call_all(targets, lambda i: i.spec.wake_call, asleep_after=False)
            if errors:
                self.state = SLEEPING
                self.wake_failures += 1
                return self._failed("wake", errors)
            now = self._clock()
            self.state = AWAKE
            self.manual = False
            self.last_wake_at = now
            self.last_wake_seconds = now - started
            self.wake_seconds_total += now - started
            self.wake_count += 1
            log.info("model %s is awake after %.3fs", self.model, now - started)
            return Outcome(True, f"model {self.model!r} is awake after {now - started:.3f}s")

    async def _call_all(self, targets: Sequence["Instance"], call_of: Callable[["Instance"], "Call"],
                        asleep_after: bool = True) -> dict[str, str]:
        """Run one call per replica at once, within ``wake_timeout_seconds``.

        Replicas whose call succeeded are marked `asleep_after`; the errors of
        the others are returned by replica name.
        """
        assert self._session is not None
        timeout = self.settings.wake_timeout_seconds
        session = self._session
        results = await asyncio.gather(*(engine_call(session, i, call_of(i), timeout) for i in targets),
                                       return_exceptions=True)
        errors: dict[str, str] = {}
        for inst, res in zip(targets, results):
            if res is None:
                self.asleep[inst.name] = asleep_after
            elif isinstance(res, EngineCallError):
                errors[inst.name] = str(res)
            elif isinstance(res, BaseException):
                errors[inst.name] = f"{inst.name}: {type(res).__name__}: {res}"
        return errors

    def _failed(self, what: str, errors: dict[str, str], then: str = "") -> Outcome:
        self.last_error = "; ".join(errors.values())
        log.warning("model %s: %s failed: %s%s", self.model, what, self.last_error, then)
        return Outcome(False, f"could not {what} model {self.model!r}: {self.last_error}", 502)

    async def reconcile(self) -> None:
        """Align the state with what the engines say (where they can say)."""
        if self._session is None or self._lock.locked():
            return  # a transition is under way; it knows the state
        askable = [i for i in self.replicas if i.spec.is_sleeping_path]
        if not askable:
            return
        async with self._lock:
            if self.state not in (AWAKE, SLEEPING):
                return
            session = self._session
            answers = await asyncio.gather(*(ask_is_sleeping(session, i, i.spec.is_sleeping_path or "") for i in askable))
            for inst, answer in zip(askable, answers):
                if answer is not None:
                    self.asleep[inst.name] = answer
            now_asleep = any(self.asleep.values())
            if now_asleep and self.state == AWAKE:
                log.warning("model %s: engine reports it is asleep; routing will wake it", self.model)
                self.state = SLEEPING
                self.manual = False
                self.slept_at = self._clock()
                if self.in_flight and self.settings.wakeup_on_request:
                    self._start_wake()  # requests already sent are held by the engine: wake it for them
            elif not now_asleep and self.state == SLEEPING:
                log.warning("model %s: engine reports it is awake (woken or restarted outside the router)", self.model)
                self.state = AWAKE
                self.last_wake_at = self._clock()

    async def close(self) -> None:
        """Cancel transitions still running (router shutdown)."""
        for task in (self._sleep_task, self._wake_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    # ------------------------------------------------------------------ reports

    def status(self, now: Optional[float] = None) -> dict:
        """Everything /sleep/status, /health/all and /metrics show about this model."""
        now = self._clock() if now is None else now
        return {
            "state": self.state,
            "sleeping": self.state != AWAKE,
            "manual": self.manual,
            "sleepable": self.sleepable,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "idle_seconds": self.idle_seconds(now),
            "asleep_seconds": now - self.slept_at if self.state == SLEEPING and self.slept_at is not None else None,
            "sleep_count": self.sleep_count,
            "wake_count": self.wake_count,
            "sleep_failures": self.sleep_failures,
            "sleep_retry_in_seconds": max(0.0, self.sleep_retry_at - now) if self.sleep_retry_at is not None else None,
            "wake_failures": self.wake_failures,
            "last_wake_seconds": self.last_wake_seconds,
            "wake_seconds_total": self.wake_seconds_total,
            "last_error": self.last_error,
            "replicas": {name: ("asleep" if a else "awake") for name, a in self.asleep.items()},
        }


class SleepManager:
    """The idle loop: every ``check_interval_seconds``, reconcile each model
    with its engines, then put to sleep the models the rules allow.

    The app's lifespan calls `start()` after the upstream session exists (it
    binds every model's lifecycle and reconciles once before the first
    request) and `stop()` before the session closes.
    """

    def __init__(self, state: Any):
        self.state = state
        self._task: Optional[asyncio.Task] = None

    @property
    def settings(self) -> SleepSettings:
        return self.state.config.sleep

    def lifecycles(self) -> list[Lifecycle]:
        return [m.lifecycle for m in self.state.table]

    async def start(self) -> None:
        for model in self.state.table:
            model.lifecycle.bind(self.state.session, [b.instance for b in model.backends], self.settings)
        await self.reconcile()
        self._task = asyncio.create_task(self._loop(), name="sleep-manager")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.gather(*(lc.close() for lc in self.lifecycles()))

    async def reconcile(self) -> None:
        await asyncio.gather(*(lc.reconcile() for lc in self.lifecycles()))

    def candidates(self) -> list[Lifecycle]:
        """Models the idle loop would put to sleep now."""
        return [lc for lc in self.lifecycles() if lc.auto_sleep_blocker() is None]

    async def check(self) -> list[Outcome]:
        """One round of the idle loop; each sleep re-checks its rules under the model's lock."""
        await self.reconcile()
        return list(await asyncio.gather(*(lc.sleep(manual=False) for lc in self.candidates())))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_seconds)
            try:
                await self.check()
            except Exception:  # the loop must outlive any one bad round
                log.exception("sleep manager check failed")
