"""Proxy workers (``router.workers: N``): N processes forward requests on one port beside the
controller, which owns every model's lifecycle.

A worker's table is built from the controller's config and states
(router/server/workers/messages.py says what is owned where). It decides only
what needs no one else: it admits requests on its own while a model is awake
and healthy, picks among replicas without a limit, and opens its copy of a
breaker on a failure it sees (the controller then opens it everywhere). It asks
the controller for everything else: a wake or a start, and a slot of any model
with a max_concurrency, leased from the controller's one queue. Every path that is not a proxied request (listings, health,
metrics, admin, events, logs, the page) is passed through to the controller
over its private unix socket, so those answers come from the owner.

`WorkerProcesses` is the controller's side: it starts the workers, starts one
again when it dies, and stops them first on shutdown so their streams end
while the controller can still wake or start models for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from multiprocessing.process import BaseProcess
from typing import Awaitable, Callable, Optional

import aiohttp
import uvicorn

from router.config import Config
from router.observe.accesslog import AccessLog
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.control import EngineControl
from router.server.fleet.lifecycle import Lifecycle, ModelUnavailable
from router.server.fleet.models import LifecycleFactory, Model, ModelTable
from router.server.fleet.replica import Replica
from router.server.http.app import RouterApp
from router.server.proxy.affinity import Owner, ResponseOwners
from router.server.proxy.auth import Guard
from router.server.proxy.forward import Proxy
from router.server.proxy.reply import Receive, Scope, Send
from router.server.proxy.request import DROP_REQUEST_HEADERS
from router.server.proxy.tenants import tenants_for
from router.server.workers.messages import AdapterState, BreakerState, ReplicaState, Table
from router.server.workers.messages import Owner as OwnerMessage
from router.server.workers.relayed import ControllerGate, RelayedMetrics, RelayedTraffic
from router.server.workers.remote import RemoteAdmission
from router.server.workers.worker_end import ControllerLink, LeasedModel

log = logging.getLogger("router.worker")

#: Response headers of the controller not relayed (the worker's server sets its own framing).
DROP_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server"})
#: A worker that dies sooner than this after its start is started again only after a pause.
QUICK_DEATH_SECONDS = 5.0
RESTART_PAUSE_SECONDS = 2.0


class WorkerState:
    """One worker's view of the router: the controller's table, with this process's proxy."""

    def __init__(self, link: ControllerLink, config: Config):
        self.link = link
        self.config = config
        self.events = Events()
        self.events.listen(link.breaker)
        self.control = EngineControl(None)
        self.traffic = RelayedTraffic(link)
        self.owners = ResponseOwners(on_learn=lambda rid, m, r: link.learned(rid, m.name, r.name),
                                     elsewhere=self.owner_from_controller)
        self.table = self.build(config)
        self.access_log: Optional[AccessLog] = AccessLog() if config.router.access_log else None
        self.proxy = self.make_proxy(config)
        self.guard = Guard(config.router, self.table.client_paths)

    def make_proxy(self, config: Config) -> Proxy:
        """This worker's proxy; limited keys are counted by the controller."""
        proxy = Proxy(self.table, config.router, self.traffic, self.access_log, self.owners)
        proxy.tenants = tenants_for(config.router.api_keys, self.table, ControllerGate(self.link))
        return proxy

    def build(self, config: Config, previous: Optional[ModelTable] = None) -> ModelTable:
        """The table for `config`: lifecycle views, metrics relayed to the controller."""
        def lifecycle(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
            return Lifecycle(name, members, config.sleep, self.control, self.events,
                             admission=RemoteAdmission.factory(self.link))
        def model(name: str, replicas: tuple[Replica, ...], lifecycles: LifecycleFactory, metrics: ModelMetrics,
                  retry_after: int) -> Model:
            return LeasedModel(name, replicas, lifecycles, metrics, retry_after, link=self.link)
        return ModelTable.build(config, self.events, lambda name: RelayedMetrics(name, self.link), lifecycle,
                                previous=previous, model_type=model)

    def apply_table(self, message: Table) -> None:
        """The controller's table: on connect and after each reload."""
        config, models, replicas = message.config, message.models, message.replicas
        if config is not self.config:
            self.config = config
            self.table = self.build(config, previous=self.table)
            if config.router.access_log != (self.access_log is not None):
                self.access_log = AccessLog() if config.router.access_log else None
            self.proxy = self.make_proxy(config)
            self.guard = Guard(config.router, self.table.client_paths)
        for model in self.table:
            if model.name in models:
                model.lifecycle.mirror(models[model.name])
        for name, (health, process, open_until, opened_for) in replicas.items():
            self.replica_changed(ReplicaState(name, health, process))
            self.breaker_changed(BreakerState(name, open_until, opened_for))

    def lifecycle(self, name: str) -> Optional[Lifecycle]:
        model = self.table.get(name)
        return model.lifecycle if model is not None else None

    def replica_changed(self, message: ReplicaState | AdapterState) -> None:
        found = self.table.instance(message.instance)
        if found is None:
            return
        model, replica = found
        if isinstance(message, AdapterState):
            replica.loras.follow(message.loaded, message.loading)
            return
        replica.apply_report(message.health, message.process)
        model.dispatch()

    def breaker_changed(self, message: BreakerState) -> None:
        replica = self.table.replica(message.instance)
        if replica is not None:
            replica.follow_breaker(message.open_until, message.opened_for)

    async def owner_from_controller(self, response_id: str) -> Optional[Owner]:
        """A stored response this worker has not heard of (a follow-up can outrun the news of
        its id from the worker that relayed it): the controller's answer, or None if unknown."""
        try:
            found = await self.link.whose(response_id)
        except ModelUnavailable:  # the controller went away
            return None
        if found is None:
            return None
        model, replica = self.table.get(found[0]), self.table.replica(found[1])
        return Owner(model, replica) if model is not None and replica is not None else None

    def owner(self, message: OwnerMessage) -> None:
        model = self.table.get(message.model)
        replica = self.table.replica(message.instance)
        if model is not None and replica is not None:
            self.owners.remember(message.response_id, model, replica)


class Controller:
    """Everything but proxied requests, passed through to the controller's own server, once the
    controller has applied all this worker reported (so /metrics after a batch counts it)."""

    def __init__(self, http_path: str, sync: Callable[[], Awaitable[None]]):
        self.http_path = http_path
        self.sync = sync
        self.session: Optional[aiohttp.ClientSession] = None

    def open(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.http_path),
                                             auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k not in DROP_REQUEST_HEADERS]
        await self.sync()
        relay = asyncio.ensure_future(self._relay(scope["method"], target.decode("latin-1"), headers, bytes(body),
                                                  send))
        gone = asyncio.ensure_future(receive())  # an SSE follower (GET /events) ends when its client leaves
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                if not task.done():
                    task.cancel()
            await asyncio.gather(relay, gone, return_exceptions=True)
        if relay.done() and not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]

    async def _relay(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                     send: Send) -> None:
        assert self.session is not None
        async with self.session.request(method, "http://controller" + target, headers=headers, data=body,
                                        allow_redirects=False, skip_auto_headers=("User-Agent", "Accept-Encoding",
                                                                                   "Content-Type")) as resp:
            out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower().decode() not in DROP_RESPONSE_HEADERS]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


