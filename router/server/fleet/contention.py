"""When a waiting model may take a busy resident's place: the scheduler's one decision.

A switch (the resident drained and put to sleep or stopped, the waiting
model woken or started) costs seconds during which the GPU serves nobody. A
swapper that switches in arrival order (``fifo``, the baseline) pays that on
nearly every request when two busy models share a GPU. ``cost_aware`` keeps
serving the resident while it has queued work (requests in flight or
waiting), and switches when one of these holds:

- the waiting side's oldest request has waited ``max_wait_seconds``: no
  model is starved, whatever the costs say;
- the resident has served its window (half of what one switch takes, so a
  model brought in at that price serves at least a third of the time) and
  has been idle for a pause (a quarter of the switch): its stream of
  requests has ended, nobody waits for it, and the GPU would otherwise idle
  while others wait. A shorter pause keeps its place: a busy model's next
  request usually comes within it, and leaving would cost a switch back;
- the resident has served its window and the waiting side's accumulated
  wait (the sum, over its waiting requests, of the seconds each has waited)
  reaches the switch's cost in the same unit: the measured switch seconds
  times the requests it holds up, the waiting ones (until the wake ends)
  and, twice, the resident's queued ones (a model busy now has more work
  coming, which waits for the newcomer's turn and for the switch back).

When the resident gives way and more than one model waits for its place,
`next_in_line` says which one gets it: under ``cost_aware`` the one whose
oldest request has waited longest past ``max_wait_seconds``, if any has,
else the one whose waiting requests have accumulated the most wait (so one
switch serves the biggest batch); under ``fifo`` the one that asked first.

So a burst for another model waits while the resident finishes its own, a
crowd gets its turn sooner than a lone request, and a slow switch (a cold
start) is made more rarely than a fast one (a level-1 wake). The caller
(router/server/fleet/residency.py) asks again as time passes and queues
change, and fires the switch through the model's lifecycle; this module
only decides, from the numbers it is given, so it is tested on a fake clock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

FIFO = "fifo"
COST_AWARE = "cost_aware"
#: A resident keeps its place, even idle, at least this many times the switch's seconds after it came in.
SERVING_WINDOW = 0.5
#: An idle resident keeps its place through a pause shorter than this many times the switch's seconds.
PAUSE = 0.25


@dataclass(frozen=True)
class Waits:
    """One model's requests at one moment: in flight, how long each waiting one has waited, and how long
    the model has been idle (since its last request ended or it woke; 0 with one in flight)."""

    in_flight: int = 0
    waited: tuple[float, ...] = ()
    idle_for: float = 0.0

    @classmethod
    def since(cls, in_flight: int, starts: Sequence[float], now: float, idle_for: float = 0.0) -> "Waits":
        """From the clock times at which the waiting requests began to wait."""
        return cls(in_flight, tuple(max(0.0, now - t) for t in starts), idle_for)

    @property
    def waiting(self) -> int:
        return len(self.waited)

    @property
    def queued(self) -> int:
        """The work the model has: requests in flight and waiting."""
        return self.in_flight + self.waiting

    @property
    def oldest(self) -> float:
        return max(self.waited, default=0.0)

    @property
    def accumulated(self) -> float:
        """Request-seconds waited so far."""
        return sum(self.waited)


@dataclass(frozen=True)
class Verdict:
    """Whether to switch now, and why (shown in the eviction's record and event)."""

    switch: bool
    reason: str


def decide(policy: str, resident: Waits, newcomer: Waits, switch_seconds: float, max_wait: float,
           awake_for: float, min_awake: float) -> Verdict:
    """Whether the resident (awake `awake_for` seconds, with its `resident` requests) gives its place now to
    the model whose requests are `newcomer`, a switch being estimated at `switch_seconds`.

    A resident that is awake with requests still waiting has just woken (or started) for them: they go in
    on the loop's next turns. Under either policy it keeps its place until they are in; taken from them
    now, they would wait for its next turn (and two models woken for each other would swap forever)."""
    if resident.waiting:
        return Verdict(False, f"{policy}: the resident's {resident.waiting} requests that waited for it are going in")
    if policy == FIFO:
        if awake_for >= min_awake:
            return Verdict(True, f"fifo: the resident was awake {awake_for:.1f}s (min_sleep_duration {min_awake:g}s)")
        return Verdict(False, f"fifo: the resident has been awake {awake_for:.1f}s of min_sleep_duration {min_awake:g}s")
    if newcomer.oldest >= max_wait:
        return Verdict(True, f"cost_aware: the oldest waiting request waited {newcomer.oldest:.1f}s "
                             f"(max_wait_seconds {max_wait:g})")
    window = SERVING_WINDOW * switch_seconds
    if awake_for < window:
        return Verdict(False, f"cost_aware: the resident has served {awake_for:.1f}s of its {window:.1f}s window "
                              "(the switch that brought it in)")
    if not resident.queued:
        pause = PAUSE * switch_seconds
        if resident.idle_for < pause:
            return Verdict(False, f"cost_aware: the resident has been idle {resident.idle_for:.2f}s, less than a "
                                  f"{pause:.2f}s pause (its next request may come)")
        return Verdict(True, f"cost_aware: the resident has no queued work (idle {resident.idle_for:.1f}s)")
    held_up = 2 * resident.queued + newcomer.waiting
    cost = switch_seconds * held_up
    if newcomer.waiting and newcomer.accumulated >= cost:
        return Verdict(True, f"cost_aware: {newcomer.waiting} waiting requests waited {newcomer.accumulated:.1f} "
                             f"request-seconds >= the switch's {switch_seconds:.2f}s x {held_up} requests held up")
    return Verdict(False, f"cost_aware: the resident has {resident.queued} queued; {newcomer.waiting} waiting "
                          f"{newcomer.accumulated:.1f} of {cost:.1f} request-seconds, oldest {newcomer.oldest:.1f}s "
                          f"of {max_wait:g}s")


def next_in_line(policy: str, waiting: Mapping[str, Waits], max_wait: float) -> Optional[str]:
    """Of the models `waiting` for one place (name -> its requests), the one the place goes to next; None
    under ``fifo``, whose order is the order they asked in. The ``max_wait_seconds`` bound comes first: a
    model with a request waiting past it goes before one whose crowd is bigger, the longest waiting first.
    Ties go to the oldest request, then to the name, so every asker computes the same answer."""
    if policy != COST_AWARE or not waiting:
        return None
    overdue = {name: w for name, w in waiting.items() if w.oldest >= max_wait}
    if overdue:
        return max(overdue, key=lambda name: (overdue[name].oldest, name))
    return max(waiting, key=lambda name: (waiting[name].accumulated, waiting[name].oldest, name))


def line_reason(chosen: str, waiting: Mapping[str, Waits], asked_first: str) -> str:
    """Why `chosen` is next of the models `waiting` for one place (appended to the switch's reason)."""
    w = waiting[chosen]
    order = "the first to ask" if chosen == asked_first else f"ahead of {asked_first}, which asked first"
    others = ", ".join(f"{name} {o.accumulated:.1f}s, oldest {o.oldest:.1f}s" for name, o in waiting.items()
                       if name != chosen)
    return (f"next of {len(waiting)} waiting models: {chosen} ({w.accumulated:.1f}s accumulated, oldest "
            f"{w.oldest:.1f}s; {order}); others: {others}")
