"""The controller's end of the links to its proxy workers (messages and owners: messages.py).

It serves one unix socket, tells every worker each change of what the
controller owns (the table, model states, replica health and breakers), fences
them before a drain (`Peers` of router/server/fleet/lifecycle.py), leases the
slots of limited models from the controller's own queue, and merges what the
workers own (counts, finished requests, breaker outcomes, response owners).
It reads the controller's state through `Fleet`, a narrow view, so this module
does not import the state that builds it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Callable, Coroutine, Optional, Protocol

from router.config import Config
from router.observe.events import Event, Events
from router.observe.traffic import Traffic
from router.server.fleet.adapters import AdapterUnavailable
from router.server.fleet.lifecycle import ModelUnavailable
from router.server.fleet.models import Model, ModelTable, NoReplica, Overloaded
from router.server.fleet.replica import Replica
from router.server.proxy.affinity import Owner as StoredOwner
from router.server.workers.messages import (
    FENCE_TIMEOUT_SECONDS,
    PROTOCOL,
    AdapterAnswer,
    AdapterLost,
    AdapterState,
    AdapterUse,
    Applied,
    BreakerOutcome,
    BreakerState,
    Channel,
    Fence,
    Fenced,
    Hello,
    Lease,
    Leased,
    LoadAdapter,
    Message,
    ModelState,
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
    Unlease,
    Whose,
    WhoseAnswer,
    Wire,
)
from router.tenants.quota import Quotas, Refusal

log = logging.getLogger("router.link")


class ResponseOwners(Protocol):
    def remember(self, response_id: str, model: Model, replica: Replica) -> None: ...

    async def find(self, response_id: str) -> Optional[StoredOwner]: ...


class Fleet(Protocol):
    """What the links read of the controller's state (`RouterState`), afresh at each use."""

    @property
    def table(self) -> ModelTable: ...

    @property
    def config(self) -> Config: ...

    @property
    def events(self) -> Events: ...

    @property
    def owners(self) -> ResponseOwners: ...

    @property
    def traffic(self) -> Traffic: ...

    @property
    def quotas(self) -> Quotas: ...


def adapter_state(replica: Replica) -> AdapterState:
    return AdapterState(replica.name, tuple(replica.loras.loaded), tuple(replica.loras.loading))


class WorkerLink:
    """The controller's end of one worker's link: what that worker has in flight and leased."""

    def __init__(self, channel: Wire, pid: int = 0):
        self.channel = channel
        self.pid = pid
        self.counts: dict[str, int] = {}
        self.outstanding: dict[str, int] = {}
        #: The worker's lease id -> the model and replica whose slot it holds.
        self.leases: dict[int, tuple[Model, Replica]] = {}
        #: The worker's quota id -> the key and token bound of a request it let in (router/tenants/quota.py).
        self.quotas: dict[int, tuple[str, int]] = {}
        #: Leases waiting in a model's queue for this worker.
        self.waiting: set[asyncio.Task[None]] = set()
        #: The table generation the worker serves (0: none yet).
        self.generation = 0
        self.fenced = 0
        self.fence_waiter: Optional[asyncio.Future[None]] = None
        #: (instance, adapter) -> this worker's requests using that adapter there.
        self.adapter_uses: dict[tuple[str, str], int] = {}


