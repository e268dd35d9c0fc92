"""The swap trace's arrivals and the figures of one policy's run: pure, so both are tested without a stack.

The trace (`make_trace`) is seeded: bursts of requests start at Poisson times,
each for one model drawn by a skewed popularity, its requests spread over the
burst's length; bursts overlap, which is what makes models contend for one
place. `Timeline` reads the router's ``/events`` (each model's state changes
with their times) into switches and switching time.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from router.bench.report import percentile
from router.util.states import AWAKE, DRAINING, FALLING_ASLEEP, STARTING, STOPPING, WAKING

#: States in which a model's GPU serves nobody: a switch under way.
SWITCHING = frozenset({FALLING_ASLEEP, WAKING, STOPPING, STARTING})


@dataclass(frozen=True)
class TracePlan:
    """The trace's shape: how long, which models how popular, how bursty."""

    duration: float = 60.0
    popularity: tuple[float, ...] = (0.6, 0.3, 0.1)
    #: Mean seconds between the starts of two bursts (Poisson).
    burst_gap: float = 0.75
    #: Requests in a burst: drawn uniformly from this range.
    burst_min: int = 1
    burst_max: int = 6
    #: Seconds a burst's requests are spread over.
    burst_length: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class Arrival:
    at: float
    model: int


def make_trace(plan: TracePlan) -> list[Arrival]:
    """Every request of the trace, by time; the same plan always gives the same trace."""
    rng = random.Random(f"swap-trace:{plan.seed}")
    weights = list(plan.popularity)
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(1.0 / plan.burst_gap)
        if t >= plan.duration:
            break
        model = rng.choices(range(len(weights)), weights)[0]
        for _ in range(rng.randint(plan.burst_min, plan.burst_max)):
            at = t + rng.uniform(0.0, plan.burst_length)
            if at < plan.duration:
                out.append(Arrival(at, model))
    return sorted(out, key=lambda a: a.at)


@dataclass(frozen=True)
class Change:
    """One model's state change, at the router's wall-clock time (an eviction's with the scheduler's why)."""

    time: float
    model: str
    state: str
    why: str = ""


class Timeline:
    """The models' state changes during a run, read as switches and seconds spent switching."""

    def __init__(self, changes: Iterable[Change], start: float, end: float):
        self.start, self.end = start, end
        self.changes = sorted((c for c in changes if c.time <= end), key=lambda c: c.time)

    def switches(self) -> int:
        """Wakes and starts begun in the window: each brings another model in."""
        return sum(1 for c in self.changes if self.start <= c.time and c.state in (WAKING, STARTING))

    def switching_seconds(self) -> float:
        """Time some model spent falling asleep, waking, stopping or starting, within the window."""
        total = 0.0
        state: dict[str, tuple[str, float]] = {}
        for c in self.changes:
            before = state.get(c.model)
            if before is not None and before[0] in SWITCHING:
                total += max(0.0, min(c.time, self.end) - max(before[1], self.start))
            state[c.model] = (c.state, c.time)
        for s, since in state.values():
            if s in SWITCHING:
                total += max(0.0, self.end - max(since, self.start))
        return total

    def longest_switch(self) -> float:
        """The longest span from a model beginning to drain (or to stop) to another model being awake:
        one whole switch, the resident's last requests included."""
        longest = 0.0
        for i, c in enumerate(self.changes):
            if c.time < self.start or c.state not in (DRAINING, STOPPING):
                continue
            woke = next((d for d in self.changes[i + 1:] if d.model != c.model and d.state == AWAKE), None)
            if woke is not None:
                longest = max(longest, woke.time - c.time)
        return longest


def quantiles(seconds: Sequence[float]) -> Optional[dict[str, float]]:
    """p50, p95 and max, in seconds."""
    if not seconds:
        return None
    values = sorted(seconds)
    return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "max": values[-1]}
