"""The hot path: the handler for every client path the engines serve.

No framework objects on this path: the body (read from ASGI messages, or
handed over whole by router/server/http/fastserver.py, which serves the proxied
POSTs without ASGI) is parsed once with orjson (or, for a multipart audio
upload, walked once for its text fields) to find `model` and `stream`, and
forwarded as the original bytes unless the model name must be rewritten.
Engine answers are relayed as bytes through a `Reply` (ASGI messages, or
writes to the client connection): non-streaming bodies whole, streams chunk
by chunk as they arrive (on the fast server straight from the engine
connection's callback), with the client's backpressure reaching the engine
connection.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional, TypeVar

from router.config import RouterSettings
from router.config.shaping import SHAPED_PATHS
from router.observe.accesslog import AccessLog
from router.observe.tracing import QUEUE, RequestTrace, tracing_for
from router.observe.traffic import Traffic
from router.server.fleet.lifecycle import AWAKE, Lifecycle, ModelUnavailable
from router.server.fleet.models import Model, ModelTable, NoReplica, Overloaded
from router.server.fleet.replica import Replica
from router.server.fleet.upstream import ConnectFailed, UpstreamError
from router.server.proxy.adapters import adapter_done, adapter_missing, adapter_ready
from router.server.proxy.affinity import RESPONSES_PATH, Owner, ResponseOwners
from router.server.proxy.exchange import Exchange, traced_admission
from router.server.proxy.fallback import chains, fall_back, fallbacks_for
from router.server.proxy.forms import FormError, boundary_of
from router.server.proxy.keys import request_key
from router.server.proxy.relay import relay_body, relay_stream, upstream_failure
from router.server.proxy.reply import AsgiReply, EarlyStream, Message, Receive, Reply, Scope, Send, answer_error, retry_after, send_error
from router.server.proxy.request import (
    API_KEY,
    AUTHORIZATION,
    DROP_REQUEST_HEADERS,
    Outgoing,
    Reject,
    Unserved,
    header,
    parse_form,
    parse_json,
    read_body,
    request_head,
)
from router.server.proxy.tenants import Pass, Tenants

T = TypeVar("T")

RESPONSES_PATH_BYTES = RESPONSES_PATH.encode()
#: ``/upstream/{model}/{path}``: raw pass-through to one replica (admin only).
UPSTREAM_PREFIX = "/upstream/"

#: Engine answers that mean "this engine cannot serve now": another replica may.
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_BACKOFF_SECONDS = 0.05
#: How often a waiting stream is told the wait goes on (router.loading_progress).
PROGRESS_SECONDS = 2.0

#: Outcome codes recorded for requests that did not end with the engine's status.
CLIENT_GONE = 499


async def admit_showing_progress(lifecycle: Lifecycle, name: str, stream: EarlyStream) -> None:
    """Wait for the model's start or wake like `admit`, with a comment line every `PROGRESS_SECONDS`."""
    admission = asyncio.ensure_future(lifecycle.admit())
    waited = 0.0
    try:
        while not (await asyncio.wait({admission}, timeout=PROGRESS_SECONDS))[0]:
            waited += PROGRESS_SECONDS
            await stream.comment(f"waiting for {name}: {lifecycle.state}, {waited:g} s")
        admission.result()
    finally:
        if not admission.done():
            admission.cancel()


