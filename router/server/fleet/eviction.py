"""Eviction: a model put to sleep, to a deeper sleep, or stopped to make room for another
(router/server/fleet/residency.py)."""
from __future__ import annotations

import logging
from typing import Mapping, Optional

from router.server.fleet.life import DEEP_LEVEL, ModelLife
from router.server.fleet.outcome import Outcome
from router.server.fleet.sleepwake import call_all, deepen_request, sleep_locked
from router.server.fleet.startstop import stop_locked

log = logging.getLogger("router.lifecycle")


async def evict(lc: ModelLife, stop: bool, reason: str, drain: bool = False,
                why: Optional[Mapping[str, object]] = None) -> Outcome:
    """Put a model to sleep (or stop it) in the caller's task.

    The lock is taken at once or not at all (a model in a transition is busy,
    not a candidate), so the caller, who holds the placement lock, never waits
    on a model that may be waiting for that same lock. Without `drain` only
    an idle model is taken; with it (a switch to a waiting model) running requests finish first.
    `why` (the choice's cost and explanation) goes into the published event.
    """
    if lc.busy or (not drain and (lc.in_flight or lc.waiting)):
        return Outcome(False, f"model {lc.model!r} is busy", 409)
    async with lc.lock:
        outcome = await (stop_locked(lc, reason) if stop else sleep_locked(lc, manual=False))
    if outcome.ok:
        lc.events.publish("model", "evicted", lc.model, None,
                          **{"action": "stop" if stop else "sleep", "reason": reason, **(why or {})})
    return outcome


async def deepen(lc: ModelLife, reason: str, why: Optional[Mapping[str, object]] = None) -> Outcome:
    """Move a level-1 sleep to `DEEP_LEVEL`, so its weights leave host RAM while its engine stays up, in
    the caller's task (the lock is taken at once or not at all, as for `evict`). The state stays sleeping."""
    if lc.busy:
        return Outcome(False, f"model {lc.model!r} is busy", 409)
    async with lc.lock:
        if not lc.deepenable:
            return Outcome(False, f"model {lc.model!r} cannot be put to a deeper sleep", 409)
        errors = await call_all(lc, lc.lighter(), deepen_request, asleep_after=True)
        if errors:
            return lc.failed("deepen", errors)
    lc.events.publish("model", "deepened", lc.model, None, **{"level": DEEP_LEVEL, "reason": reason, **(why or {})})
    log.info("model %s sleeps at level %d now (%s)", lc.model, DEEP_LEVEL, reason)
    return Outcome(True, f"model {lc.model!r} sleeps at level {DEEP_LEVEL}")
