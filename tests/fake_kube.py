"""A fake Kubernetes API server holding Leases (coordination.k8s.io/v1), for leader-election tests.

It answers what the official client's `CoordinationV1Api` sends for
read/create/replace of a namespaced Lease, as the real API server does:
objects get a fresh `resourceVersion` on every write, a replace at a stale
version is 409 Conflict, a create of an existing name is 409 AlreadyExists, a
missing one 404 NotFound, errors in the `Status` shape. Each client names
itself in an ``X-Client`` header (`ApiClient(header_name=..., header_value=...)`),
so a test can cut one client off (`block`: its calls hang, as on a network
partition) while the others go on. Every successful write is logged with
the server's monotonic time.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web
from helpers import free_port

PREFIX = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"


@dataclass
class Write:
    at: float
    client: str
    verb: str
    holder: Optional[str]
    version: str


@dataclass
class FakeKube:
    port: int = field(default_factory=free_port)
    leases: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    #: (client, verb, status) of every refused write: 409s and 404s.
    refusals: list[tuple[str, str, int]] = field(default_factory=list)
    #: (client, method, status, resourceVersion sent or answered) of every request answered, in order.
    log: list[tuple[str, str, int, Optional[str]]] = field(default_factory=list)
    #: Clients whose calls hang until unblocked (the API server is unreachable for them).
    blocked: set[str] = field(default_factory=set)
    #: Clients whose next GET waits until each of them has sent one: they then write at the same version.
    _gate: set[str] = field(default_factory=set)
    _gate_arrived: set[str] = field(default_factory=set)
    _gate_open: Optional[asyncio.Event] = None
    _version: int = 100
    _runner: Optional[web.AppRunner] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "FakeKube":
        app = web.Application()
        base = PREFIX.format(ns="{ns}")
        app.router.add_get(base + "/{name}", self.read)
        app.router.add_post(base, self.create)
        app.router.add_put(base + "/{name}", self.replace)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def hold_reads(self, *clients: str) -> None:
        """The next GET of each of `clients` is answered once all of them have arrived (others pass)."""
        self._gate, self._gate_arrived, self._gate_open = set(clients), set(), asyncio.Event()

    def holders(self) -> list[Optional[str]]:
        return [w.holder for w in self.writes]

    # ------------------------------------------------------------------ handlers

    async def _client(self, request: web.Request) -> str:
        client = request.headers.get("X-Client", "?")
        while client in self.blocked:
            await asyncio.sleep(0.01)
        return client

    async def read(self, request: web.Request) -> web.Response:
        client = await self._client(request)
        if client in self._gate - self._gate_arrived and self._gate_open is not None:
            gate = self._gate_open
            self._gate_arrived.add(client)
            if self._gate_arrived == self._gate:
                self._gate = set()
                gate.set()
            await gate.wait()
        ns, name = request.match_info["ns"], request.match_info["name"]
        lease = self.leases.get((ns, name))
        if lease is None:
            self.log.append((client, "GET", 404, None))
            return status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', name)
        self.log.append((client, "GET", 200, lease["metadata"]["resourceVersion"]))
        return web.json_response(lease)

    async def create(self, request: web.Request) -> web.Response:
        client = await self._client(request)
        ns = request.match_info["ns"]
        body = await request.json()
        name = body["metadata"]["name"]
        if (ns, name) in self.leases:
            self.refusals.append((client, "create", 409))
            return status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists', name)
        meta = {**body["metadata"], "namespace": ns, "uid": str(uuid.uuid4()),
                "creationTimestamp": "2026-01-01T00:00:00Z"}
        return self._store(ns, name, body, meta, client, "create", 201)

    async def replace(self, request: web.Request) -> web.Response:
        client = await self._client(request)
        ns, name = request.match_info["ns"], request.match_info["name"]
        body = await request.json()
        current = self.leases.get((ns, name))
        if current is None:
            self.refusals.append((client, "replace", 404))
            return status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found', name)
        version = (body.get("metadata") or {}).get("resourceVersion")
        self.log.append((client, "PUT", 0, version))
        if version is not None and version != current["metadata"]["resourceVersion"]:
            self.refusals.append((client, "replace", 409))
            return status(409, "Conflict", f'Operation cannot be fulfilled on leases.coordination.k8s.io "{name}": '
                                           "the object has been modified; please apply your changes to the latest "
                                           "version and try again", name)
        meta = {**current["metadata"], **{k: v for k, v in (body.get("metadata") or {}).items()
                                          if k in ("labels", "annotations")}}
        return self._store(ns, name, body, meta, client, "replace", 200)

    def _store(self, ns: str, name: str, body: dict[str, Any], meta: dict[str, Any], client: str, verb: str,
               code: int) -> web.Response:
        self._version += 1
        lease = {"kind": "Lease", "apiVersion": "coordination.k8s.io/v1",
                 "metadata": {**meta, "resourceVersion": str(self._version)}, "spec": body.get("spec") or {}}
        self.leases[(ns, name)] = lease
        self.writes.append(Write(time.monotonic(), client, verb, lease["spec"].get("holderIdentity"),
                                 str(self._version)))
        return web.json_response(lease, status=code)


def status(code: int, reason: str, message: str, name: str) -> web.Response:
    """An error as the API server words it (a `Status` object)."""
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason,
                              "details": {"name": name, "group": "coordination.k8s.io", "kind": "leases"},
                              "code": code}, status=code)
