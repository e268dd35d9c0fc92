"""A model's state as one explicit machine: the table of legal moves and their one writer.

Every move of a model's state is an event fired at its `Machine`; the table
below says, for each (state, event), the state it leads to. A pair that is
not in the table is a bug in the caller (an operation that did not check the
state it runs from), never a condition to handle: `fire` raises
`IllegalTransition` when ``KVROUTER_STRICT_MACHINE=1`` (the tests set it) and
otherwise logs the move and refuses it, so a production router keeps its
last consistent state rather than dying on the spot.

`Machine.fire` is the only writer of the state of a model that this process
owns. It publishes the new state on `Events` (kind ``model``, the state as
the event's name), which is what `/events`, the proxy workers (through the
controller's link) and the tests follow. A proxy worker owns no model: its
view mirrors the controller's published states (`Machine.mirror`), and never
decides a move itself.

The operations that fire the events, and why each move happens:

- start/stop (router/server/fleet/startstop.py): ``start`` (stopped or
  failed -> starting), ``started``, ``start_failed``; ``drain_stop`` (awake
  or sleeping -> stopping), ``stopped``, and ``stop_aborted`` /
  ``stop_aborted_asleep`` back to where the stop began (the drain timed out or
  a program would not stop).
- sleep/wake (router/server/fleet/sleepwake.py): ``drain_sleep`` (awake ->
  draining), ``drain_timeout`` (back to awake), ``fall_asleep``, ``slept``,
  ``sleep_failed`` (rolled back: awake) or ``sleep_failed_asleep`` (some
  replica stays asleep: sleeping); ``wake``, ``woke``, ``wake_failed``.
- the engines' and supervisord's word (router/server/fleet/follow.py):
  ``engine_asleep`` / ``engine_awake`` (GET /is_sleeping), ``process_down`` /
  ``process_up`` (every engine's process went down or came up outside the
  router), and ``leader_awake`` / ``leader_sleeping`` / ``leader_stopped``
  (the leading router acted, router/server/fleet/leadership.py).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

from router.observe.events import Events
from router.util.states import ALL_STATES, AWAKE, DRAINING, FAILED, FALLING_ASLEEP, SLEEPING, STARTING, STOPPED, STOPPING, WAKING

log = logging.getLogger("router.machine")

START = "start"
STARTED = "started"
START_FAILED = "start_failed"
DRAIN_SLEEP = "drain_sleep"
DRAIN_TIMEOUT = "drain_timeout"
FALL_ASLEEP = "fall_asleep"
SLEPT = "slept"
SLEEP_FAILED = "sleep_failed"
SLEEP_FAILED_ASLEEP = "sleep_failed_asleep"
WAKE = "wake"
WOKE = "woke"
WAKE_FAILED = "wake_failed"
DRAIN_STOP = "drain_stop"
STOPPED_EVENT = "stopped"
STOP_ABORTED = "stop_aborted"
STOP_ABORTED_ASLEEP = "stop_aborted_asleep"
PROCESS_DOWN = "process_down"
PROCESS_UP = "process_up"
ENGINE_ASLEEP = "engine_asleep"
ENGINE_AWAKE = "engine_awake"
LEADER_AWAKE = "leader_awake"
LEADER_SLEEPING = "leader_sleeping"
LEADER_STOPPED = "leader_stopped"


def _moves(event: str, sources: tuple[str, ...], target: str) -> dict[tuple[str, str], str]:
    return {(source, event): target for source in sources}


#: (state, event) -> the state the event leads to. Every other pair is illegal.
TRANSITIONS: Mapping[tuple[str, str], str] = {
    **_moves(START, (STOPPED, FAILED), STARTING),
    **_moves(STARTED, (STARTING,), AWAKE),
    **_moves(START_FAILED, (STARTING,), FAILED),
    **_moves(DRAIN_SLEEP, (AWAKE,), DRAINING),
    **_moves(DRAIN_TIMEOUT, (DRAINING,), AWAKE),
    **_moves(FALL_ASLEEP, (DRAINING,), FALLING_ASLEEP),
    **_moves(SLEPT, (FALLING_ASLEEP,), SLEEPING),
    **_moves(SLEEP_FAILED, (FALLING_ASLEEP,), AWAKE),
    **_moves(SLEEP_FAILED_ASLEEP, (FALLING_ASLEEP,), SLEEPING),
    **_moves(WAKE, (SLEEPING,), WAKING),
    **_moves(WOKE, (WAKING,), AWAKE),
    **_moves(WAKE_FAILED, (WAKING,), SLEEPING),
    **_moves(DRAIN_STOP, (AWAKE, SLEEPING), STOPPING),
    **_moves(STOPPED_EVENT, (STOPPING,), STOPPED),
    **_moves(STOP_ABORTED, (STOPPING,), AWAKE),
    **_moves(STOP_ABORTED_ASLEEP, (STOPPING,), SLEEPING),
    **_moves(PROCESS_DOWN, (AWAKE, SLEEPING), STOPPED),
    **_moves(PROCESS_UP, (STOPPED, FAILED), AWAKE),
    **_moves(ENGINE_ASLEEP, (AWAKE,), SLEEPING),
    **_moves(ENGINE_AWAKE, (SLEEPING,), AWAKE),
    **_moves(LEADER_AWAKE, (SLEEPING, STOPPED, FAILED), AWAKE),
    **_moves(LEADER_SLEEPING, (AWAKE, STOPPED, FAILED), SLEEPING),
    **_moves(LEADER_STOPPED, (AWAKE, SLEEPING, FAILED), STOPPED),
}
#: Every event, in the order of the table.
EVENTS = tuple(dict.fromkeys(event for _, event in TRANSITIONS))
#: The leading router's word on a state -> the event that follows it here.
LEADER_SAYS = {AWAKE: LEADER_AWAKE, SLEEPING: LEADER_SLEEPING, STOPPED: LEADER_STOPPED}


def strict() -> bool:
    """Whether an illegal move raises (tests, ``KVROUTER_STRICT_MACHINE=1``) rather than being logged."""
    return os.environ.get("KVROUTER_STRICT_MACHINE", "") not in ("", "0")


class IllegalTransition(RuntimeError):
    """An event fired in a state that has no move for it: a bug in the operation that fired it."""

    def __init__(self, model: str, state: str, event: str):
        super().__init__(f"model {model!r}: event {event!r} is not legal in state {state!r}")
        self.model = model
        self.state = state
        self.event = event


class Machine:
    """The state of one model, moved only by `fire` (the owner) or `mirror` (a worker's view)."""

    __slots__ = ("model", "state", "_events", "_strict")

    def __init__(self, model: str, events: Events, state: str = AWAKE, strict_moves: bool | None = None):
        self.model = model
        self.state = state
        self._events = events
        self._strict = strict() if strict_moves is None else strict_moves

    def can(self, event: str) -> bool:
        """Whether `event` is legal now."""
        return (self.state, event) in TRANSITIONS

    def fire(self, event: str) -> bool:
        """Make the move `event` leads to from the current state and publish the new state.

        Returns False (after logging) for an illegal move outside strict mode;
        raises IllegalTransition in it."""
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            if self._strict:
                raise IllegalTransition(self.model, self.state, event)
            log.error("model %s: refused the illegal move %r from %r (a bug; please report it)",
                      self.model, event, self.state)
            return False
        if target != self.state:
            self.state = target
            self._events.publish("model", target, self.model)
        return True

    def mirror(self, state: str) -> None:
        """Take the owner's state as it is (a proxy worker following the controller, which
        published it after a legal move). Not published again: the owner did."""
        if state not in ALL_STATES:
            if self._strict:
                raise IllegalTransition(self.model, self.state, f"mirror {state!r}")
            log.error("model %s: ignored the unknown state %r from the controller", self.model, state)
            return
        self.state = state