class WorkerApp:
    """The worker's ASGI app: connects to the controller at start-up, then serves like the router."""

    def __init__(self, link_path: str, http_path: str, on_controller_gone: Callable[[], None]):
        self.link_path = link_path
        self.controller = Controller(http_path, self.sync)
        self.on_controller_gone = on_controller_gone
        self.state: Optional[WorkerState] = None
        self.router: Optional[RouterApp] = None
        self._tasks: list[asyncio.Task[None]] = []

    async def sync(self) -> None:
        if self.state is not None:
            await self.state.link.sync()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self.lifespan(receive, send)
        if scope["type"] != "http":
            return
        assert self.router is not None
        await self.router(scope, receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": f"{type(e).__name__}: {e}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_table(message: Table) -> None:
            # Built here, as the link reads the table: the changes after it find the state, and the
            # generation the link then acknowledges is the one this worker serves.
            if self.state is None:
                self.state = WorkerState(link, message.config)
                self.router = RouterApp(self.state, self.controller)
                first.set_result(None)
            self.state.apply_table(message)

        def lifecycle(name: str) -> Optional[Lifecycle]:
            return self.state.lifecycle(name) if self.state is not None else None

        link = await ControllerLink.connect(
            self.link_path, on_table=on_table, model=lifecycle,
            replica_changed=lambda m: self.state.replica_changed(m) if self.state is not None else None,
            breaker_changed=lambda m: self.state.breaker_changed(m) if self.state is not None else None,
            owner=lambda m: self.state.owner(m) if self.state is not None else None)
        follow = asyncio.ensure_future(self._follow(link))
        self._tasks.append(follow)

        def gone(_: object) -> None:  # refused (protocol), or the controller went away before its table
            if not first.done():
                first.set_exception(RuntimeError(link.refused or "the router's controller went away"))
        follow.add_done_callback(gone)
        await asyncio.wait_for(first, 30)
        self.controller.open()

    async def _follow(self, link: ControllerLink) -> None:
        await link.run()
        log.warning("the router's controller went away; this proxy worker stops")
        self.on_controller_gone()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.state is not None:
            self.state.link.flush()
            if self.state.access_log is not None:
                self.state.access_log.flush()
            for replica in self.state.table.replicas():
                replica.pool.close()
        await self.controller.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """The public port, shared by every worker (SO_REUSEPORT: the kernel spreads connections)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_worker(link_path: str, http_path: str, host: str, port: int, uvicorn_options: dict[str, object]) -> None:
    """A worker process's main (started by `WorkerProcesses`)."""
    logging.basicConfig(level=str(uvicorn_options.get("log_level", "info")).upper().replace("TRACE", "DEBUG"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: Optional[uvicorn.Server] = None

    def gone() -> None:
        if server is not None:
            server.should_exit = True
    app = WorkerApp(link_path, http_path, gone)
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options))  # type: ignore[arg-type]
    server.run(sockets=[listening_socket(host, port)])


class WorkerProcesses:
    """The controller's workers: started, started again when one dies, stopped first at shutdown."""

    def __init__(self, count: int, link_path: str, http_path: str, host: str, port: int,
                 uvicorn_options: dict[str, object], grace: float):
        self.count = count
        self.args = (link_path, http_path, host, port, uvicorn_options)
        self.grace = grace
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[Optional[BaseProcess]] = [None] * count
        self.started_at = [0.0] * count
        self.stopping = False
        self._watch: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        # The port must be free for the workers: fail here, naming it, rather than in N children.
        listening_socket(str(self.args[2]), int(self.args[3])).close()
        for i in range(self.count):
            self._spawn(i)
        self._watch = asyncio.ensure_future(self._watch_loop())

    def _spawn(self, i: int) -> None:
        p = self.context.Process(target=run_worker, args=self.args, name=f"router-worker-{i}", daemon=False)
        p.start()
        self.processes[i] = p
        self.started_at[i] = time.monotonic()
        log.info("proxy worker %d started (pid %s)", i, p.pid)

    async def _watch_loop(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for i, p in enumerate(self.processes):
                if self.stopping or p is None or p.exitcode is None:
                    continue
                log.error("proxy worker %d (pid %s) exited with %s; starting it again", i, p.pid, p.exitcode)
                if time.monotonic() - self.started_at[i] < QUICK_DEATH_SECONDS:
                    await asyncio.sleep(RESTART_PAUSE_SECONDS)
                if not self.stopping:
                    self._spawn(i)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p is not None and p.pid is not None]

    async def stop(self) -> None:
        """SIGTERM every worker (they finish their requests and streams, up to the grace time), then wait."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        alive = [p for p in self.processes if p is not None and p.exitcode is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.grace + 5
        while any(p.exitcode is None for p in alive) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in alive:
            if p.exitcode is None:
                p.kill()
                p.join(1)
