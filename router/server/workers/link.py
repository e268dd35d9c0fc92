"""The link between the controller and its proxy workers (``router.workers: N``).

One controller process owns every model's lifecycle (health, sleep, residency,
reload, supervisord); N worker processes share the public port and forward
requests. A worker admits a request on its own while its view says the model
is awake, and asks the controller otherwise. The two ends talk over one
private unix socket per worker, in framed pickles (both ends are this
package, in processes of one user, behind a 0700 directory).

Controller -> worker, in the order the controller's state changed:

- ``("table", config, models, replicas)``: build the table (on connect and
  after each reload); `models` maps model -> state, `replicas` instance ->
  (health, process).
- ``("model", name, state)``, ``("replica", name, health, process)``: a change.
- ``("fence", n)``: answer ``("fenced", n)`` once everything before is applied.
- ``("ready", id, refusal)``: the answer to a worker's ``ready``; `refusal` is
  None (admitted) or (message, retry_after). ``("synced", id)``: the answer to
  ``("sync", id)``, sent once everything the worker sent before is applied.
- ``("owner", response_id, model, instance)``: another worker learned a stored
  response's replica. ``("whose", id, (model, instance) or None)``: the answer
  to a worker's ``whose``, sent after fencing every worker.

Worker -> controller: ``("report", {model: in_flight}, {instance: outstanding},
[records])`` (counts that changed, and finished requests for the controller's
metrics and traffic), ``("fenced", n)``, ``("ready", id, model)``, ``("sync", id)``,
``("owner", ...)`` and ``("whose", id, response_id)`` (a stored response it has
not heard of).

Why exact idle detection holds: a worker reports a model's count within
`REPORT_SECONDS` when it leaves or reaches zero (other changes within
`COUNTS_SECONDS`), so the controller's idle clock is off by milliseconds at most. When
the controller leaves AWAKE to drain, it fences every worker: a worker answers
the fence only after it has applied the new state (so it admits nothing more on
its own) and flushed its counts, so the controller then knows every request in
flight. A worker asking ``ready`` is admitted by its link reader the moment the
answer arrives, before any later state change is read.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import struct
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Optional

from router.observe.events import Event
from router.observe.metrics import ModelMetrics
from router.observe.traffic import Traffic
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.outcome import ModelUnavailable
from router.server.workers.remote import RemoteAdmission
from router.supervision.processes import ProcessState

if TYPE_CHECKING:  # the controller's state; link.py is imported by state.py
    from router.server.state import RouterState

log = logging.getLogger("router.link")

HEADER = struct.Struct("!I")
#: Longest a worker's count leaving or reaching zero, and a finished request's record, wait before
#: they reach the controller (one message per period carries them all: under load, many requests).
REPORT_SECONDS = 0.005
#: Longest other count changes wait.
COUNTS_SECONDS = 0.25
#: A worker that does not answer a fence in this time is cut off (its requests no longer count).
FENCE_TIMEOUT_SECONDS = 10.0

Message = tuple[Any, ...]
#: What a worker's requests did, for the controller's metrics and traffic:
#: (REQUEST, model, status, seconds, seconds to first byte, stream), (RETRY, model, reason)
#: or (UPSTREAM_ERROR, model, kind).
Record = tuple[Any, ...]
REQUEST, RETRY, UPSTREAM_ERROR = "request", "retry", "error"


class Channel:
    """Framed pickles over one stream; `send` writes at once (no await), so order is kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def send(self, message: Message) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(HEADER.pack(len(data)) + data)

    async def receive(self) -> Optional[Message]:
        """The next message, or None when the other end has gone."""
        try:
            size = HEADER.unpack(await self.reader.readexactly(HEADER.size))[0]
            message: Message = pickle.loads(await self.reader.readexactly(size))
            return message
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- controller


