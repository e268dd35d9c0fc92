"""Which model makes room: the one whose eviction is expected to cost least, weighted by recency.

Evicting a model costs nothing now but the time to bring it back when it is
next wanted: a level-1 wake takes seconds, a level-2 wake more, a cold start
minutes (router/server/fleet/costs.py measures each). How soon it is wanted
again is unknown; the model's idle time is the best guess at hand, and the
longer a model has gone unused the less likely it is wanted in the next
moment. So each candidate is scored by its cost to bring back divided by its
idle time (cost per idle second, the idle time at least `MIN_IDLE_SECONDS`),
and the lowest goes. With equal costs this is least recently used; a model
that only a cold start brings back is kept over a slightly older one that
wakes in a second. Pure: residency builds the candidates, this module picks
and explains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

#: Idle times below this count as this, so a model used a moment ago does not score infinity.
MIN_IDLE_SECONDS = 1.0


@dataclass(frozen=True)
class Candidate:
    """A model that may be evicted by `action`, and what bringing it back is estimated to cost."""

    model: str
    action: str
    #: The measured transition that brings it back: ``wake_1``, ``wake_2`` or ``start``.
    cost_kind: str
    cost_seconds: float
    idle_seconds: float

    @property
    def score(self) -> float:
        return self.cost_seconds / max(self.idle_seconds, MIN_IDLE_SECONDS)

    def shown(self) -> dict[str, object]:
        return {"model": self.model, "action": self.action, "cost_kind": self.cost_kind,
                "cost_seconds": round(self.cost_seconds, 3), "idle_seconds": round(self.idle_seconds, 3),
                "score": round(self.score, 4)}


def cheapest(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the lowest expected cost (ties: the one idle longest)."""
    return min(candidates, key=lambda c: (c.score, -c.idle_seconds))


def explain(chosen: Candidate, candidates: Sequence[Candidate]) -> str:
    """Why `chosen` went: its cost and idle time, and the others' scores."""
    others = "; ".join(f"{c.model} {c.cost_kind} {c.cost_seconds:.2f}s, idle {c.idle_seconds:.0f}s "
                       f"({c.score:.3g})" for c in candidates if c is not chosen)
    return (f"least expected cost: {chosen.cost_kind} {chosen.cost_seconds:.2f}s to bring back / idle "
            f"{chosen.idle_seconds:.0f}s = {chosen.score:.3g}" + (f"; kept: {others}" if others else ""))
