"""State changes as events: the owners publish, anyone may follow.

A replica's owner publishes its process and health changes, a model's
lifecycle its transitions, the router its reloads. Followers (`GET /events`,
the /ui page, the controller's link to its proxy workers, which passes each
change on in order) subscribe instead of polling the owners, so they never act
on a copy they made themselves. Each
subscriber has its own bounded queue: one that does not keep up loses its
oldest events, never slowing a publisher.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import orjson

from router.observe.logs import FIELDS, json_configured

#: Events kept for a follower that connects later (`recent`).
HISTORY = 256
#: Events one subscriber may have waiting before the oldest are dropped.
QUEUE = 1024

JsonValue = object

log = logging.getLogger("router.events")


@dataclass(frozen=True)
class Event:
    """One state change: what (`kind`, `state`), when, of which model and instance."""

    kind: str
    state: str
    model: Optional[str] = None
    instance: Optional[str] = None
    detail: Mapping[str, JsonValue] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    #: Position in the router's event order (set by `Events.publish`).
    seq: int = 0

    def json(self) -> bytes:
        return orjson.dumps({"seq": self.seq, "time": self.time, "kind": self.kind, "state": self.state,
                             "model": self.model, "instance": self.instance, **self.detail})


class Subscription:
    """One follower's queue of events."""

    def __init__(self, events: "Events"):
        self._events = events
        self._queue: deque[Event] = deque(maxlen=QUEUE)
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        self._queue.append(event)
        self._ready.set()

    async def next(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next event, or None after `timeout` seconds without one."""
        if not self._queue:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._queue.popleft()

    def close(self) -> None:
        self._events.unsubscribe(self)


class Events:
    """The router's event stream: publish to every subscriber, keep a short history."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []
        self._history: deque[Event] = deque(maxlen=HISTORY)
        self._seq = 0
        if json_configured():
            # In JSON logs every state change is also a line of its own, with its fields (docs/monitoring.md).
            self.listen(log_event)

    def publish(self, kind: str, state: str, model: Optional[str] = None, instance: Optional[str] = None,
                **detail: JsonValue) -> None:
        self._seq += 1
        event = Event(kind, state, model, instance, detail, seq=self._seq)
        self._history.append(event)
        for listener in self._listeners:
            listener(event)
        for sub in self._subscribers:
            sub.push(event)

    def recent(self) -> list[Event]:
        return list(self._history)

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call `listener` with every event as it is published, before `publish` returns: for
        followers that must see changes in the order they happened (router/server/workers/controller_end.py)."""
        self._listeners.append(listener)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)


def log_event(event: Event) -> None:
    """One event as a log line whose fields are the event's (kind, state, model, instance, its detail)."""
    log.info("%s %s", event.kind, event.state, extra={FIELDS: {"kind": event.kind, "state": event.state,
                                                                "model": event.model, "instance": event.instance,
                                                                **event.detail}})
