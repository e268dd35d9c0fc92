"""What each transition of an instance costs in seconds, measured: a moving estimate per instance
of its start, its sleep and its wake from each tier.

Eviction and the scheduler weigh a switch by what it costs to bring a model
back (a level-1 wake takes seconds, a cold start minutes), and those times are
the engine's, the model's and the disk's, not the router's to know in advance.
So each estimate starts from a guess (the mean of what the other instances
measured for that transition, else `DEFAULT_GUESSES` or the caller's), the
first measurement replaces it, and later ones move it by `WEIGHT` (an
exponentially weighted mean: recent wakes count most, one slow outlier does
not dominate). The replicas of a model move together, so a transition's time
is recorded for each of them, and a model's estimate is its slowest replica's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

START = "start"
SLEEP = "sleep"


def wake_kind(level: int) -> str:
    """The cost of waking from sleep level `level`: ``wake_1``, ``wake_2``."""
    return f"wake_{level}"


#: Guesses until a measurement: a cold start 30-130 s, a level-1 wake copies weights back from host
#: RAM in seconds, a level-2 wake reads them from disk or page cache (under 1 s to 8 s, issue 23).
DEFAULT_GUESSES: Mapping[str, float] = {START: 60.0, SLEEP: 5.0, wake_kind(1): 5.0, wake_kind(2): 10.0}
#: The weight of a new measurement once there is one.
WEIGHT = 0.3

#: Told of every measurement: (model, kind, seconds); the metrics' histograms listen.
Listener = Callable[[str, str, float], None]


@dataclass
class Estimate:
    """One instance's moving estimate of one kind of transition."""

    seconds: float
    samples: int = 0
    last: Optional[float] = None

    def add(self, seconds: float, weight: float) -> None:
        self.seconds = seconds if self.samples == 0 else (1 - weight) * self.seconds + weight * seconds
        self.samples += 1
        self.last = seconds

    def shown(self) -> dict[str, object]:
        return {"seconds": round(self.seconds, 3), "samples": self.samples, "last": self.last}


class Costs:
    """The one owner of the measured costs, for every instance of the router."""

    def __init__(self, guesses: Mapping[str, float] = DEFAULT_GUESSES, weight: float = WEIGHT):
        self.guesses = dict(guesses)
        self.weight = weight
        self._estimates: dict[tuple[str, str], Estimate] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def observe(self, model: str, instances: Iterable[str], kind: str, seconds: float) -> None:
        """`model`'s `instances` took `seconds` for a transition of `kind` (they move together)."""
        for name in instances:
            found = self._estimates.get((name, kind))
            if found is None:
                found = self._estimates[(name, kind)] = Estimate(self.guess(kind))
            found.add(seconds, self.weight)
        for listener in self._listeners:
            listener(model, kind, seconds)

    def guess(self, kind: str) -> float:
        """What an instance that has not made a transition of `kind` yet is expected to take: the mean of the
        other instances' estimates of it once there are any (this node's disks and engines), else the
        configured guess. A fixed guess far above what was measured would keep an unmeasured model from ever
        being chosen for eviction, so it would never be measured."""
        measured = [e.seconds for (_, k), e in self._estimates.items() if k == kind]
        if measured:
            return sum(measured) / len(measured)
        return self.guesses.get(kind, self.guesses[START])

    def estimate(self, instance: str, kind: str) -> Estimate:
        """The instance's estimate, or the guess (no samples) before any measurement."""
        return self._estimates.get((instance, kind)) or Estimate(self.guess(kind))

    def of_model(self, instances: Iterable[str], kinds: Iterable[str] = ()) -> dict[str, dict[str, object]]:
        """Each kind's estimate for a model: its slowest instance's (they run at once). Kinds: the guessed ones
        and any measured for these instances, plus `kinds`."""
        names = list(instances)
        wanted = {*self.guesses, *kinds, *(k for (n, k) in self._estimates if n in names)}
        out: dict[str, dict[str, object]] = {}
        for kind in sorted(wanted):
            found = [self.estimate(n, kind) for n in names] or [Estimate(self.guess(kind))]
            out[kind] = max(found, key=lambda e: e.seconds).shown()
        return out