class WorkerLinks:
    """The controller's side: serves the links, pushes what it owns, merges what the workers own."""

    def __init__(self, fleet: Fleet, begin_serving: Callable[[], None]):
        self.fleet = fleet
        self.begin_serving = begin_serving
        self.links: list[WorkerLink] = []
        #: The table's generation: one more at each reload; each worker acknowledges the one it serves.
        self.generation = 1
        self._fences = itertools.count(1)
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = False
        fleet.events.listen(self.on_event)

    async def serve(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._accept, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.channel.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def report(self) -> list[dict[str, int]]:
        """Each connected worker's pid and the table generation it has acknowledged."""
        return [{"pid": link.pid, "generation": link.generation} for link in self.links]

    # -- what flows out

    def table_message(self) -> Table:
        table = self.fleet.table
        return Table(self.generation, self.fleet.config, {m.name: m.lifecycle.state for m in table},
                     {r.name: (r.health, r.process, r.breaker.open_until, r.breaker.opened_for)
                      for r in table.replicas()})

    def table_changed(self) -> None:
        """A reload swapped the table: every worker builds the new one, and acknowledges it."""
        self.generation += 1
        self.broadcast(self.table_message())
        for message in self.adapter_states():
            self.broadcast(message)

    def adapter_states(self) -> list[AdapterState]:
        """What every engine that may serve LoRA adapters holds now (sent after each `Table`)."""
        return [adapter_state(r) for r in self.fleet.table.replicas() if r.loras.known]

    def broadcast(self, message: Message, but: Optional[WorkerLink] = None) -> None:
        for link in self.links:
            if link is not but:
                link.channel.send(message)

    def on_event(self, event: Event) -> None:
        """Called by `Events.publish` as the change happens, so messages keep the changes' order."""
        if event.kind == "model" and event.model is not None and event.instance is None:
            model = self.fleet.table.get(event.model)
            if model is not None and model.lifecycle.state == event.state:
                self.broadcast(ModelState(event.model, event.state))
        elif event.kind in ("health", "process", "breaker", "lora") and event.instance is not None:
            replica = self.fleet.table.replica(event.instance)
            if replica is None:
                return
            if event.kind in ("process", "lora") and replica.loras.known:  # a restart forgets them too
                self.broadcast(adapter_state(replica))
                if event.kind == "lora":
                    return
            if event.kind != "breaker":
                self.broadcast(ReplicaState(replica.name, replica.health, replica.process))
            if event.kind != "process":  # a probe that finds it healthy again closes its breaker
                self.broadcast(BreakerState(replica.name, replica.breaker.open_until, replica.breaker.opened_for))

    async def fence(self) -> None:
        """Return once every worker has applied what was sent before and reported its counts."""
        if not self.links:
            return
        n = next(self._fences)
        loop = asyncio.get_running_loop()
        waits = []
        for link in list(self.links):
            if link.fenced < n:
                link.fence_waiter = link.fence_waiter if link.fence_waiter and not link.fence_waiter.done() \
                    else loop.create_future()
                link.channel.send(Fence(n))
                waits.append((link, link.fence_waiter))
        for link, waiter in waits:
            while link.fenced < n and link in self.links:
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), FENCE_TIMEOUT_SECONDS)
                except asyncio.TimeoutError:
                    log.error("a proxy worker did not answer a fence in %gs; cutting it off", FENCE_TIMEOUT_SECONDS)
                    link.channel.close()
                    self.drop(link)
                    break
                if link.fenced < n:
                    waiter = link.fence_waiter = loop.create_future()

    # -- what comes in

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.connect(Channel(reader, writer))

    async def connect(self, channel: Wire) -> None:
        """Serve a worker that speaks this protocol, until it goes away; refuse any other."""
        hello = await channel.receive()
        if not isinstance(hello, Hello) or hello.protocol != PROTOCOL:
            said = f"protocol {hello.protocol}" if isinstance(hello, Hello) else f"{type(hello).__name__}"
            reason = (f"this controller speaks link protocol {PROTOCOL} and the proxy worker {said}: "
                      "they run different code; restart the router so both run the installed one")
            log.error("proxy worker refused: %s", reason)
            channel.send(Refused(reason))
            channel.close()
            return
        await self.run(WorkerLink(channel, hello.pid))

    async def run(self, link: WorkerLink) -> None:
        if not self._serving:  # the first worker serves once it has the table sent below
            self._serving = True
            self.begin_serving()
        self.links.append(link)
        link.channel.send(self.table_message())
        for state in self.adapter_states():
            link.channel.send(state)
        try:
            while True:
                message = await link.channel.receive()
                if message is None:
                    break
                self.take(link, message)
        finally:
            self.drop(link)
            link.channel.close()

    def drop(self, link: WorkerLink) -> None:
        """A worker went away: what it had in flight no longer is, its leased slots are free, its
        queued leases leave the queue."""
        if link not in self.links:
            return
        self.links.remove(link)
        self._apply_counts(link, {k: 0 for k, n in link.counts.items() if n},
                           {k: 0 for k, n in link.outstanding.items() if n})
        for task in list(link.waiting):
            task.cancel()
        leases, link.leases = link.leases, {}
        for model, replica in leases.values():
            model.release(replica)
        quotas, link.quotas = link.quotas, {}
        for key, bound in quotas.values():  # ended with the worker: charged their bound
            self.fleet.quotas.finish(key, time.monotonic(), bound, None)
        if link.fence_waiter is not None and not link.fence_waiter.done():
            link.fence_waiter.set_result(None)
        for instance, adapter in list(link.adapter_uses):
            self._adapter_use(link, AdapterUse(instance, adapter, 0))

    def take(self, link: WorkerLink, message: Message) -> None:
        match message:
            case Report():
                self._apply_counts(link, message.counts, message.outstanding)
                self._records(message)
            case Unlease():
                lease = link.leases.pop(message.request, None)
                if lease is not None:
                    lease[0].release(lease[1])
            case Lease():
                self._lease(link, message)
            case Quota():
                self._quota(link, message)
            case QuotaDone():
                quota = link.quotas.pop(message.request, None)
                if quota is not None:
                    self.fleet.quotas.finish(quota[0], time.monotonic(), quota[1], message.used)
            case BreakerOutcome():
                self._breaker(message)
            case Fenced():
                link.fenced = max(link.fenced, message.n)
                if link.fence_waiter is not None and not link.fence_waiter.done():
                    link.fence_waiter.set_result(None)
            case Applied():
                link.generation = message.generation
            case Sync():  # everything this worker sent before is applied
                link.channel.send(Synced(message.request))
            case Ready():
                self._spawn(self._ready(link, message))
            case Whose():
                self._spawn(self._whose(link, message))
            case Owner():
                self._owner(link, message)
            case LoadAdapter():
                self._spawn(self._load_adapter(link, message))
            case AdapterUse():
                self._adapter_use(link, message)
            case AdapterLost():
                found = self.fleet.table.instance(message.instance)
                if found is not None:
                    found[0].adapter_lost(found[1], message.adapter)
            case _:
                log.error("a proxy worker sent %s, which a controller does not take", type(message).__name__)

    def _spawn(self, answer: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Answer a worker's question that needs waiting for, while its other messages go on."""
        task = asyncio.ensure_future(answer)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _apply_counts(self, link: WorkerLink, counts: dict[str, int], outstanding: dict[str, int]) -> None:
        """A worker's latest counts (absolute, for the models and instances that changed)."""
        table = self.fleet.table
        for name, n in counts.items():
            delta = n - link.counts.get(name, 0)
            link.counts[name] = n
            model = table.get(name)
            if model is None:
                continue
            if delta:
                model.lifecycle.count(delta)
            if n == 0 and delta >= 0:  # requests began and ended within one report: used just now
                model.lifecycle.touch()
        for name, n in outstanding.items():
            delta = n - link.outstanding.get(name, 0)
            link.outstanding[name] = n
            replica = table.replica(name)
            if delta and replica is not None:
                replica.count_remote(delta)

    def _lease(self, link: WorkerLink, message: Lease) -> None:
        model = self.fleet.table.get(message.model)
        if model is None:
            link.channel.send(Leased(message.request, None, (503, f"The model '{message.model}' does not exist "
                                                                  "any more.", 1)))
            return
        if message.pin is not None:
            # A follow-up bound to one replica cannot wait for another: it is counted, not held.
            pinned = next((r for r in model.replicas if r.name == message.pin), None)
            if pinned is not None:
                pinned.take_slot(time.monotonic())
                link.leases[message.request] = (model, pinned)
            return
        try:
            replica = model.pick(time.monotonic(), tuple(r for r in model.replicas if r.name in message.exclude),
                                 message.key)
        except Overloaded:
            task = self._spawn(self._queued_lease(link, model, message))
            link.waiting.add(task)
            task.add_done_callback(link.waiting.discard)
            return
        except NoReplica as e:
            link.channel.send(Leased(message.request, None, (503, e.message, e.retry_after)))
            return
        link.leases[message.request] = (model, replica)
        link.channel.send(Leased(message.request, replica.name, None))

    async def _queued_lease(self, link: WorkerLink, model: Model, message: Lease) -> None:
        """Every replica is full: the lease waits in the model's one queue, behind every worker's."""
        exclude = tuple(r for r in model.replicas if r.name in message.exclude)
        try:
            replica = await model.acquire(time.monotonic(), exclude, self.fleet.config.router.queue_timeout_seconds,
                                          message.key, message.priority)
        except Overloaded:
            link.channel.send(Leased(message.request, None, (429, "", 1)))
            return
        except NoReplica as e:
            link.channel.send(Leased(message.request, None, (503, e.message, e.retry_after)))
            return
        if link not in self.links:  # the worker went away while its lease waited
            model.release(replica)
            return
        link.leases[message.request] = (model, replica)
        link.channel.send(Leased(message.request, replica.name, None))

    def _quota(self, link: WorkerLink, message: Quota) -> None:
        """Decide on the controller's counters, which every worker's requests of the key share."""
        got = self.fleet.quotas.admit(message.key, time.monotonic(), message.bound)
        if isinstance(got, Refusal):
            link.channel.send(QuotaAnswer(message.request, None, (got.status, got.message, got.retry_after,
                                                                  tuple(got.standing))))  # type: ignore[arg-type]
            return
        if got is not None:
            link.quotas[message.request] = (message.key, message.bound)
        link.channel.send(QuotaAnswer(message.request, None if got is None else tuple(got), None))  # type: ignore[arg-type]

    def _breaker(self, message: BreakerOutcome) -> None:
        """A worker's request failed (or a half-open one succeeded): the controller's breaker takes
        it, and its `breaker` event pushes the outcome to every worker (`on_event`)."""
        found = self.fleet.table.instance(message.instance)
        if found is None:
            return
        model, replica = found
        if message.failed:
            model.failed(replica, message.at, self.fleet.config.router)
        else:
            replica.succeeded()

    async def _ready(self, link: WorkerLink, message: Ready) -> None:
        model = self.fleet.table.get(message.model)
        if model is None:
            link.channel.send(ReadyAnswer(message.request, (f"The model '{message.model}' does not exist any more.", 1)))
            return
        try:
            await model.lifecycle.ready()
        except ModelUnavailable as e:
            link.channel.send(ReadyAnswer(message.request, (e.message, e.retry_after)))
            return
        # No await since ready() saw AWAKE: any later state change is sent after this answer.
        link.channel.send(ReadyAnswer(message.request, None))

    async def _load_adapter(self, link: WorkerLink, message: LoadAdapter) -> None:
        """Load for a worker, with the controller's one loader: single-flight across workers."""
        if message.instance is None:
            placed = self.fleet.table.get(message.model)
            if placed is not None:
                await placed.place_adapter(message.adapter)
            link.channel.send(AdapterAnswer(message.request, None))
            return
        found = self.fleet.table.instance(message.instance)
        if found is None:
            link.channel.send(AdapterAnswer(message.request, (503, f"Instance {message.instance} was just "
                                                                    "reconfigured; retry.")))
            return
        model, replica = found
        try:
            await model.adapter_ready(replica, message.adapter)
        except AdapterUnavailable as e:
            link.channel.send(AdapterAnswer(message.request, (e.status, e.message)))
            return
        link.channel.send(AdapterAnswer(message.request, None))  # after the `lora` event's AdapterState

    def _adapter_use(self, link: WorkerLink, message: AdapterUse) -> None:
        key = (message.instance, message.adapter)
        delta = message.requests - link.adapter_uses.pop(key, 0)
        if message.requests:
            link.adapter_uses[key] = message.requests
        replica = self.fleet.table.replica(message.instance)
        if replica is not None and delta:
            replica.loras.count_remote(message.adapter, delta, time.monotonic())

    async def _whose(self, link: WorkerLink, message: Whose) -> None:
        found = await self.fleet.owners.find(message.response_id)
        link.channel.send(WhoseAnswer(message.request, None if found is None else (found.model.name, found.replica.name)))

    def _records(self, report: Report) -> None:
        table = self.fleet.table
        traffic = self.fleet.traffic
        for name, status, seconds, ttfb, stream, key, instance, retries, prompt, completion in report.done:
            model = table.get(name)
            if model is not None:
                model.metrics.observe(status, seconds, ttfb, key, prompt, completion)
                traffic.record(name, status, seconds, ttfb, stream, key, prompt, completion, instance, retries)
        for name, reason in report.retries:
            model = table.get(name)
            if model is not None:
                model.metrics.retry(reason)
        for name, kind in report.errors:
            model = table.get(name)
            if model is not None:
                model.metrics.upstream_error(kind)
        for name, (hits, moved) in report.routed.items():
            model = table.get(name)
            if model is not None:
                model.metrics.hits += hits
                model.metrics.moved += moved
        for name, to in report.fallbacks:
            model = table.get(name)
            if model is not None:
                model.metrics.fallback(to)

    def _owner(self, link: WorkerLink, message: Owner) -> None:
        model = self.fleet.table.get(message.model)
        replica = self.fleet.table.replica(message.instance)
        if model is not None and replica is not None:
            self.fleet.owners.remember(message.response_id, model, replica)
            self.broadcast(message, but=link)