class WorkerLink:
    """The controller's end of one worker's link: what that worker has in flight."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.counts: dict[str, int] = {}
        self.outstanding: dict[str, int] = {}
        self.fenced = 0
        self.fence_waiter: Optional[asyncio.Future[None]] = None


class WorkerLinks:
    """The controller's side: serves the links, tells every worker each state change, fences them
    before a drain (`Peers` of router/server/fleet/lifecycle.py) and answers their ``ready`` and ``whose``."""

    def __init__(self, state: "RouterState"):
        self.state = state
        self.links: list[WorkerLink] = []
        self._fences = itertools.count(1)
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = False
        state.events.listen(self.on_event)

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

    # -- what flows out

    def table_message(self) -> Message:
        table = self.state.table
        return ("table", self.state.config, {m.name: m.lifecycle.state for m in table},
                {r.name: (r.health, r.process) for r in table.replicas()})

    def table_changed(self) -> None:
        """A reload swapped the table: every worker builds the new one."""
        self.broadcast(self.table_message())

    def broadcast(self, message: Message, but: Optional[WorkerLink] = None) -> None:
        for link in self.links:
            if link is not but:
                link.channel.send(message)

    def on_event(self, event: Event) -> None:
        """Called by `Events.publish` as the change happens, so messages keep the changes' order."""
        if event.kind == "model" and event.model is not None and event.instance is None:
            model = self.state.table.get(event.model)
            if model is not None and model.lifecycle.state == event.state:
                self.broadcast(("model", event.model, event.state))
        elif event.kind in ("health", "process") and event.instance is not None:
            replica = self.state.table.replica(event.instance)
            if replica is not None:
                self.broadcast(("replica", replica.name, replica.health, replica.process))

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
                link.channel.send(("fence", n))
                waits.append((link, link.fence_waiter))
        for link, waiter in waits:
            while link.fenced < n and link in self.links:
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), FENCE_TIMEOUT_SECONDS)
                except asyncio.TimeoutError:
                    log.error("a proxy worker did not answer a fence in %gs; cutting it off", FENCE_TIMEOUT_SECONDS)
                    link.channel.close()
                    self._drop(link)
                    break
                if link.fenced < n:
                    waiter = link.fence_waiter = loop.create_future()

    # -- what comes in

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = WorkerLink(Channel(reader, writer))
        if not self._serving:  # the first worker serves once it has the table sent below
            self._serving = True
            self.state.begin_serving()
        self.links.append(link)
        link.channel.send(self.table_message())
        try:
            while True:
                message = await link.channel.receive()
                if message is None:
                    break
                self._take(link, message)
        finally:
            self._drop(link)
            link.channel.close()

    def _drop(self, link: WorkerLink) -> None:
        """A worker went away: what it had in flight no longer is."""
        if link not in self.links:
            return
        self.links.remove(link)
        self._apply_counts(link, {k: 0 for k, n in link.counts.items() if n},
                           {k: 0 for k, n in link.outstanding.items() if n})
        if link.fence_waiter is not None and not link.fence_waiter.done():
            link.fence_waiter.set_result(None)

    def _take(self, link: WorkerLink, message: Message) -> None:
        op = message[0]
        if op == "report":
            self._apply_counts(link, message[1], message[2])
            self._records(message[3])
        elif op == "fenced":
            link.fenced = max(link.fenced, message[1])
            if link.fence_waiter is not None and not link.fence_waiter.done():
                link.fence_waiter.set_result(None)
        elif op == "sync":  # everything this worker sent before is applied
            link.channel.send(("synced", message[1]))
        elif op == "ready":
            self._spawn(self._ready(link, message[1], message[2]))
        elif op == "whose":
            self._spawn(self._whose(link, message[1], message[2]))
        elif op == "owner":
            self._owner(link, message)

    def _spawn(self, answer: Coroutine[Any, Any, None]) -> None:
        """Answer a worker's question that needs waiting for, while its other messages go on."""
        task = asyncio.ensure_future(answer)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _apply_counts(self, link: WorkerLink, counts: dict[str, int], outstanding: dict[str, int]) -> None:
        """A worker's latest counts (absolute, for the models and instances that changed)."""
        table = self.state.table
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

    async def _ready(self, link: WorkerLink, request: int, name: str) -> None:
        model = self.state.table.get(name)
        if model is None:
            link.channel.send(("ready", request, (f"The model '{name}' does not exist any more.", 1)))
            return
        try:
            await model.lifecycle.ready()
        except ModelUnavailable as e:
            link.channel.send(("ready", request, (e.message, e.retry_after)))
            return
        # No await since ready() saw AWAKE: any later state change is sent after this answer.
        link.channel.send(("ready", request, None))

    async def _whose(self, link: WorkerLink, request: int, response_id: str) -> None:
        found = await self.state.owners.find(response_id)
        link.channel.send(("whose", request, None if found is None else (found.model.name, found.replica.name)))

    def _records(self, records: list[Record]) -> None:
        table = self.state.table
        traffic = self.state.traffic
        for record in records:
            model = table.get(record[1])
            if model is None:
                continue
            if record[0] == REQUEST:
                _, name, status, seconds, ttfb, stream = record
                model.metrics.observe(status, seconds, ttfb)
                traffic.record(name, status, seconds, ttfb, stream)
            elif record[0] == RETRY:
                model.metrics.retry(record[2])
            else:
                model.metrics.upstream_error(record[2])

    def _owner(self, link: WorkerLink, message: Message) -> None:
        _, response_id, name, instance = message
        model = self.state.table.get(name)
        replica = self.state.table.replica(instance)
        if model is not None and replica is not None:
            self.state.owners.remember(response_id, model, replica)
            self.broadcast(message, but=link)


# ----------------------------------------------------------------------------- worker