class Proxy:
    """ASGI handler for every client path the configured engines serve (POST, routed by the body's
    `model`), the stored responses (``/v1/responses/{id}``), and ``/upstream/{model}/{path}``.

    Built for one table and one set of settings; a reload builds a new one.
    """

    def __init__(self, table: ModelTable, settings: RouterSettings, traffic: Traffic, access_log: Optional[AccessLog],
                 owners: ResponseOwners):
        self.table = table
        self.traffic = traffic
        self.owners = owners
        self.max_bytes = settings.max_request_bytes
        self.queue_timeout = settings.queue_timeout_seconds
        self.settings = settings
        self.retries = settings.retries
        self.loading_progress = settings.loading_progress
        self.access_log = access_log
        self.idle_timeout = settings.stream_idle_timeout_seconds
        self.drop_headers = DROP_REQUEST_HEADERS | (AUTHORIZATION | API_KEY if settings.api_keys else frozenset())
        #: OpenTelemetry traces (router/observe/tracing.py); None when off.
        self.tracing = tracing_for(settings.tracing)
        #: With tracing on, the client's trace headers are replaced by the router's own.
        self.drop_traced = self.drop_headers | (self.tracing.headers if self.tracing is not None else frozenset())
        self.connect_timeout = settings.connect_timeout_seconds
        self.request_timeout = settings.request_timeout_seconds
        self.known = ", ".join(table.names)
        #: The model a request without `model` goes to: router.default_model, else the only one.
        self.default_model = settings.default_model or (next(iter(table)).name if len(table) == 1 else None)
        #: Each model with fallbacks -> the models that answer what it cannot, in order.
        self.fallbacks = chains(table)
        #: The client keys' scopes, limits and classes (proxy/tenants.py); None when there are no keys.
        self.tenants: Optional[Tenants] = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST to a client path: routed by the model its body names."""
        start = time.perf_counter()
        path = scope["path"]
        try:
            body = await read_body(scope, receive, self.max_bytes)
            if body is None:
                return  # the client left before sending its request
            model, out = await self.route(scope, body, path)
        except Reject as r:
            await send_error(send, r.status, r.message, r.param, r.headers, path)
            return
        await self.handle(scope, receive, send, model, out, start, path.encode())

    async def serve(self, scope: Scope, body: bytes, reply: Reply, start: float) -> None:
        """`__call__` for a server that has read the whole body and cancels this task when the
        client leaves, setting `reply.gone` first (router/server/http/fastserver.py)."""
        path = scope["path"]
        try:
            model, out = await self.route(scope, body, path)
        except Reject as r:
            await answer_error(reply, r.status, r.message, r.param, r.headers, path)
            return
        await self.run(scope, reply, model, out, start, path.encode(), True)

    async def route(self, scope: Scope, body: bytes, path: str) -> tuple[Model, Outgoing]:
        """The model a client request goes to and what it sends, or Reject."""
        if len(body) > self.max_bytes:
            raise Reject(413, f"The request body ({len(body)} bytes) exceeds the limit of {self.max_bytes} bytes "
                              "(router.max_request_bytes).")
        out = self.outgoing(scope, body)
        out.shaped = out.payload is not None and path in SHAPED_PATHS
        model = self.model_for(out.name, path)
        if self.table.adapter(out.name) is not None:
            out.adapter = out.name
        if path == RESPONSES_PATH and out.payload is not None:
            out.pin = await self.previous_response_owner(out.payload, model)
        if model.sticky is not None and out.pin is None:
            out.key = request_key(model.sticky, scope, out.payload)
        return model, out

    def outgoing(self, scope: Scope, body: bytes) -> Outgoing:
        content_type = header(scope, b"content-type") or b""
        try:
            boundary = boundary_of(content_type) if content_type.startswith(b"multipart/") else None
        except FormError as e:
            raise Reject(400, f"{e}.") from None
        if boundary is not None:
            name, stream, field = parse_form(body, boundary)
            return Outgoing(name, None, body, stream, form_model=field)
        payload, name, stream = parse_json(body)
        return Outgoing(name, payload, body, stream).asking_usage(scope["path"])

    def model_for(self, name: Optional[str], path: str) -> Model:
        """The model a request names (or the default), if it serves `path`; else Reject(400/404)."""
        if name is None:
            if self.default_model is None:
                raise Reject(400, "'model' is missing; give the name of the model to use (more than one model is "
                                  "served and router.default_model is not set).", "model")
            name = self.default_model
        model = self.table.get(name)
        if model is None:
            raise Reject(404, f"The model '{name}' does not exist. Known models: {self.known}.", "model")
        if path not in model.paths:
            serving = [m.name for m in self.table if path in m.paths]
            raise Reject(404, f"Model '{model.name}' does not serve {path}; models that do: {', '.join(serving)}.",
                         "model")
        return model

    async def previous_response_owner(self, payload: dict[str, Any], model: Model) -> Optional[Replica]:
        """The replica a follow-up (`previous_response_id`) must go to: the one holding that response."""
        previous = payload.get("previous_response_id")
        if previous is None:
            return None
        owner = await self.owners.find(previous) if isinstance(previous, str) else None
        if owner is None:
            raise Reject(404, f"Response '{previous}' is not known to this router (unknown, or forgotten after "
                              "the router restarted or its last responses were evicted).", "previous_response_id")
        if owner.model is not model:
            raise Reject(400, f"Response '{previous}' was made by model '{owner.model.name}', not "
                              f"'{model.name}'.", "previous_response_id")
        return owner.replica

    async def stored_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET /v1/responses/{id} and POST /v1/responses/{id}/cancel: to the replica that made it."""
        start = time.perf_counter()
        path = scope["path"]
        response_id = path[len(RESPONSES_PATH) + 1:].split("/", 1)[0]
        found = await self.owners.find(response_id)

        def owner() -> Owner:
            if found is None:
                raise Reject(404, f"Response '{response_id}' is not known to this router (unknown, or forgotten "
                                  "after the router restarted or its last responses were evicted).")
            return found
        got = await self.resolve_then_read(scope, receive, send, owner)
        if got is not None:
            (model, replica), body = got
            out = Outgoing(None, None, body, False, pin=replica)
            await self.handle(scope, receive, send, model, out, start, path.encode(), admit=False)

    async def upstream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/upstream/{model}/{path}``: any method, passed through raw to one replica of the model.

        An operator's door to engine-specific APIs: no model rewrite, no wake
        (a sleeping engine is reached as it is), the replica picked as usual.
        """
        start = time.perf_counter()
        rest = scope["path"][len(UPSTREAM_PREFIX):]
        got = await self.resolve_then_read(scope, receive, send, lambda: self.upstream_target(rest))
        if got is not None:
            (model, target), body = got
            stream = (header(scope, b"accept") or b"").startswith(b"text/event-stream")
            await self.handle(scope, receive, send, model, Outgoing(None, None, body, stream), start, target,
                              admit=False)

    async def resolve_then_read(self, scope: Scope, receive: Receive, send: Send,
                                resolve: Callable[[], T]) -> Optional[tuple[T, bytes]]:
        """What `resolve` finds for the request, and its body; None when the router has answered
        (`resolve` or the body refused: the error is sent) or the client left before its body came."""
        try:
            found = resolve()
            body = await read_body(scope, receive, self.max_bytes)
        except Reject as r:
            await send_error(send, r.status, r.message, r.param, r.headers)
            return None
        return None if body is None else (found, body)

    def upstream_target(self, rest: str) -> tuple[Model, bytes]:
        """The model and engine path of ``{model}/{path}``; model names may hold slashes, so the
        longest configured name that prefixes `rest` wins."""
        for name in sorted(self.table.names, key=len, reverse=True):
            if rest.startswith(name + "/") or rest == name:
                model = self.table.get(name)
                assert model is not None
                return model, ("/" + rest[len(name) + 1:]).encode()
        raise Reject(404, f"No model is named at the start of '/upstream/{rest}'. Known models: {self.known}.")

    async def handle(self, scope: Scope, receive: Receive, send: Send, model: Model, out: Outgoing, start: float,
                     target: bytes, admit: bool = True) -> None:
        """Admit, forward, relay and account one request, cancelling it if the client leaves."""
        reply = AsgiReply(send)
        task = asyncio.current_task()

        def on_disconnect(w: asyncio.Task[Message]) -> None:
            if (not w.cancelled() and w.exception() is None and w.result()["type"] == "http.disconnect"
                    and task is not None and not task.done()):
                reply.gone = True
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_disconnect)
        try:
            await self.run(scope, reply, model, out, start, target, admit)
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()

    async def run(self, scope: Scope, reply: Reply, model: Model, out: Outgoing, start: float, target: bytes,
                  admit: bool) -> None:
        """Admit, forward, relay and account one request; a cancel once `reply.gone` is the client leaving.
        A model that cannot serve it before a byte reached the client leaves it to its next fallback."""
        path = scope["path"]
        ex = Exchange(path)
        if self.tracing is not None:
            ex.trace = self.tracing.begin(scope, start, model.name)
        # (`self.fallbacks` is empty unless some model has fallbacks: then nothing more is looked up.)
        fallbacks = fallbacks_for(self.fallbacks, model, path) if self.fallbacks and admit and out.pin is None else ()
        answer: Reply = reply
        early: Optional[EarlyStream] = None
        ticket: Optional[Pass] = None
        try:
            if self.tenants is not None:
                entering = self.tenants.enter(scope, model, out, ex)
                if entering is not None:
                    ticket = await entering
                    answer = ticket.reply(reply)
                if fallbacks:  # a key falls back only to models it may use
                    fallbacks = self.tenants.within_scope(scope, fallbacks)
            if admit and out.stream and self.loading_progress and model.lifecycle.state != AWAKE:
                answer = early = EarlyStream(answer)
                await early.open()
                fallbacks = ()  # the client has had bytes: no other model may answer now
            while True:
                try:
                    await self.attempt(scope, answer, early, model, out, start, ex, target, admit, bool(fallbacks))
                    break
                except (Unserved, ModelUnavailable):
                    if not fallbacks:
                        raise
                    model, fallbacks = fall_back(model, fallbacks)
                    out.adapter = None  # the fallback answers as itself, not as the LoRA adapter
        except asyncio.CancelledError:
            if not reply.gone:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11 counts cancels; this one was ours
                task.uncancel()
            ex.status = CLIENT_GONE
        except ModelUnavailable as e:
            ex.status = 503
            await answer_error(answer, 503, e.message, headers=retry_after(e.retry_after), path=path)
        except Reject as r:
            ex.status = r.status
            await answer_error(answer, r.status, r.message, r.param, r.headers, path)
        finally:
            if ticket is not None:
                ticket.leave(ex)
        self.account(model, ex, out.stream, start)

    async def attempt(self, scope: Scope, answer: Reply, early: Optional[EarlyStream], model: Model, out: Outgoing,
                      start: float, ex: Exchange, target: bytes, admit: bool, fallible: bool) -> None:
        """One model's try: its admission (a start or wake, shown on `early`), then `forward`."""
        lifecycle = model.lifecycle
        if admit:
            admitting = lifecycle.admit() if early is None else admit_showing_progress(lifecycle, model.name, early)
            await (admitting if ex.trace is None else traced_admission(ex.trace, lifecycle, admitting))
        try:
            await self.forward(scope, answer, model, out, start, ex, target, fallible)
        finally:
            if admit:
                lifecycle.release()
            adapter_done(out, model)

    async def acquire(self, model: Model, out: Outgoing, tried: tuple[Replica, ...],
                      trace: Optional[RequestTrace]) -> Replica:
        """A slot on a replica: the pinned one, or the model's pick (waiting in its queue if full)."""
        try:
            if out.pin is not None:
                return model.take(out.pin)
            if trace is None:
                return await model.acquire(time.monotonic(), tried, self.queue_timeout, out.key, out.priority,
                                           out.adapter)
            try:  # traced: a wait in the queue is a span of its own
                return model.pick(time.monotonic(), tried, out.key, out.adapter)
            except Overloaded:
                return await trace.waited(QUEUE, model.acquire(time.monotonic(), tried, self.queue_timeout, out.key,
                                                               out.priority, out.adapter))
        except NoReplica as e:
            if tried:
                raise Unserved(502, f"Could not connect to any engine of model '{model.name}' "
                                    f"(tried {', '.join(r.url for r in tried)}).") from None
            raise Unserved(503, e.message, headers=retry_after(e.retry_after)) from None
        except Overloaded:
            raise Unserved(429, f"Model '{model.name}' is at its concurrency limit and its queue is full; "
                                "retry later.", headers=retry_after(1)) from None

    async def forward(self, scope: Scope, reply: Reply, model: Model, out: Outgoing, start: float, ex: Exchange,
                      target: bytes, fallible: bool = False) -> None:
        """Send to a replica and relay its answer; before any byte reached the client, a failed engine
        (connect refused or reset, no status in time, 502/503/504) is left for another replica: connect
        failures on every usable one, the others up to `router.retries` times, with a short back-off.
        A request pinned to one replica, or to a model with one replica, is never retried elsewhere.
        When `fallible` (a fallback model is left), an engine's last 502/503/504 is Unserved, not relayed."""
        tried: tuple[Replica, ...] = ()
        retries = self.retries if out.pin is None else 0
        learn = target == RESPONSES_PATH_BYTES
        while True:
            replica = await self.acquire(model, out, tried, ex.trace)
            ex.replica = replica
            if out.adapter is not None:
                await adapter_ready(model, replica, out)
            inst = replica.instance
            # A stream waits at most one idle period for its first byte; an answer, the request timeout.
            idle = inst.stream_idle_timeout_seconds or self.idle_timeout
            timeout = idle if out.stream else inst.request_timeout_seconds or self.request_timeout
            data = out.data_for(replica)
            trace = ex.trace
            if trace is None:
                head = request_head(scope, target, replica.authority, len(data), self.drop_headers, replica.auth_line)
            else:
                head = request_head(scope, target, replica.authority, len(data), self.drop_traced, replica.auth_line,
                                    trace.attempt(replica.name, replica.url))
            try:
                sending = replica.pool.request(head, data, self.connect_timeout, timeout)
                resp = await (sending if trace is None else trace.exchange(sending))
            except ConnectFailed:
                model.failed(replica, time.monotonic(), self.settings)
                model.release(replica)
                model.metrics.upstream_error("connect")
                if out.pin is not None:
                    raise Reject(502, f"Could not connect to instance {replica.name}, which holds the response "
                                      "this request names.") from None
                tried += (replica,)
                continue
            except UpstreamError as e:
                model.failed(replica, time.monotonic(), self.settings)
                model.release(replica)
                if retries and self.another(model, tried + (replica,)):
                    retries = await self.retry(model, ex, e.kind, retries)
                    tried += (replica,)
                    continue
                raise upstream_failure(model, e) from None
            except BaseException:
                model.release(replica)
                raise
            if resp.status == 404 and adapter_missing(model, replica, out):
                resp.close()
                model.release(replica)
                continue
            if resp.status in RETRY_STATUSES:
                model.failed(replica, time.monotonic(), self.settings)
                if retries and self.another(model, tried + (replica,)):
                    resp.close()
                    model.release(replica)
                    retries = await self.retry(model, ex, str(resp.status), retries)
                    tried += (replica,)
                    continue
                if fallible:
                    resp.close()
                    model.release(replica)
                    raise Unserved(resp.status, f"The engine of model '{model.name}' answered {resp.status}.")
            elif resp.status < 500:
                replica.succeeded()
            try:
                if out.stream and (resp.header(b"content-type") or b"").startswith(b"text/event-stream"):
                    await relay_stream(reply, resp, start, ex, model, self.owners, learn, idle, self.settings,
                                       out.strip_usage)
                else:
                    await relay_body(reply, resp, start, ex, model, self.owners, learn)
            finally:
                resp.close()
                model.release(replica)
            return

    @staticmethod
    def another(model: Model, tried: tuple[Replica, ...]) -> bool:
        """Whether a replica other than those tried could take the request now."""
        now = time.monotonic()
        return any(r not in tried and r.routable(now) for r in model.replicas)

    async def retry(self, model: Model, ex: Exchange, reason: str, retries: int) -> int:
        """Count one retry and wait its back-off (50 ms, doubling); the retries left."""
        ex.retries += 1
        model.metrics.retry(reason)
        await asyncio.sleep(RETRY_BACKOFF_SECONDS * 2 ** (ex.retries - 1))
        return retries - 1

    def account(self, model: Model, ex: Exchange, stream: bool, start: float) -> None:
        total = time.perf_counter() - start
        instance = ex.replica.name if ex.replica else None
        model.metrics.observe(ex.status, total, ex.ttfb, ex.key, ex.prompt_tokens, ex.completion_tokens)
        self.traffic.record(model.name, ex.status, total, ex.ttfb, stream, ex.key, ex.prompt_tokens,
                            ex.completion_tokens, instance, ex.retries)
        if self.access_log is not None:
            self.access_log.request(model.name, stream, instance, ex.status, ex.nbytes, ex.ttfb, total, ex.retries,
                                    ex.key, ex.prompt_tokens, ex.completion_tokens)
        if ex.trace is not None:
            ex.trace.end(instance, ex.status, ex.retries, stream, ex.ttfb, ex.key, ex.prompt_tokens,
                         ex.completion_tokens)
