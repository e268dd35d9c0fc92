"""One engine instance and everything the router knows and intends about it.

A `Replica` owns a replica's state: its process (from supervisord), its
health with the probe thresholds, whether it sleeps, its circuit breaker, its
in-flight requests and slots, and its keep-alive connection pool. Its fields
change only through its own methods (`take_slot`/`release_slot`,
`record_probe`, `set_process`, `mark_asleep`, `failed`/`succeeded`,
`apply_report`...); others read them and keep no copy. A test
(tests/unit/test_owners.py) checks that no other module assigns them.

With proxy workers each process has its own `Replica` objects: the
controller's are the truth for health, process and sleep (pushed to the
workers, `apply_report`), each worker's count their own slots and report
them (`count_remote` at the controller).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from router.config import Instance, RouterSettings, connect_host
from router.observe.events import Events
from router.server.fleet.loras import LoraSlots
from router.server.fleet.upstream import Pool
from router.supervision.processes import ProcessState

#: Health states of a replica; "unknown" (never probed) is routable.
UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"
#: supervisord states of a process that is up: STARTING lasts its first seconds (startsecs),
#: while an engine may already serve; the health probes tell whether it does.
UP = frozenset({"RUNNING", "STARTING"})


class Breaker:
    """A replica's circuit breaker: closed, open for a while after a failure, then half-open.

    A failure (connect refused or reset, no status line in time, a 502/503/504,
    a stream the engine broke) opens it for `base` seconds; when that time is
    over one trial request may go (half-open): its success closes the breaker,
    its failure opens it again for twice as long, up to `cap`. 4xx answers and
    clients that leave are not the engine's failures and never count. Times
    are passed in, so the rules are tested on a fake clock.
    """

    __slots__ = ("open_until", "opened_for", "trial")

    def __init__(self) -> None:
        #: While now < open_until the replica takes no request.
        self.open_until = 0.0
        #: How long the breaker was last opened for (0: closed and not failing).
        self.opened_for = 0.0
        #: A half-open trial request is on its way.
        self.trial = False

    @property
    def state(self) -> str:
        return "closed" if not self.opened_for else "half_open" if self.trial else "open"

    def admits(self, now: float) -> bool:
        """Whether a request may go: closed, or half-open with no trial under way."""
        return not self.opened_for or (now >= self.open_until and not self.trial)

    def taken(self, now: float) -> None:
        """A request was sent: past the open time it is the half-open trial."""
        if self.opened_for and now >= self.open_until:
            self.trial = True

    def failure(self, now: float, base: float, cap: float) -> float:
        """Open (again, for twice as long after a failed trial); the seconds it stays open.

        Failures of requests sent before it opened (streams an engine's death cut
        all at once) find it open and change nothing: only a reopening doubles."""
        if self.opened_for and now < self.open_until and not self.trial:
            return self.open_until - now
        self.opened_for = min(cap, self.opened_for * 2) if self.opened_for else base
        self.open_until = now + self.opened_for
        self.trial = False
        return self.opened_for

    def success(self) -> None:
        self.open_until = self.opened_for = 0.0
        self.trial = False

    def ended(self) -> None:
        """A request sent here has ended. A trial still out ended without a verdict (its client left,
        or the engine answered a status that is neither, such as 500): the next request is the trial,
        else the replica would take nothing for ever. (A request sent before the breaker opened that
        ends while a trial is out ends that trial's turn too: one more trial may then go.)"""
        self.trial = False


class Replica:
    """One engine instance, with the router's view of its process, health, sleep and load."""

    __slots__ = ("instance", "name", "url", "served", "served_name", "outstanding", "limit", "max_queue",
                 "health", "ok_streak", "fail_streak", "eject_timer", "pool", "authority",
                 "auth_line", "asleep", "process", "retired", "events", "card", "card_at", "breaker",
                 "ranks", "loras")

    def __init__(self, instance: Instance, events: Events, process: Optional[ProcessState] = None):
        self.instance = instance
        self.events = events
        self.name = instance.name
        self.url = instance.url
        self.served = frozenset(instance.served_names)
        #: The name written into a request whose model the engine does not serve.
        self.served_name = instance.served_names[0] if instance.served_names else instance.model
        self.outstanding = 0
        #: Its engine orders its queue by the body's `priority` (vLLM's --scheduling-policy priority).
        self.ranks = instance.spec.orders_by_priority(instance.engine_args)
        self.limit = instance.max_concurrency
        self.max_queue = instance.max_queue if instance.max_concurrency else 0
        self.health = UNKNOWN
        self.ok_streak = 0
        self.fail_streak = 0
        self.breaker = Breaker()
        #: Armed while the breaker is open, to hand the replica to queued requests when it may take one again.
        self.eject_timer: Optional[asyncio.TimerHandle] = None
        #: Keep-alive connections of the hot path; `authority` is the Host header value.
        self.pool = Pool(connect_host(instance.host), instance.port)
        self.authority = self.url.split("//", 1)[1].encode()
        #: The engine's own key (its --api-key), sent in place of the client's authorization.
        self.auth_line = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in instance.auth_headers.items())
        #: Whether the engine's sleep call has put it to sleep (moved only by the model's lifecycle).
        self.asleep = False
        #: supervisord's view of the engine process; None where no supervisord runs it.
        self.process = process
        #: Removed from the table by a reload: serves what it has in flight, takes nothing new.
        self.retired = False
        #: The engine's own /v1/models entry for this model (max_model_len...), and when it was read.
        self.card: Optional[dict[str, object]] = None
        self.card_at = 0.0
        #: The LoRA adapters its engine holds (changed through their own methods; see fleet/loras.py).
        self.loras = LoraSlots(instance.adapter_names, (a.name for a in instance.lora_adapters if a.at_start))

    def take_slot(self, now: float) -> None:
        """A request was sent here (a half-open breaker's trial, if the open time is over)."""
        self.outstanding += 1
        if self.breaker.opened_for:  # closed (the usual case): nothing to tell it
            self.breaker.taken(now)

    def release_slot(self) -> None:
        """A request sent here has ended; a retired replica lets go of its connections after its last."""
        self.outstanding -= 1
        if self.breaker.trial:  # ended without a verdict (a verdict clears it first)
            self.breaker.ended()
        if self.retired and self.outstanding == 0:
            self.pool.close()

    def count_remote(self, delta: int) -> None:
        """`delta` more requests in flight here from a proxy worker (the controller's merged count)."""
        self.outstanding += delta

    def mark_asleep(self, asleep: bool = True) -> None:
        """The engine's sleep (or wake) call succeeded, or the engine or the leader says so."""
        self.asleep = asleep

    def apply_report(self, health: str, process: Optional[ProcessState]) -> None:
        """A proxy worker takes the controller's word on health and process (already published there)."""
        self.health = health
        self.process = process

    def set_card(self, card: dict[str, object], now: float) -> None:
        """The engine's own /v1/models entry, read at `now`."""
        self.card = card
        self.card_at = now

    def reconfigure(self, instance: Instance) -> None:
        """A reload changed only what is read per request (aliases, shaping, fallbacks, LoRA adapters): keep
        the state, take the instance (and the adapters it may now serve)."""
        self.instance = instance
        self.loras.reconfigure(instance.adapter_names, (a.name for a in instance.lora_adapters if a.at_start))

    @property
    def running(self) -> bool:
        """Whether the engine process is up, as far as anyone can tell (unknown counts as up)."""
        return self.process is None or self.process.state in UP

    @property
    def ejected_until(self) -> float:
        return self.breaker.open_until

    def routable(self, now: float) -> bool:
        return self.health != UNHEALTHY and self.breaker.admits(now) and not self.retired and self.running

    def follow_breaker(self, open_until: float, opened_for: float) -> None:
        """Take the controller's breaker whole (a proxy worker's copy; no event, as above)."""
        self.breaker.open_until = open_until
        self.breaker.opened_for = opened_for
        self.breaker.trial = False

    def record_probe(self, ok: bool, settings: RouterSettings) -> None:
        """Apply one probe result: unhealthy after N failures in a row, healthy after M successes.

        A never-probed replica turns healthy on its first success: it was
        routable already, so there is nothing to be cautious about. The
        caller hands a replica that turned routable to queued requests
        (`Model.dispatch`).
        """
        if ok:
            self.fail_streak = 0
            self.ok_streak += 1
            if self.health == UNKNOWN or (self.health == UNHEALTHY and self.ok_streak >= settings.healthy_threshold):
                self.breaker.success()  # before the event: its followers read the breaker closed
                self._set_health(HEALTHY)
        else:
            self.ok_streak = 0
            self.fail_streak += 1
            if self.fail_streak >= settings.unhealthy_threshold:
                self._set_health(UNHEALTHY)

    def _set_health(self, health: str) -> None:
        if health != self.health:
            self.health = health
            self.events.publish("health", health, self.instance.model, self.name)

    def set_process(self, process: Optional[ProcessState]) -> bool:
        """Take supervisord's latest word on the process; True when it changed whether the engine runs.

        A process that stopped running leaves nothing to probe, so its health
        starts over (unknown) and the probes decide again once it is back.
        """
        was = self.running
        self.process = process
        if process is not None:
            self.events.publish("process", process.state, self.instance.model, self.name, pid=process.pid,
                                description=process.description)
        if not self.running:
            self._set_health(UNKNOWN)
            self.ok_streak = self.fail_streak = 0
            self.loras.lost()  # a restarted engine holds only the adapters its flags load
        return was != self.running

    def failed(self, now: float, settings: RouterSettings, on_over: Callable[[], None]) -> None:
        """The engine failed a request: open the breaker; when it may take one again, `on_over`
        hands it to queued requests."""
        seconds = self.breaker.failure(now, settings.eject_seconds, settings.breaker_max_seconds)
        self.events.publish("breaker", "open", self.instance.model, self.name, seconds=seconds)
        if self.eject_timer is None:
            self.eject_timer = asyncio.get_running_loop().call_later(seconds, self._ejection_over, on_over)

    def succeeded(self) -> None:
        """The engine answered: a half-open breaker closes."""
        if self.breaker.opened_for:
            self.breaker.success()
            self.events.publish("breaker", "closed", self.instance.model, self.name)

    def _ejection_over(self, on_over: Callable[[], None]) -> None:
        # The loop's clock may run a little behind time.monotonic(), and the
        # ejection may have been extended: wait for what is left of it.
        left = self.ejected_until - time.monotonic()
        if left > 0:
            self.eject_timer = asyncio.get_running_loop().call_later(left, self._ejection_over, on_over)
            return
        self.eject_timer = None
        on_over()

    def retire(self) -> None:
        """Taken out of the table: finish what is in flight, then let go of the connections."""
        self.retired = True
        if self.eject_timer is not None:
            self.eject_timer.cancel()
            self.eject_timer = None
        if self.outstanding == 0:
            self.pool.close()

    def down_reason(self) -> str:
        """Why this replica takes no requests, for a 503 naming it."""
        if self.process is not None and not self.process.running:
            p = self.process
            detail = f" ({p.description})" if p.description else ""
            log = f"; log: {p.logfile}" if p.logfile else ""
            return f"instance {self.name} is {p.state}{detail}{log}"
        if self.health == UNHEALTHY:
            return f"instance {self.name} fails its health checks"
        if self.ejected_until > time.monotonic():
            return f"instance {self.name} refused connections and is skipped for a while"
        return f"instance {self.name} is busy"
