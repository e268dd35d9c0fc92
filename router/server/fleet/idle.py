"""The idle policy: which models may be put to sleep (or stopped) now, and the loop that does it.

Every ``check_interval_seconds`` the loop reconciles each model with its
engines, then asks each model's lifecycle to sleep the ones the rules allow.
The rules are asked again by the lifecycle under the model's lock
(`Lifecycle.sleep(check=...)`), so a request that arrived in between wins.
The loop reads the live table at each round, so a reload's models are
covered from the next round on.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from router.config import SleepSettings
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.outcome import ModelUnavailable, Outcome
from router.server.fleet.residency import Residency
from router.util.periodic import Periodic
from router.util.states import AWAKE, SLEEPING

log = logging.getLogger("router.idle")


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


class IdleSleeper:
    """The idle loop over the live table (`table()` is read at every round)."""

    def __init__(self, table: Callable[[], ModelTable], settings: Callable[[], SleepSettings], residency: Residency,
                 decides: Callable[[], bool] = lambda: True):
        self._table = table
        self._residency = residency
        #: Whether this router makes lifecycle decisions now (not while it follows a leader).
        self._decides = decides
        self._loop = Periodic("idle-sleeper", self.check, lambda: settings().check_interval_seconds, log,
                              first_at_once=False)

    @property
    def running(self) -> bool:
        return self._loop.running

    def blocker(self, model: Model) -> Optional[str]:
        return sleep_blocker(model.lifecycle, self.running)

    def candidates(self) -> list[Model]:
        """Models the idle loop would put to sleep now."""
        return [m for m in self._table() if self.blocker(m) is None]

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
        stops = [m for m in self._table() if stop_due(m)]
        outcomes = list(await asyncio.gather(*(m.lifecycle.evict(stop=True, reason="idle_stop") for m in stops)))
        return outcomes + list(await asyncio.gather(*(self.sleep(m) for m in self.candidates() if m not in stops)))

    async def sleep(self, model: Model) -> Outcome:
        try:
            await self._residency.make_host_room(model)
        except ModelUnavailable as e:
            return Outcome(False, e.message, 503)
        return await model.lifecycle.sleep(check=lambda: self.blocker(model))
