"""The idle policy: which models may be put to sleep (or stopped) now, and the loop that does it.

The loop runs at the next idle deadline (a model idle for
``idle_threshold_seconds`` or its ``idle_stop_seconds``, asleep for
``idle_deep_sleep_seconds``, `due_at`), and at least every
``check_interval_seconds``, when it also reconciles each model with its
engines. Every published state change (a wake, a start, a sleep, a reload)
makes it compute the next deadline again; a model with requests in flight
is looked at again a threshold later, since its idle time starts only when
its last request ends. Stops go through residency, as evictions
(router/server/fleet/residency.py); sleeps ask each model's lifecycle, which
asks the rules again under the model's lock (`Lifecycle.sleep(check=...)`),
so a request that arrived in between wins. The loop reads the live table at
each round, so a reload's models are covered at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from functools import partial
from typing import Callable, Optional

from router.config import SleepSettings
from router.observe.events import Events
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.outcome import ModelUnavailable, Outcome
from router.server.fleet.residency import Residency
from router.util.periodic import Periodic
from router.util.states import AWAKE, SLEEPING

log = logging.getLogger("router.idle")

#: The least time before the loop looks again at a model that serves requests (its idle rules wait for
#: their end, which it is not told of).
LOOK_AGAIN_SECONDS = 1.0


def sleep_blocker(lc: Lifecycle, running: bool, now: Optional[float] = None) -> Optional[str]:
    """Why the idle loop may not sleep this model now, or None if it may.

    `running`: whether the idle loop runs at all (the app's lifespan started it).
    """
    now = lc.clock() if now is None else now
    s: SleepSettings = lc.settings
    if not running:
        return "the sleep manager is not running"
    if not s.auto_sleep_enabled:
        return "auto sleep is disabled (sleep_manager.auto_sleep_enabled)"
    if lc.pinned:
        return "pinned (pin: true): never slept or stopped by a policy"
    if not lc.sleepable:
        return lc.opt_out_reason()
    if lc.state != AWAKE:
        return f"model is {lc.state}"
    if lc.in_flight or lc.waiting:
        return f"{lc.in_flight} requests in flight, {lc.waiting} waiting"
    idle = lc.idle_seconds(now)
    if idle < s.idle_threshold_seconds:
        return f"idle {idle:.1f}s of the {s.idle_threshold_seconds:g}s threshold"
    if lc.last_wake_at is not None and now - lc.last_wake_at < s.min_sleep_duration:
        return f"woke {now - lc.last_wake_at:.1f}s ago; min_sleep_duration is {s.min_sleep_duration:g}s"
    if lc.sleep_retry_at is not None and now < lc.sleep_retry_at:
        return (f"the last {lc.sleep_failures_in_row} sleeps failed (see last_error); next try in "
                f"{lc.sleep_retry_at - now:.1f}s")
    return None


def stop_due(model: Model, now: Optional[float] = None) -> bool:
    """Whether the model has been idle past its replicas' ``idle_stop_seconds`` (awake or asleep;
    never with a request in flight or waiting, never pinned)."""
    lc = model.lifecycle
    limits = [r.instance.idle_stop_seconds for r in model.replicas if r.instance.idle_stop_seconds is not None]
    if not limits or lc.pinned or not lc.stoppable or lc.state not in (AWAKE, SLEEPING) or lc.waiting:
        return False
    return lc.idle_seconds(now) >= min(limits)


def deepen_due(model: Model, after: Optional[float], now: Optional[float] = None) -> bool:
    """Whether a level-1 sleeper has slept `after` seconds (``idle_deep_sleep_seconds``) and can go to level 2."""
    lc = model.lifecycle
    if after is None or lc.slept_at is None or lc.pinned or not lc.deepenable:
        return False
    return (lc.clock() if now is None else now) - lc.slept_at >= after


def due_at(model: Model, deep_after: Optional[float], now: float) -> Optional[float]:
    """The earliest clock time at which an idle rule (`sleep_blocker`, `stop_due`, `deepen_due`) may next
    apply to the model, from what is known at `now`; None when none can before its state changes.

    A model with requests in flight or waiting gives `now` plus its shortest threshold: its idle time
    starts again when the last one ends, so no rule applies sooner, and looking again then tells the
    loop when that was (at least `LOOK_AGAIN_SECONDS` on, so a threshold of 0 does not make the loop
    spin while the model serves). A time already passed means due now.
    """
    lc = model.lifecycle
    s: SleepSettings = lc.settings
    if lc.pinned:
        return None
    active = bool(lc.in_flight or lc.waiting)
    since = now - lc.idle_seconds(now)  # when the model was last used
    times: list[float] = []
    if s.auto_sleep_enabled and lc.sleepable:
        if active:
            times.append(now + max(s.idle_threshold_seconds, LOOK_AGAIN_SECONDS))
        elif lc.state == AWAKE:
            times.append(max(since + s.idle_threshold_seconds,
                             -math.inf if lc.last_wake_at is None else lc.last_wake_at + s.min_sleep_duration,
                             -math.inf if lc.sleep_retry_at is None else lc.sleep_retry_at))
    limits = [r.instance.idle_stop_seconds for r in model.replicas if r.instance.idle_stop_seconds is not None]
    if limits and lc.stoppable:
        if active:
            times.append(now + max(min(limits), LOOK_AGAIN_SECONDS))
        elif lc.state in (AWAKE, SLEEPING):
            times.append(since + min(limits))
    if deep_after is not None and lc.deepenable and lc.slept_at is not None:
        times.append(lc.slept_at + deep_after)
    return min(times, default=None)


class IdleSleeper:
    """The idle loop over the live table (`table()` is read at every round). With `events`, every state
    change published there makes it compute its next deadline again."""

    def __init__(self, table: Callable[[], ModelTable], settings: Callable[[], SleepSettings], residency: Residency,
                 decides: Callable[[], bool] = lambda: True, events: Optional[Events] = None,
                 clock: Callable[[], float] = time.monotonic):
        self._table = table
        self._settings = settings
        self._residency = residency
        #: Whether this router makes lifecycle decisions now (not while it follows a leader).
        self._decides = decides
        self._clock = clock
        #: When the last round made its decisions: a deadline at or before it had its chance then (one
        #: that failed is tried again at the next interval, not at once and again).
        self._decided_at = -math.inf
        self._loop = Periodic("idle-sleeper", self.check, lambda: settings().check_interval_seconds, log,
                              first_at_once=False, sooner=self.next_in)
        if events is not None:
            events.listen(lambda _: self._loop.poke())

    @property
    def running(self) -> bool:
        return self._loop.running

    def blocker(self, model: Model) -> Optional[str]:
        return sleep_blocker(model.lifecycle, self.running)

    def candidates(self) -> list[Model]:
        """Models the idle loop would put to sleep now."""
        return [m for m in self._table() if self.blocker(m) is None]

    def next_due(self) -> Optional[float]:
        """The clock time of the next idle deadline not yet looked at (None: none known)."""
        if not self._decides():
            return None
        now, deep = self._clock(), self._settings().idle_deep_sleep_seconds
        times = [t for t in (due_at(m, deep, now) for m in self._table()) if t is not None and t > self._decided_at]
        return min(times, default=None)

    def next_in(self) -> Optional[float]:
        """Seconds until `next_due` (0: due now), for the loop's wait."""
        due = self.next_due()
        return None if due is None else max(0.0, due - self._clock())

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def reconcile(self) -> None:
        await asyncio.gather(*(m.lifecycle.reconcile() for m in self._table()))

    async def check(self) -> list[Outcome]:
        """One round of the idle loop: stop the models idle past idle_stop_seconds, sleep the ones the
        rules allow (each re-checks its rules under the model's lock, after room was made in host memory)."""
        await self.reconcile()
        if not self._decides():
            return []
        try:
            await self._residency.enforce_groups()
        except ModelUnavailable as e:
            log.warning("exclusive group: %s", e.message)
        self._decided_at = self._clock()
        stops = [m for m in self._table() if stop_due(m)]
        outcomes = list(await asyncio.gather(*(self._residency.stop_idle(m, partial(stop_due, m)) for m in stops)))
        deep = [m for m in self._table() if m not in stops and deepen_due(m, self._settings().idle_deep_sleep_seconds)]
        outcomes += await asyncio.gather(*(m.lifecycle.deepen("idle_deep_sleep") for m in deep))
        return outcomes + list(await asyncio.gather(*(self.sleep(m) for m in self.candidates() if m not in stops)))

    async def sleep(self, model: Model) -> Outcome:
        try:
            await self._residency.make_host_room(model)
        except ModelUnavailable as e:
            return Outcome(False, e.message, 503)
        return await model.lifecycle.sleep(check=lambda: self.blocker(model))
