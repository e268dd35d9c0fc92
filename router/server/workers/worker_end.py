"""A proxy worker's end of its link to the controller (messages and owners: messages.py).

It applies what the controller pushes to the worker's view, reports what the
worker owns in batches, asks the controller to make a model ready, leases
slots of limited models from the controller's one queue, and sends its
breakers' outcomes up at once.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import Callable, Coroutine, Optional, TypeVar

from router.config import SleepSettings
from router.observe.events import Event
from router.observe.metrics import ModelMetrics
from router.server.fleet.adapters import AdapterUnavailable
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import LifecycleFactory, Model, NoReplica, Overloaded
from router.server.fleet.outcome import ModelUnavailable
from router.server.fleet.replica import Replica
from router.server.proxy.tenants import Decision
from router.server.workers.messages import (
    COUNTS_SECONDS,
    PROTOCOL,
    REPORT_SECONDS,
    AdapterAnswer,
    AdapterLost,
    AdapterState,
    AdapterUse,
    Applied,
    BreakerOutcome,
    BreakerState,
    Channel,
    Done,
    Fence,
    Fenced,
    Hello,
    Lease,
    Leased,
    LoadAdapter,
    Message,
    ModelState,
    Note,
    Owner,
    Quota,
    QuotaAnswer,
    QuotaDone,
    Ready,
    ReadyAnswer,
    Refused,
    ReplicaState,
    Report,
    Sync,
    Synced,
    Table,
    ToController,
    ToWorker,
    Unlease,
    Whose,
    WhoseAnswer,
    Wire,
)
from router.server.workers.remote import RemoteAdmission
from router.tenants.classes import NORMAL
from router.tenants.quota import Refusal, Standing

log = logging.getLogger("router.link")

T = TypeVar("T")


class ControllerLink:
    """A worker's end: applies the controller's changes to its view and reports what it admits."""

    def __init__(self, channel: Wire, on_table: Callable[[Table], None],
                 model: Callable[[str], Optional[Lifecycle]],
                 replica_changed: Callable[[ReplicaState | AdapterState], None],
                 breaker_changed: Callable[[BreakerState], None], owner: Callable[[Owner], None]):
        self.channel = channel
        self._on_table = on_table
        self._model = model
        self._replica_changed = replica_changed
        self._breaker_changed = breaker_changed
        self._owner = owner
        self._ids = itertools.count(1)
        self._ready: dict[int, tuple[asyncio.Future[None], RemoteAdmission]] = {}
        self._answers: dict[int, asyncio.Future[ToWorker]] = {}
        self._dirty: set[RemoteAdmission] = set()
        self._report: Optional[asyncio.Handle] = None
        self._report_due = 0.0
        self.done: list[Done] = []
        self.retries: list[Note] = []
        self.errors: list[Note] = []
        self.routed: dict[str, tuple[int, int]] = {}
        self.fallbacks: list[Note] = []
        #: Why the controller refused this worker, if it did.
        self.refused: Optional[str] = None
        #: The link has ended (the controller went away): nothing asked of it can be answered now.
        self.gone = False

    @classmethod
    async def connect(cls, path: str, on_table: Callable[[Table], None],
                      model: Callable[[str], Optional[Lifecycle]],
                      replica_changed: Callable[[ReplicaState | AdapterState], None],
                      breaker_changed: Callable[[BreakerState], None], owner: Callable[[Owner], None]) -> ControllerLink:
        reader, writer = await asyncio.open_unix_connection(path)
        channel = Channel(reader, writer)
        channel.send(Hello(PROTOCOL, os.getpid()))
        return cls(channel, on_table, model, replica_changed, breaker_changed, owner)

    async def run(self) -> None:
        """Apply the controller's messages until it goes away."""
        try:
            while True:
                message = await self.channel.receive()
                if message is None:
                    return
                self.take(message)
        finally:
            self.gone = True
            for fut, _ in self._ready.values():
                if not fut.done():
                    fut.set_exception(ModelUnavailable("the router's controller went away", 1))
            self._ready.clear()
            for answer in self._answers.values():
                if not answer.done():
                    answer.set_exception(ModelUnavailable("the router's controller went away", 1))
            self._answers.clear()

    def _linked(self) -> None:
        """Before asking the controller: once it has gone (the worker serves on until it has stopped),
        the 503 its waiters got, at once, rather than a wait for an answer that cannot come."""
        if self.gone:
            raise ModelUnavailable("the router's controller went away", 1)

    def take(self, message: Message) -> None:
        match message:
            case Leased():
                self._leased(message)
            case QuotaAnswer():
                self._quota_answered(message)
            case ModelState():
                lc = self._model(message.model)
                if lc is not None:
                    lc.mirror(message.state)
            case ReplicaState() | AdapterState():
                self._replica_changed(message)
            case BreakerState():
                self._breaker_changed(message)
            case Fence():
                self.flush()
                self.channel.send(Fenced(message.n))
            case ReadyAnswer():
                self._admitted(message)
            case Synced() | WhoseAnswer() | AdapterAnswer():
                answer = self._answers.pop(message.request, None)
                if answer is not None and not answer.done():
                    answer.set_result(message)
            case Table():
                self._on_table(message)
                self.channel.send(Applied(message.generation))
            case Owner():
                self._owner(message)
            case Refused():
                self.refused = message.reason
                log.error("the router's controller refused this proxy worker: %s", message.reason)
                self.channel.close()

    def _admitted(self, message: ReadyAnswer) -> None:
        fut, lc = self._ready.pop(message.request, (None, None))
        if fut is None or lc is None or fut.done():
            return
        if message.refusal is None:
            lc.admitted()  # now, before any later message is read
            fut.set_result(None)
        else:
            fut.set_exception(ModelUnavailable(*message.refusal))

    def _leased(self, message: Leased) -> None:
        answer = self._answers.pop(message.request, None)
        if answer is not None and not answer.done():
            answer.set_result(message)
        elif message.instance is not None:  # the request gave up waiting: the slot goes back
            self.channel.send(Unlease(message.request))

    def _quota_answered(self, message: QuotaAnswer) -> None:
        answer = self._answers.pop(message.request, None)
        if answer is not None and not answer.done():
            answer.set_result(message)
        elif message.standing is not None:  # the request left while it was decided: it ends now
            self.channel.send(QuotaDone(message.request, None))

    async def _ask(self, request: int, message: ToController, kind: type[T]) -> T:
        """Send `message` with everything pending before it, and wait for the controller's answer."""
        self._linked()
        fut: asyncio.Future[ToWorker] = asyncio.get_running_loop().create_future()
        self._answers[request] = fut
        self.flush()
        self.channel.send(message)
        try:
            answer = await fut
        finally:
            self._answers.pop(request, None)
        assert isinstance(answer, kind)
        return answer

    async def sync(self) -> None:
        """Return once the controller has applied everything this worker reported: a request passed
        to it next (/metrics, /sleep/status) sees this worker's requests counted."""
        request = next(self._ids)
        await self._ask(request, Sync(request), Synced)

    async def whose(self, response_id: str) -> Optional[tuple[str, str]]:
        """The (model, instance) that made a stored response this worker has not heard of, as the
        controller knows it once every worker has told it what they learned."""
        request = next(self._ids)
        return (await self._ask(request, Whose(request, response_id), WhoseAnswer)).found

    async def load_adapter(self, model: str, instance: Optional[str], adapter: str) -> Optional[tuple[int, str]]:
        """Have the controller make `instance`'s engine (None: the one it picks) hold `adapter`: None
        once it does (its `AdapterState` already applied here), else (status, message)."""
        request = next(self._ids)
        return (await self._ask(request, LoadAdapter(request, model, instance, adapter), AdapterAnswer)).refusal

    def adapter_use(self, instance: str, adapter: str, requests: int) -> None:
        self.channel.send(AdapterUse(instance, adapter, requests))

    def adapter_lost(self, instance: str, adapter: str) -> None:
        self.channel.send(AdapterLost(instance, adapter))

    async def ready(self, lc: RemoteAdmission) -> None:
        """Ask the controller to make the model ready; on success the request is already counted."""
        self._linked()
        request = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready[request] = (fut, lc)
        self.flush()
        self.channel.send(Ready(request, lc.model))
        try:
            await fut
        finally:
            self._ready.pop(request, None)

    async def quota(self, key: str, bound: int) -> Decision:
        """The controller's decision on a request of a key with limits (it owns the counters)."""
        request = next(self._ids)
        answer = await self._ask(request, Quota(request, key, bound), QuotaAnswer)
        if answer.refusal is not None:
            status, text, retry_after, standing = answer.refusal
            return request, Refusal(status, text, retry_after, Standing(*standing))
        return request, None if answer.standing is None else Standing(*answer.standing)

    def quota_done(self, request: int, used: Optional[int]) -> None:
        self.channel.send(QuotaDone(request, used))

    async def lease(self, model: str, exclude: tuple[str, ...], key: Optional[int] = None,
                    priority: int = NORMAL) -> tuple[int, str]:
        """A slot from the controller's queue: (lease id, instance); NoReplica or Overloaded if none."""
        self._linked()
        request = next(self._ids)
        fut: asyncio.Future[ToWorker] = asyncio.get_running_loop().create_future()
        self._answers[request] = fut
        self.channel.send(Lease(request, model, exclude, None, key, priority))
        try:
            answer = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and isinstance(fut.result(), Leased) \
                    and fut.result().instance is not None:  # type: ignore[union-attr]
                self.channel.send(Unlease(request))  # granted just as the request gave up
            raise
        finally:
            self._answers.pop(request, None)
        assert isinstance(answer, Leased)
        if answer.instance is None:
            status, message, retry_after = answer.refusal or (503, "", 1)
            if status == 429:
                raise Overloaded()
            raise NoReplica(retry_after, message)
        return request, answer.instance

    def pinned(self, model: str, instance: str) -> int:
        """A slot on one replica for a request bound to it: counted by the controller, not waited for."""
        request = next(self._ids)
        self.channel.send(Lease(request, model, (), instance, None, NORMAL))
        return request

    def unlease(self, request: int) -> None:
        self.channel.send(Unlease(request))

    def breaker(self, event: Event) -> None:
        """The worker's copy of a breaker moved: the controller's takes the outcome (a listener
        of the worker's events, called as `Replica.failed` or `succeeded` publishes)."""
        if event.kind == "breaker" and event.instance is not None:
            self.channel.send(BreakerOutcome(event.instance, event.state == "open", time.monotonic()))

    def changed(self, lc: RemoteAdmission) -> None:
        """`lc`'s count moved: to or from zero it reaches the controller within REPORT_SECONDS,
        otherwise within COUNTS_SECONDS (a fence or a `ready` sends everything at once)."""
        self._dirty.add(lc)
        self._schedule(REPORT_SECONDS if (lc.in_flight == 0) != (lc.reported == 0) else COUNTS_SECONDS)

    def finished(self, model: str, status: int, seconds: float, ttfb: Optional[float], stream: bool,
                 key: str = "anonymous", instance: Optional[str] = None, retries: int = 0,
                 prompt: Optional[int] = None, completion: Optional[int] = None) -> None:
        """Keep what a request did; it reaches the controller within REPORT_SECONDS, with the others."""
        self.done.append((model, status, seconds, ttfb, stream, key, instance, retries, prompt, completion))
        self._schedule(REPORT_SECONDS)

    def retried(self, model: str, reason: str) -> None:
        self.retries.append((model, reason))
        self._schedule(REPORT_SECONDS)

    def upstream_failed(self, model: str, kind: str) -> None:
        self.errors.append((model, kind))
        self._schedule(REPORT_SECONDS)

    def picked(self, model: str, hit: bool) -> None:
        """A keyed pick made here: counted with the next report (COUNTS_SECONDS at most)."""
        hits, moved = self.routed.get(model, (0, 0))
        self.routed[model] = (hits + 1, moved) if hit else (hits, moved + 1)
        self._schedule(COUNTS_SECONDS)
    def fell_back(self, model: str, to: str) -> None:
        self.fallbacks.append((model, to))
        self._schedule(REPORT_SECONDS)

    def _schedule(self, delay: float) -> None:
        """One report, sent at the earliest time anything pending asks for: under load one message
        carries many requests' counts and records."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._report is not None:
            if self._report_due <= due:
                return
            self._report.cancel()
        # The due time is kept here, not read back with `when()`: uvloop's `call_at` hands back a
        # plain Handle for a time less than a millisecond away, which a busy loop makes of 5 ms.
        self._report_due = due
        self._report = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Send the counts and records pending, in one message (slots of leased models are the
        controller's: their counts are not reported)."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if not (self._dirty or self.done or self.retries or self.errors or self.routed or self.fallbacks):
            return
        counts = {}
        outstanding = {}
        for lc in self._dirty:
            counts[lc.model] = lc.reported = lc.in_flight
            members = lc.members()
            if not leased(members):
                for r in members:
                    outstanding[r.name] = r.outstanding
        self._dirty.clear()
        report = Report(counts, outstanding, self.done, self.retries, self.errors, self.routed, self.fallbacks)
        self.done, self.retries, self.errors, self.routed, self.fallbacks = [], [], [], {}, []
        self.channel.send(report)

    def learned(self, response_id: str, model: str, instance: str) -> None:
        self.channel.send(Owner(response_id, model, instance))


def leased(replicas: tuple[Replica, ...]) -> bool:
    """Whether a model's slots are the controller's to lease: some replica has a max_concurrency."""
    return any(r.limit is not None for r in replicas)


class LeasedModel(Model):
    """A worker's model: with a max_concurrency, each slot is leased from the controller's one queue
    (so the limit and max_queue hold across workers); without one, slots are taken here, with no
    message on the request's path."""

    __slots__ = ("link", "leased", "_leases")

    def __init__(self, name: str, replicas: tuple[Replica, ...], lifecycles: LifecycleFactory, metrics: ModelMetrics,
                 retry_after: int, link: ControllerLink):
        super().__init__(name, replicas, lifecycles, metrics, retry_after)
        self.link = link
        self.leased = leased(replicas)
        #: The lease ids this worker holds on each replica (any one frees a slot).
        self._leases: dict[Replica, list[int]] = {}

    def reconfigure(self, replicas: tuple[Replica, ...], settings: SleepSettings, retry_after: int,
                    start_timeout: float) -> None:
        super().reconfigure(replicas, settings, retry_after, start_timeout)
        self.leased = leased(replicas)

    def acquire(self, now: float, exclude: tuple[Replica, ...], queue_timeout: float,
                key: Optional[int] = None, klass: int = NORMAL,
                adapter: Optional[str] = None) -> Coroutine[object, object, Replica]:
        # Not a coroutine itself: an unlimited model's request pays no extra frame.
        if adapter is not None and not any(r.loras.holds(adapter) for r in self.replicas):
            return self._placed(now, exclude, queue_timeout, key, klass, adapter)
        return (self._leased(exclude, key, klass) if self.leased
                else super().acquire(now, exclude, queue_timeout, key, klass, adapter))

    async def _placed(self, now: float, exclude: tuple[Replica, ...], queue_timeout: float, key: Optional[int],
                      klass: int, adapter: str) -> Replica:
        """No replica holds `adapter` in this worker's view: the controller loads it where it picks first
        (its AdapterState arrives before the answer), so this pick prefers that replica."""
        await self.link.load_adapter(self.name, None, adapter)
        return await (self._leased(exclude, key, klass) if self.leased
                      else super().acquire(now, exclude, queue_timeout, key, klass, adapter))

    async def _leased(self, exclude: tuple[Replica, ...], key: Optional[int], klass: int) -> Replica:
        # The controller picks on the ring with every worker's counts (and counts the hit or move).
        lease, instance = await self.link.lease(self.name, tuple(r.name for r in exclude),
                                                key if self.sticky is not None else None, klass)
        replica = next((r for r in self.replicas if r.name == instance), None)
        if replica is None:  # a reload replaced it while the answer was on its way
            self.link.unlease(lease)
            raise NoReplica(1, f"Instance {instance} of model '{self.name}' was just reconfigured; retry.")
        return self._hold(replica, lease)

    async def adapter_ready(self, replica: Replica, adapter: str) -> None:
        """The controller loads adapters (single-flight across workers); this copy only follows."""
        if adapter in replica.loras.loaded:
            return
        refusal = await self.link.load_adapter(self.name, replica.name, adapter)
        if refusal is not None:
            raise AdapterUnavailable(*refusal)

    def adapter_lost(self, replica: Replica, adapter: str) -> None:
        super().adapter_lost(replica, adapter)  # this copy at once; the controller's before the next load
        self.link.adapter_lost(replica.name, adapter)

    def adapter_use(self, replica: Replica, adapter: str, begin: bool) -> None:
        super().adapter_use(replica, adapter, begin)
        requests = replica.loras.busy.get(adapter, 0)
        if requests == (1 if begin else 0):  # busy or idle now: the controller's LRU choice needs it
            self.link.adapter_use(replica.name, adapter, requests)

    def take(self, replica: Replica) -> Replica:
        if not self.leased:
            return super().take(replica)
        super().take(replica)  # whether it may take one, and this worker's count
        self._leases.setdefault(replica, []).append(self.link.pinned(self.name, replica.name))
        return replica

    def _hold(self, replica: Replica, lease: int) -> Replica:
        replica.take_slot(time.monotonic())
        self._leases.setdefault(replica, []).append(lease)
        return replica

    def release(self, replica: Replica) -> None:
        leases = self._leases.get(replica)
        if leases:
            self.link.unlease(leases.pop())
            if not leases:
                del self._leases[replica]
        super().release(replica)
