"""What every operation on one model shares: its machine, its admission, its lock, its history.

The operations themselves live in single-idea modules around it (start/stop,
sleep/wake, eviction, following the engines and the leader); the public
`Lifecycle` (router/server/fleet/lifecycle.py) is the façade that calls them.

Every transition runs under the model's one `asyncio.Lock`, inside a task the
lifecycle owns, and re-checks the state after taking the lock, so no decision
is made from a stale snapshot and a client that disconnects cannot abandon a
half-done transition. The state itself moves only through `machine.fire`
(router/server/fleet/machine.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional, Protocol, Sequence

from router.config import SleepSettings
from router.observe.events import Events
from router.server.fleet.admission import Admission
from router.server.fleet.control import EngineControl
from router.server.fleet.costs import Costs
from router.server.fleet.machine import Machine
from router.server.fleet.outcome import ModelUnavailable, Outcome
from router.server.fleet.replica import Replica
from router.util.states import SLEEPING

log = logging.getLogger("router.lifecycle")

#: The sleep tier that holds nothing in host RAM, which the ladder deepens sleepers to.
DEEP_LEVEL = 2

#: Why an automatic sleep may not happen now (None: it may); re-asked under the model's lock.
SleepCheck = Callable[[], Optional[str]]


class Placement(Protocol):
    """Who decides where memory goes (router/server/fleet/residency.py): asked before a start or a
    wake, while the model still counts as holding nothing. Raises ModelUnavailable when no
    room can be made."""

    async def make_room(self, lc: "ModelLife") -> None: ...


class NoPlacement:
    """No residency block: every start and wake fits."""

    async def make_room(self, lc: "ModelLife") -> None:
        return None


class Peers(Protocol):
    """Other processes that admit requests for this model on their own while it is awake (proxy
    workers, router/server/workers/controller_end.py). Asked after the model leaves AWAKE, before in-flight counts
    are trusted: returns once every peer has seen the new state and reported what it has in flight."""

    async def fence(self) -> None: ...


class NoPeers:
    """One process: this lifecycle sees every request itself."""

    async def fence(self) -> None:
        return None


class Authority(Protocol):
    """Who decides the model's transitions when router replicas share the engines
    (router/server/fleet/leadership.py): this router while it leads, else the leader it asks."""

    def local(self) -> bool: ...

    async def ask(self, model: str, action: str) -> Outcome: ...


class ModelLife:
    """One model's shared state: `members` gives its replicas as they are at each transition (a
    reload may change them); each replica keeps its own `asleep` flag, this object the model-wide
    state (in `machine`), counts (in `admission`) and history."""

    def __init__(self, model: str, members: Callable[[], tuple[Replica, ...]], settings: SleepSettings,
                 control: EngineControl, events: Events, placement: Placement, start_timeout: float,
                 clock: Callable[[], float], peers: Peers, authority: Optional[Authority],
                 costs: Optional[Costs] = None):
        self.model = model
        self.members = members
        self.settings = settings
        self.placement = placement
        self.peers = peers
        #: None: this router alone decides.
        self.authority = authority
        self.start_timeout = start_timeout
        self.clock = clock
        self.control = control
        self.events = events
        #: The model's state; `machine.fire` is its only writer.
        self.machine = Machine(model, events)
        #: When the model last became awake through a wake or a start, if ever.
        self.last_wake_at: Optional[float] = None
        self.slept_at: Optional[float] = None
        #: True when the current sleep was asked for through the admin API.
        self.manual = False
        self.sleep_count = 0
        self.wake_count = 0
        self.sleep_failures = 0
        #: Sleeps the engines refused since the last one that worked.
        self.sleep_failures_in_row = 0
        #: Before this clock time the idle loop does not try again (back-off).
        self.sleep_retry_at: Optional[float] = None
        self.wake_failures = 0
        self.last_wake_seconds: Optional[float] = None
        self.wake_seconds_total = 0.0
        self.last_error: Optional[str] = None
        self.start_count = 0
        self.stop_count = 0
        self.start_failures = 0
        self.last_start_seconds: Optional[float] = None
        #: Where the measured start, sleep and wake times go (router/server/fleet/costs.py).
        self.costs = costs or Costs()
        #: The sleep level each replica was put to sleep at by this router (its wake runs that level's
        #: steps); forgotten when it wakes.
        self.slept_levels: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.sleep_task: Optional[asyncio.Task[Outcome]] = None
        self.wake_task: Optional[asyncio.Task[Outcome]] = None
        self.start_task: Optional[asyncio.Task[Outcome]] = None
        self.stop_task: Optional[asyncio.Task[Outcome]] = None

    #: How requests get in, and how many are in flight and waiting (set by the façade, which
    #: is what the strategy is built with).
    admission: Admission

    # --------------------------------------------------------------- read-only views

    @property
    def state(self) -> str:
        return self.machine.state

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    @property
    def waiting(self) -> int:
        return self.admission.waiting

    @property
    def last_end(self) -> float:
        return self.admission.last_end

    @property
    def startable(self) -> bool:
        """Whether a request may start the model: every replica is on demand under this router's supervisord."""
        replicas = self.members()
        return self.control.can_start and bool(replicas) and all(r.instance.on_demand for r in replicas)

    @property
    def stoppable(self) -> bool:
        """Whether the model's engines can be stopped and started again by the router."""
        replicas = self.members()
        return self.control.can_start and bool(replicas) and all(r.instance.launch for r in replicas)

    @property
    def pinned(self) -> bool:
        return any(r.instance.pin for r in self.members())

    @property
    def sleepable(self) -> bool:
        replicas = self.members()
        return bool(replicas) and all(r.instance.sleep and r.instance.spec.has_sleep_api for r in replicas)

    def opt_out_reason(self) -> str:
        replicas = self.members()
        if not replicas:
            return "no replica to sleep"
        no_api = [r for r in replicas if not r.instance.spec.has_sleep_api]
        if no_api:
            return (f"instance {', '.join(r.name for r in no_api)}: engine '{no_api[0].instance.engine}' has no "
                    "sleep API, which keeps the model awake")
        names = ", ".join(r.name for r in replicas if not r.instance.sleep)
        return f"instance {names} has 'sleep: false', which keeps the model awake"

    def wake_level(self, replica: Replica) -> int:
        """The level whose wake steps wake the replica: the one this router put it to sleep at, else (a
        sleep found by reconcile, e.g. after a restart) its configured `sleep_level`."""
        return self.slept_levels.get(replica.name, replica.instance.sleep_level)

    def held_level(self, replica: Replica) -> int:
        """The tier the replica sleeps at (what it holds): the level it sleeps at, or, while awake, the
        one its next sleep will use."""
        return self.wake_level(replica) if replica.asleep else replica.instance.sleep_level

    def lighter(self) -> list[Replica]:
        """The replicas asleep at a level lighter than `DEEP_LEVEL`."""
        return [r for r in self.members() if r.asleep and self.wake_level(r) < DEEP_LEVEL]

    @property
    def deepenable(self) -> bool:
        """Asleep, with replicas at a lighter level that their engines can move to `DEEP_LEVEL` (the ladder
        of router/server/fleet/residency.py, and ``idle_deep_sleep_seconds``)."""
        lighter = self.lighter()
        return self.state == SLEEPING and bool(lighter) and all(r.instance.spec.deepens_to(DEEP_LEVEL) for r in lighter)

    def measured(self, kind: str, seconds: float, replicas: Sequence[Replica]) -> None:
        """A transition of `kind` took `seconds` for `replicas`, after any room was made."""
        self.costs.observe(self.model, [r.name for r in replicas], kind, seconds)

    @property
    def last_used(self) -> float:
        """When the model was last used (a request's end, a wake or a start), for least-recently-used order."""
        return self.clock() if self.in_flight else max(self.last_end, self.last_wake_at or self.last_end)

    def idle_seconds(self, now: Optional[float] = None) -> float:
        """Time since the model was last used: the end of its last request or its last wake."""
        if self.in_flight:
            return 0.0
        now = self.clock() if now is None else now
        return now - max(self.last_end, self.last_wake_at or self.last_end)

    @property
    def busy(self) -> bool:
        """A transition is under way (its lock is held)."""
        return self.lock.locked()

    async def settled(self) -> None:
        """Return once the transition under way, if any, has ended."""
        async with self.lock:
            pass

    def touch(self) -> None:
        """Used now, by a request another router or worker serves (its idle time starts again)."""
        self.admission.touch()

    # ------------------------------------------------------- shared by the operations

    def delegated(self) -> bool:
        """Whether another router decides this model's transitions now."""
        return self.authority is not None and not self.authority.local()

    async def drain(self, event: str, back: str, what: str) -> Optional[Outcome]:
        """Fire `event` (into a state where new requests wait) until the requests in flight end; if
        they do not within ``drain_timeout_seconds``, fire `back` and return the refusal."""
        self.machine.fire(event)
        await self.peers.fence()
        if self.in_flight:
            self.admission.drained.clear()
            try:
                await asyncio.wait_for(self.admission.drained.wait(), self.settings.drain_timeout_seconds)
            except asyncio.TimeoutError:
                self.machine.fire(back)
                return Outcome(False, f"model {self.model!r} still had {self.in_flight} requests in flight after "
                                      f"{self.settings.drain_timeout_seconds:g}s (drain_timeout_seconds); not {what}", 409)
        return None

    async def room(self, event: str) -> Optional[Outcome]:
        """Ask placement for room before a start or a wake, then fire `event` (starting, waking); the
        refusal (503) when no room can be made, the model left as it was."""
        try:
            await self.placement.make_room(self)
        except ModelUnavailable as e:
            return Outcome(False, e.message, 503)
        self.machine.fire(event)
        return None

    def failed(self, what: str, errors: dict[str, str], then: str = "") -> Outcome:
        """Record and publish a failed operation (after its state move), naming every replica's error."""
        self.last_error = "; ".join(errors.values())
        self.events.publish("model", f"{what}_failed", self.model, error=self.last_error)
        log.warning("model %s: %s failed: %s%s", self.model, what, self.last_error, then)
        return Outcome(False, f"could not {what} model {self.model!r}: {self.last_error}", 502)
