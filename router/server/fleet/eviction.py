"""Eviction: a model put to sleep (or stopped) to make room for another (router/server/fleet/residency.py)."""
from __future__ import annotations

from router.server.fleet.life import ModelLife
from router.server.fleet.outcome import Outcome
from router.server.fleet.sleepwake import sleep_locked
from router.server.fleet.startstop import stop_locked


async def evict(lc: ModelLife, stop: bool, reason: str, drain: bool = False) -> Outcome:
    """Put a model to sleep (or stop it) in the caller's task.

    The lock is taken at once or not at all (a model in a transition is busy,
    not a candidate), so the caller, who holds the placement lock, never waits
    on a model that may be waiting for that same lock. Without `drain` only
    an idle model is taken; with it (a group swap) running requests finish first.
    """
    if lc.busy or (not drain and (lc.in_flight or lc.waiting)):
        return Outcome(False, f"model {lc.model!r} is busy", 409)
    async with lc.lock:
        outcome = await (stop_locked(lc, reason) if stop else sleep_locked(lc, manual=False))
    if outcome.ok:
        lc.events.publish("model", "evicted", lc.model, action="stop" if stop else "sleep", reason=reason)
    return outcome
