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
  and the idle loop backs off before its next try (router/server/fleet/idle.py).
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
from typing import Callable, Optional, Protocol, Sequence

from router.config import RouterSettings, SleepSettings
from router.engines import Call
from router.observe.events import Events
from router.server.fleet.control import EngineCallError, EngineControl
from router.server.fleet.replica import Replica

log = logging.getLogger("router.lifecycle")

#: A replica that passed its health check during a start is healthy at once.
_HEALTHY_AT_ONCE = RouterSettings(healthy_threshold=1)

AWAKE = "awake"
DRAINING = "draining"
FALLING_ASLEEP = "falling_asleep"
SLEEPING = "sleeping"
WAKING = "waking"
#: Residency: an on-demand model's engines are stopped until a request starts them.
STOPPED = "stopped"
STARTING = "starting"
STOPPING = "stopping"
#: The last start failed; the next request tries again.
FAILED = "failed"
#: States in which the model's engines hold (or are about to hold) their GPU memory.
HOLDING_GPU = frozenset({AWAKE, DRAINING, FALLING_ASLEEP, WAKING, STARTING, STOPPING})
#: supervisord states of a process that went down while it was being started.
START_FAILED = frozenset({"FATAL", "BACKOFF", "EXITED"})
#: Down, and not on its way up: the engines of a stopped model.
PROCESS_DOWN = frozenset({"STOPPED", "EXITED", "FATAL", "REMOVED"})
#: How often a start looks at the engines' health and process states.
START_POLL_SECONDS = 0.25
#: Lines of an engine's log quoted in the 503 of a failed start.
LOG_LINES = 5

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


class Placement(Protocol):
    """Who decides where memory goes (router/server/fleet/residency.py): asked before a start or a
    wake, while the model still counts as holding nothing. Raises ModelUnavailable when no
    room can be made."""

    async def make_room(self, lc: "Lifecycle") -> None: ...


class NoPlacement:
    """No residency block: every start and wake fits."""

    async def make_room(self, lc: "Lifecycle") -> None:
        return None


class Peers(Protocol):
    """Other processes that admit requests for this model on their own while it is awake (proxy
    workers, router/server/workers/link.py). Asked after the model leaves AWAKE, before in-flight counts
    are trusted: returns once every peer has seen the new state and reported what it has in flight."""

    async def fence(self) -> None: ...


class Authority(Protocol):
    """Who decides the model's transitions when router replicas share the engines
    (router/server/fleet/leadership.py): this router while it leads, else the leader it asks."""

    def local(self) -> bool: ...

    async def ask(self, model: str, action: str) -> "Outcome": ...


class NoPeers:
    """One process: this lifecycle sees every request itself."""

    async def fence(self) -> None:
        return None


