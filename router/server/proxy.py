"""The hot path: a raw ASGI handler for the OpenAI generation routes.

No framework objects on this path: the body is read from ASGI messages,
parsed once with orjson to find `model` and `stream`, and forwarded as the
original bytes unless the model name must be rewritten. Engine answers are
relayed as bytes: non-streaming bodies whole, streams chunk by chunk as they
arrive, with ASGI `send` backpressure reaching the engine connection.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, MutableMapping, Optional

import orjson

from router.config import RouterSettings
from router.observe.accesslog import AccessLog
from router.observe.traffic import Traffic
from router.server.errors import error_body
from router.server.lifecycle import ModelUnavailable
from router.server.models import Model, ModelTable, NoReplica, Overloaded
from router.server.replica import Replica
from router.server.upstream import ConnectFailed, Response, UpstreamError, UpstreamTimeout

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Request headers never forwarded: hop-by-hop (RFC 9110 7.6.1) and the ones the router sets itself.
DROP_REQUEST_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
})
#: Engine response headers relayed to the client, streamed or not (the router sets length and framing).
RELAY_RESPONSE_HEADERS = frozenset({b"content-type", b"content-encoding", b"x-request-id"})
AUTHORIZATION = frozenset({b"authorization"})
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
JSON_HEADERS = [(b"content-type", b"application/json")]

#: Outcome codes recorded for requests that did not end with the engine's status.
CLIENT_GONE = 499


class Reject(Exception):
    """The router answers this request itself with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 headers: Optional[list[tuple[bytes, bytes]]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or []


async def send_error(send: Send, status: int, message: str, param: Optional[str] = None,
                     headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    body = error_body(status, message, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def retry_after(seconds: int) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(seconds).encode())]


def request_head(scope: Scope, authority: bytes, length: int, drop: frozenset[bytes], auth_line: bytes = b"") -> bytes:
    """Request line and headers for the engine (the one place deciding which headers are forwarded).

    End-to-end headers pass as the client sent them; hop-by-hop ones (and
    those the Connection header names) do not. An engine with its own API
    key gets that key (`auth_line`) instead of whatever the client sent.
    """
    if auth_line:
        drop = drop | AUTHORIZATION
    headers = scope["headers"]
    typed = False
    for k, v in headers:
        if k == b"connection":
            drop = drop | {t.strip().lower().encode() for t in v.decode("latin-1").split(",")}
        elif k == b"content-type":
            typed = True
    target = scope.get("raw_path") or scope["path"].encode("latin-1")
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    parts = [b"POST ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\ncontent-length: ", str(length).encode(),
             b"\r\n" if typed else b"\r\ncontent-type: application/json\r\n", auth_line]
    for k, v in headers:
        if k not in drop:
            parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def relay_headers(resp: Response, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with the engine's headers that reach the client appended."""
    for k, v in resp.headers:
        if k in RELAY_RESPONSE_HEADERS:
            headers.append((k, v))
    return headers


def parse_request(body: bytes) -> tuple[dict[str, Any], str, bool]:
    """(payload, model name, stream) from a request body, or Reject(400)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Reject(400, f"The request body is not valid JSON: {e}") from None
    if type(payload) is not dict:
        raise Reject(400, "The request body must be a JSON object.")
    model = payload.get("model")
    if type(model) is not str or not model:
        what = "missing" if model is None else f"a {type(model).__name__}, not a non-empty string"
        raise Reject(400, f"'model' is {what}; give the name of the model to use.", "model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    elif type(stream) is not bool:
        raise Reject(400, "'stream' must be true or false.", "stream")
    return payload, model, stream


class Exchange:
    """What one proxied request did, for metrics, traffic and the access log."""

    __slots__ = ("status", "nbytes", "ttfb", "replica")

    def __init__(self) -> None:
        self.status = 0
        self.nbytes = 0
        self.ttfb: Optional[float] = None
        self.replica: Optional[Replica] = None


class Proxy:
    """ASGI handler for POST /v1/completions, /v1/chat/completions, /v1/embeddings.

    Built for one table and one set of settings; a reload builds a new one.
    """

    def __init__(self, table: ModelTable, settings: RouterSettings, traffic: Traffic, access_log: Optional[AccessLog]):
        self.table = table
        self.traffic = traffic
        self.max_bytes = settings.max_request_bytes
        self.queue_timeout = settings.queue_timeout_seconds
        self.eject_seconds = settings.eject_seconds
        self.access_log = access_log
        self.idle_timeout = settings.stream_idle_timeout_seconds
        self.drop_headers = DROP_REQUEST_HEADERS | (AUTHORIZATION if settings.api_keys else frozenset())
        self.connect_timeout = settings.connect_timeout_seconds
        self.request_timeout = settings.request_timeout_seconds
        self.known = ", ".join(self.table.names)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        try:
            body = await self.read_body(scope, receive)
            if body is None:
                return  # the client left before sending its request
            payload, name, stream = parse_request(body)
            model = self.table.get(name)
            if model is None:
                raise Reject(404, f"The model '{name}' does not exist. Known models: {self.known}.", "model",)
        except Reject as r:
            await send_error(send, r.status, r.message, r.param, r.headers)
            return
        await self.handle(scope, receive, send, model, name, payload, body, stream, start)

    async def read_body(self, scope: Scope, receive: Receive) -> Optional[bytes]:
        """The request body, refusing (413) as soon as it is known to exceed the limit."""
        limit = self.max_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise Reject(400, "Content-Length is not a number.") from None
                if declared > limit:
                    raise Reject(413, f"The request body ({declared} bytes) exceeds the limit of {limit} bytes "
                                      "(router.max_request_bytes).")
                break
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            return body if msg["type"] == "http.request" else None
        parts = [body]
        size = len(body)
        while True:
            if size > limit:
                raise Reject(413, f"The request body exceeds the limit of {limit} bytes (router.max_request_bytes).")
            if not msg.get("more_body"):
                break
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            parts.append(chunk)
        return b"".join(parts)

    async def handle(self, scope: Scope, receive: Receive, send: Send, model: Model, name: str,
                     payload: dict[str, Any], body: bytes, stream: bool, start: float) -> None:
        """Admit, forward, relay and account one request, cancelling it if the client leaves."""
        ex = Exchange()
        task = asyncio.current_task()
        gone = False

        def on_disconnect(w: asyncio.Task[Message]) -> None:
            nonlocal gone
            if (not w.cancelled() and w.exception() is None and w.result()["type"] == "http.disconnect"
                    and task is not None and not task.done()):
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_disconnect)
        lifecycle = model.lifecycle
        admitted = False
        try:
            await lifecycle.admit()
            admitted = True
            await self.forward(scope, send, model, name, payload, body, stream, start, ex)
        except asyncio.CancelledError:
            if not gone:
                raise
            if hasattr(task, "uncancel"):  # Python >= 3.11 counts cancels; this one was ours
                task.uncancel()
            ex.status = CLIENT_GONE
        except ModelUnavailable as e:
            ex.status = 503
            await send_error(send, 503, e.message, headers=retry_after(e.retry_after))
        except Reject as r:
            ex.status = r.status
            await send_error(send, r.status, r.message, r.param, r.headers)
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            if admitted:
                lifecycle.release()
        self.account(model, ex, stream, start)

    async def forward(self, scope: Scope, send: Send, model: Model, name: str, payload: dict[str, Any],
                      body: bytes, stream: bool, start: float, ex: Exchange) -> None:
        tried: tuple[Replica, ...] = ()
        # A stream waits at most one idle period for its first byte; an answer, the request timeout.
        timeout = self.idle_timeout if stream else self.request_timeout
        while True:
            try:
                replica = await model.acquire(time.monotonic(), tried, self.queue_timeout)
            except NoReplica as e:
                if tried:
                    raise Reject(502, f"Could not connect to any engine of model '{model.name}' "
                                      f"(tried {', '.join(r.url for r in tried)}).") from None
                raise Reject(503, e.message, headers=retry_after(e.retry_after)) from None
            except Overloaded:
                raise Reject(429, f"Model '{model.name}' is at its concurrency limit and its queue is full; "
                                  "retry later.", headers=retry_after(1)) from None
            ex.replica = replica
            data = body if name in replica.served else orjson.dumps({**payload, "model": replica.served_name})
            head = request_head(scope, replica.authority, len(data), self.drop_headers, replica.auth_line)
            try:
                resp = await replica.pool.request(head, data, self.connect_timeout, timeout)
            except ConnectFailed:
                model.eject(replica, time.monotonic(), self.eject_seconds)
                model.release(replica)
                model.metrics.upstream_error("connect")
                tried += (replica,)
                continue
            except UpstreamError as e:
                model.release(replica)
                raise self.upstream_failure(model, e) from None
            except BaseException:
                model.release(replica)
                raise
            try:
                if stream and (resp.header(b"content-type") or b"").startswith(b"text/event-stream"):
                    await self.relay_stream(send, resp, start, ex, model)
                else:
                    await self.relay_body(send, resp, start, ex, model)
            finally:
                resp.close()
                model.release(replica)
            return

    def upstream_failure(self, model: Model, e: UpstreamError) -> Reject:
        """A failure before anything reached the client, as the error to answer."""
        model.metrics.upstream_error(e.kind)
        if isinstance(e, UpstreamTimeout):
            return Reject(504, f"The engine of model '{model.name}' timed out: {e}.")
        return Reject(502, f"The engine of model '{model.name}' failed: {e}.")

    async def relay_body(self, send: Send, resp: Response, start: float, ex: Exchange, model: Model) -> None:
        try:
            data = await resp.read()
        except UpstreamError as e:
            raise self.upstream_failure(model, e) from None
        ex.status = resp.status
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": relay_headers(resp, [(b"content-length", str(len(data)).encode())])})
        ex.ttfb = time.perf_counter() - start
        await send({"type": "http.response.body", "body": data})
        ex.nbytes = len(data)

    async def relay_stream(self, send: Send, resp: Response, start: float, ex: Exchange, model: Model) -> None:
        resp.stream(self.idle_timeout)
        ex.status = resp.status
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": relay_headers(resp, [*STREAM_HEADERS])})
        nbytes = 0
        try:
            chunk = await resp.next_chunk()
            ex.ttfb = time.perf_counter() - start
            while chunk:
                nbytes += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await resp.next_chunk()
        except UpstreamError as e:
            model.metrics.upstream_error(e.kind)
            ex.status = 504 if isinstance(e, UpstreamTimeout) else 502
            message = f"The engine of model '{model.name}' stopped the stream: {e}."
            await send({"type": "http.response.body", "body": b"data: " + error_body(ex.status, message) + b"\n\n",
                        "more_body": True})
        ex.nbytes = nbytes
        await send({"type": "http.response.body", "body": b""})

    def account(self, model: Model, ex: Exchange, stream: bool, start: float) -> None:
        total = time.perf_counter() - start
        model.metrics.observe(ex.status, total, ex.ttfb)
        self.traffic.record(model.name, ex.status, total, ex.ttfb, stream)
        if self.access_log is not None:
            r = ex.replica
            ttfb = f"{ex.ttfb * 1000:.1f}ms" if ex.ttfb is not None else "-"
            self.access_log.write(f"{model.name} {'stream' if stream else 'single'} -> {r.name if r else '-'} "
                                  f"{ex.status} {ex.nbytes}B ttfb={ttfb} total={total * 1000:.1f}ms")