class ControllerLink:
    """A worker's end: applies the controller's changes to its view and reports what it admits."""

    def __init__(self, channel: Channel, on_table: Callable[[Message], None],
                 model: Callable[[str], Optional[Lifecycle]], replica_changed: Callable[[str, str, Optional[ProcessState]], None],
                 owner: Callable[[str, str, str], None]):
        self.channel = channel
        self._on_table = on_table
        self._model = model
        self._replica_changed = replica_changed
        self._owner = owner
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[Any], Optional[RemoteAdmission]]] = {}
        self._dirty: set[RemoteAdmission] = set()
        self._report: Optional[asyncio.Handle] = None
        self._report_due = 0.0
        self.records: list[Record] = []

    @classmethod
    async def connect(cls, path: str, **handlers: Any) -> "ControllerLink":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(Channel(reader, writer), **handlers)

    async def run(self) -> None:
        """Apply the controller's messages until it goes away."""
        try:
            while True:
                message = await self.channel.receive()
                if message is None:
                    return
                self._take(message)
        finally:
            for fut, _ in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ModelUnavailable("the router's controller went away", 1))
            self._waiting.clear()

    def _take(self, message: Message) -> None:
        op = message[0]
        if op == "model":
            lc = self._model(message[1])
            if lc is not None:
                lc.mirror(message[2])
        elif op == "replica":
            self._replica_changed(message[1], message[2], message[3])
        elif op == "fence":
            self.flush()
            self.channel.send(("fenced", message[1]))
        elif op == "ready":
            fut, lc = self._waiting.pop(message[1], (None, None))
            if fut is None or lc is None or fut.done():
                return
            refusal = message[2]
            if refusal is None:
                lc.admitted()  # now, before any later message is read
                fut.set_result(None)
            else:
                fut.set_exception(ModelUnavailable(refusal[0], refusal[1]))
        elif op in ("synced", "whose"):
            fut, _ = self._waiting.pop(message[1], (None, None))
            if fut is not None and not fut.done():
                fut.set_result(message[2] if op == "whose" else None)
        elif op == "table":
            self._on_table(message)
        elif op == "owner":
            self._owner(message[1], message[2], message[3])

    async def sync(self) -> None:
        """Return once the controller has applied everything this worker reported: a request passed
        to it next (/metrics, /sleep/status) sees this worker's requests counted."""
        await self._ask("sync")

    async def ready(self, lc: "RemoteAdmission") -> None:
        """Ask the controller to make the model ready; on success the request is already counted."""
        await self._ask("ready", lc.model, lc=lc)

    async def whose(self, response_id: str) -> Optional[tuple[str, str]]:
        """The (model, instance) that made a stored response this worker has not heard of, as the
        controller knows it once every worker has told it what they learned."""
        found: Optional[tuple[str, str]] = await self._ask("whose", response_id)
        return found

    async def _ask(self, op: str, *args: Any, lc: Optional["RemoteAdmission"] = None) -> Any:
        """Send `op` with everything pending before it, and wait for the controller's answer."""
        request = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request] = (fut, lc)
        self.flush()
        self.channel.send((op, request, *args))
        try:
            return await fut
        finally:
            self._waiting.pop(request, None)

    def changed(self, lc: "RemoteAdmission") -> None:
        """`lc`'s count moved: to or from zero it reaches the controller within REPORT_SECONDS,
        otherwise within COUNTS_SECONDS (a fence or a `ready` sends everything at once)."""
        self._dirty.add(lc)
        self._schedule(REPORT_SECONDS if (lc.in_flight == 0) != (lc.reported == 0) else COUNTS_SECONDS)

    def record(self, item: Record) -> None:
        """Keep what a request did; it reaches the controller within REPORT_SECONDS, with the others."""
        self.records.append(item)
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
        """Send the counts and records pending, in one message."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if not self._dirty and not self.records:
            return
        counts = {}
        outstanding = {}
        for lc in self._dirty:
            counts[lc.model] = lc.reported = lc.in_flight
            for r in lc.members():
                outstanding[r.name] = r.outstanding
        self._dirty.clear()
        records, self.records = self.records, []
        self.channel.send(("report", counts, outstanding, records))

    def learned(self, response_id: str, model: str, instance: str) -> None:
        self.channel.send(("owner", response_id, model, instance))


class RelayedTraffic(Traffic):
    """A worker's traffic: each finished request goes to the controller, which owns the figures
    (its metrics too: the controller observes the request there)."""

    def __init__(self, link: ControllerLink):
        super().__init__(())
        self._link = link

    def record(self, model: str, status: int, latency_s: float, ttfb_s: Optional[float], stream: bool) -> None:
        self._link.record((REQUEST, model, status, latency_s, ttfb_s, stream))


class RelayedMetrics(ModelMetrics):
    """A worker's metrics of one model: retries and engine failures go to the controller; a
    request's status and times go there through `RelayedTraffic` (one record per request)."""

    __slots__ = ("_link",)

    def __init__(self, model: str, link: ControllerLink):
        super().__init__(model)
        self._link = link

    def observe(self, status: int, latency_s: float, ttfb_s: Optional[float]) -> None:
        return None

    def retry(self, reason: str) -> None:
        self._link.record((RETRY, self.model, reason))

    def upstream_error(self, kind: str) -> None:
        self._link.record((UPSTREAM_ERROR, self.model, kind))