class Lifecycle:
    """Sleep state and admission of one model (all its replicas).

    `members` gives the model's replicas as they are at each transition (a
    reload may change them); each replica keeps its own `asleep` flag, and
    this object the model-wide state and history.
    """

    def __init__(self, model: str, members: Callable[[], tuple[Replica, ...]], settings: SleepSettings,
                 control: EngineControl, events: Events, placement: Placement = NoPlacement(),
                 start_timeout: float = 900.0, clock: Callable[[], float] = time.monotonic,
                 peers: Peers = NoPeers(), authority: Optional[Authority] = None):
        self.model = model
        self.members = members
        self.settings = settings
        self.placement = placement
        self.peers = peers
        #: None: this router alone decides.
        self.authority = authority
        self.start_timeout = start_timeout
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
        self.start_count = 0
        self.stop_count = 0
        self.start_failures = 0
        self.last_start_seconds: Optional[float] = None
        self._control = control
        self._events = events
        self.clock = clock
        self._lock = asyncio.Lock()
        self._drained = asyncio.Event()
        self._sleep_task: Optional[asyncio.Task[Outcome]] = None
        self._wake_task: Optional[asyncio.Task[Outcome]] = None
        self._start_task: Optional[asyncio.Task[Outcome]] = None
        self._stop_task: Optional[asyncio.Task[Outcome]] = None

    # ------------------------------------------------------------------ hot path

    async def admit(self) -> None:
        """Let one request in, waking the model first if it sleeps."""
        if self.state == AWAKE:
            self.in_flight += 1
            return
        await self._admit_slow()

    def release(self) -> None:
        self.count(-1)

    def count(self, delta: int) -> None:
        """`delta` more requests in flight (here or, from router/server/workers/link.py, in a proxy worker);
        fewer means some ended now."""
        self.in_flight += delta
        if delta < 0:
            self.last_end = self.clock()
            if self.in_flight == 0 and self.state in (DRAINING, STOPPING):
                self._drained.set()

    async def _admit_slow(self) -> None:
        await self.ready()
        self.in_flight += 1

    async def ready(self) -> None:
        """Return once the model is awake, starting or waking it first as needed; ModelUnavailable
        when it cannot be. Nothing awaits between the last check and the return, so the caller's
        admission (or a proxy worker's, told at once) happens while the model is still awake."""
        self.waiting += 1
        try:
            while self.state != AWAKE:
                state = self.state
                if state in (STOPPED, FAILED, STARTING, STOPPING) and self.startable:
                    # One start for all; made after a stop under way ends (it waits for the lock).
                    outcome = await asyncio.shield(self._begin_start())
                    if not outcome.ok:
                        raise ModelUnavailable(outcome.message, RETRY_AFTER_SECONDS)
                    continue
                if state in (STOPPED, FAILED, STOPPING):
                    raise ModelUnavailable(f"model {self.model!r} is stopped; start it with "
                                           f"POST /action/start/{self.model}", RETRY_AFTER_SECONDS)
                if not self.settings.wakeup_on_request and state != WAKING:
                    if state == SLEEPING:
                        raise ModelUnavailable(
                            f"model {self.model!r} is asleep and wakeup_on_request is off; wake it with "
                            f"POST /action/wakeup/{self.model}", RETRY_AFTER_SECONDS)
                    async with self._lock:  # draining or falling asleep: let the transition finish
                        pass
                    continue
                outcome = await asyncio.shield(self._start_wake())
                if not outcome.ok:
                    raise ModelUnavailable(outcome.message, RETRY_AFTER_SECONDS)
        finally:
            self.waiting -= 1

    # --------------------------------------------------------------- transitions

    @property
    def startable(self) -> bool:
        """Whether a request may start the model: every replica is on demand under this router's supervisord."""
        replicas = self.members()
        return self._control.can_start and bool(replicas) and all(r.instance.on_demand for r in replicas)

    @property
    def stoppable(self) -> bool:
        """Whether the model's engines can be stopped and started again by the router."""
        replicas = self.members()
        return self._control.can_start and bool(replicas) and all(r.instance.launch for r in replicas)

    @property
    def pinned(self) -> bool:
        return any(r.instance.pin for r in self.members())

    @property
    def last_used(self) -> float:
        """When the model was last used (a request's end, a wake or a start), for least-recently-used order."""
        return self.clock() if self.in_flight else max(self.last_end, self.last_wake_at or self.last_end)

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

    # ------------------------------------------------------------------ residency

    async def start(self) -> Outcome:
        """Start the model's stopped engines (one start however many ask) and wait until they are healthy."""
        return await asyncio.shield(self._begin_start())

    def _begin_start(self) -> "asyncio.Task[Outcome]":
        if self._start_task is None or self._start_task.done():
            self._start_task = asyncio.ensure_future(self._do_start())
        return self._start_task

    async def stop(self, reason: str = "manual") -> Outcome:
        """Stop the model's engines (drained first); a request then starts them again if on demand."""
        if self._stop_task is None or self._stop_task.done():
            self._stop_task = asyncio.ensure_future(self._do_stop(reason))
        return await asyncio.shield(self._stop_task)

    async def _do_start(self) -> Outcome:
        if self._delegated():
            return await self._delegate("start", AWAKE)
        async with self._lock:
            if self.state in HOLDING_GPU or self.state == SLEEPING:
                return Outcome(True, f"model {self.model!r} is {self.state}, not stopped")
            if not self.stoppable:
                return Outcome(False, f"model {self.model!r} cannot be started by the router: its engines are "
                                      "not run by this router's supervisord", 409)
            began = self.clock()
            try:
                await self.placement.make_room(self)
            except ModelUnavailable as e:
                return Outcome(False, e.message, 503)
            self._enter(STARTING)
            failure = await self._bring_up(began)
            if failure is not None:
                self.start_failures += 1
                self.last_error = failure
                self._enter(FAILED)
                self._events.publish("model", "start_failed", self.model, error=failure)
                log.warning("model %s: start failed: %s", self.model, failure)
                return Outcome(False, failure, 503)
            now = self.clock()
            self.last_wake_at = now
            self.last_start_seconds = now - began
            self.start_count += 1
            self._enter(AWAKE)
            log.info("model %s is up after %.3fs", self.model, now - began)
            return Outcome(True, f"model {self.model!r} is up after {now - began:.3f}s")

    async def _bring_up(self, began: float) -> Optional[str]:
        """Start every replica's program and wait for each to pass its health check; None when all did,
        else why not (naming the instance, its process state and the last lines of its log)."""
        pending = list(self.members())
        try:
            for replica in pending:
                replica.asleep = False
                await self._control.start_program(replica)
        except EngineCallError as e:
            return str(e)
        timeout = max((r.instance.start_timeout_seconds or self.start_timeout) for r in pending)
        while pending:
            for replica in list(pending):
                process = replica.process
                if process is not None and process.state in START_FAILED:
                    await self._control.stop_program(replica)  # no more retries by supervisord
                    lines = "\n".join(process.log_tail(LOG_LINES))
                    return (f"instance {replica.name} went {process.state} while starting ({process.description}); "
                            f"log {process.logfile}:\n{lines}")
                ok, _ = await self._control.probe(replica, START_POLL_SECONDS * 4)
                if ok:
                    replica.record_probe(True, _HEALTHY_AT_ONCE)
                    pending.remove(replica)
            if pending and self.clock() - began > timeout:
                for replica in pending:
                    await self._control.stop_program(replica)
                return (f"instance {', '.join(r.name for r in pending)} did not pass its health check within "
                        f"{timeout:g}s of its start (start_timeout_seconds)")
            if pending:
                await asyncio.sleep(START_POLL_SECONDS)
        return None

    async def _do_stop(self, reason: str) -> Outcome:
        if self._delegated():
            return await self._delegate("stop", STOPPED)
        async with self._lock:
            return await self._stop_locked(reason)

    async def _stop_locked(self, reason: str) -> Outcome:
        if self.state in (STOPPED, FAILED):
            return Outcome(True, f"model {self.model!r} is already stopped")
        if not self.stoppable:
            return Outcome(False, f"model {self.model!r} cannot be stopped by the router: its engines are not run "
                                  "by this router's supervisord", 409)
        was = self.state
        refused = await self._drain(STOPPING, was, "stopped")
        if refused is not None:
            return refused
        errors: dict[str, str] = {}
        for replica in self.members():
            try:
                await self._control.stop_program(replica)
                replica.asleep = False
            except EngineCallError as e:
                errors[replica.name] = str(e)
        if errors:
            self._enter(was)
            return self._failed("stop", errors)
        self.stop_count += 1
        self._enter(STOPPED)
        log.info("model %s is stopped (%s)", self.model, reason)
        return Outcome(True, f"model {self.model!r} is stopped")

    async def evict(self, stop: bool, reason: str, drain: bool = False) -> Outcome:
        """Put a model to sleep (or stop it) to make room for another, in the caller's task.

        The lock is taken at once or not at all (a model in a transition is busy,
        not a candidate), so the caller, who holds the placement lock, never waits
        on a model that may be waiting for that same lock. Without `drain` only
        an idle model is taken; with it (a group swap) running requests finish first.
        """
        if self._lock.locked() or (not drain and (self.in_flight or self.waiting)):
            return Outcome(False, f"model {self.model!r} is busy", 409)
        async with self._lock:
            outcome = await (self._stop_locked(reason) if stop else self._sleep_locked(manual=False))
        if outcome.ok:
            self._events.publish("model", "evicted", self.model, action="stop" if stop else "sleep", reason=reason)
        return outcome

    def process_changed(self) -> None:
        """supervisord's view moved: a model whose engines all went down is stopped; one whose
        engines all came up outside the router (supervisorctl start, --apply) is awake."""
        if self._lock.locked() or not self.startable:
            return
        replicas = self.members()
        down = all(r.process is not None and r.process.state in PROCESS_DOWN for r in replicas)
        up = all(r.process is not None and r.process.running for r in replicas)
        if down and self.state in (AWAKE, SLEEPING):
            for replica in replicas:
                replica.asleep = False
            self._enter(STOPPED)
        elif up and self.state in (STOPPED, FAILED):
            self.last_wake_at = self.clock()
            self._enter(AWAKE)

    async def _do_sleep(self, check: Optional[SleepCheck]) -> Outcome:
        if self._delegated():
            return await self._delegate("sleep", SLEEPING)
        async with self._lock:
            if check is not None:
                blocker = check()
                if blocker:
                    return Outcome(False, f"not put to sleep: {blocker}", 409)
            return await self._sleep_locked(manual=check is None)

    async def _sleep_locked(self, manual: bool) -> Outcome:
        """The sleep itself, under the lock the caller holds."""
        if not self._control.is_open:
            return Outcome(False, "the sleep manager is not running", 503)
        if self.state == SLEEPING:
            self.manual = self.manual or manual
            return Outcome(True, f"model {self.model!r} is already asleep")
        if not self.sleepable:
            return Outcome(False, f"model {self.model!r} is not put to sleep: {self.opt_out_reason()}", 409)
        refused = await self._drain(DRAINING, AWAKE, "put to sleep")
        if refused is not None:
            return refused
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
        if self._delegated():
            return await self._delegate("wakeup", AWAKE)
        async with self._lock:
            if self.state == AWAKE:
                return Outcome(True, f"model {self.model!r} is already awake")
            if self.state in (STOPPED, FAILED):
                return Outcome(False, f"model {self.model!r} is stopped, not asleep; start it with "
                                      f"POST /action/start/{self.model}", 409)
            if not self._control.is_open:
                return Outcome(False, "the sleep manager is not running", 503)
            started = self.clock()
            try:
                await self.placement.make_room(self)
            except ModelUnavailable as e:
                return Outcome(False, e.message, 503)
            self._enter(WAKING)
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

    def _delegated(self) -> bool:
        return self.authority is not None and not self.authority.local()

    async def _delegate(self, action: str, then: str) -> Outcome:
        """Ask the leading router to do `action`; once it has, the model is `then` here too."""
        assert self.authority is not None
        outcome = await self.authority.ask(self.model, action)
        if outcome.ok:
            self.follow(then)
        else:
            self.last_error = outcome.message
        return outcome

    def follow(self, state: str) -> None:
        """Take the leading router's word on the model (after it acted, or for engines that cannot
        say whether they sleep)."""
        if state == self.state or state not in (AWAKE, SLEEPING, STOPPED) or self._lock.locked():
            return
        for replica in self.members():
            replica.asleep = state == SLEEPING
        if state == AWAKE:
            self.last_wake_at = self.clock()
        elif state == SLEEPING:
            self.slept_at = self.clock()
        self._enter(state)

    def touch(self) -> None:
        """Used now, by a request another router serves (its idle time starts again)."""
        self.last_end = max(self.last_end, self.clock())

    def _enter(self, state: str) -> None:
        """Move to `state` and tell the followers."""
        if state != self.state:
            self.state = state
            self._events.publish("model", state, self.model)

    async def _drain(self, state: str, back_to: str, what: str) -> Optional[Outcome]:
        """Enter `state` (new requests wait) until the requests in flight end; if they do not within
        ``drain_timeout_seconds``, go back to `back_to` and return the refusal."""
        self._enter(state)
        await self.peers.fence()
        if self.in_flight:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), self.settings.drain_timeout_seconds)
            except asyncio.TimeoutError:
                self._enter(back_to)
                return Outcome(False, f"model {self.model!r} still had {self.in_flight} requests in flight after "
                                      f"{self.settings.drain_timeout_seconds:g}s (drain_timeout_seconds); not {what}", 409)
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
        for task in (self._sleep_task, self._wake_task, self._start_task, self._stop_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
