"""A minimal HTTP/1.1 server: asyncio Protocol + httptools, nothing else.

The simulated engine must cost next to nothing per request and per streamed
chunk, so router benchmarks measure the router. A framework (aiohttp.web,
Starlette) spends tens of microseconds per request on objects the simulator
does not need; this layer parses with httptools, hands a plain `Request` to
one handler coroutine, and writes bytes straight to the transport. It does
keep-alive, pipelined requests (answered in order), fixed-length and chunked
responses, and tells the handler when the client has gone away.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from typing import Awaitable, Callable, Optional
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger("router.sim")

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
}
#: Bodies beyond this are refused with 413, so a hostile client cannot fill memory.
MAX_BODY = 64 * 1024 * 1024

Handler = Callable[["Request", "Responder"], Awaitable[None]]


class Request:
    """One parsed HTTP request."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool):
        parsed = httptools.parse_url(url)
        self.method = method
        self.path = parsed.path.decode("latin-1")
        self.query = parsed.query.decode("latin-1") if parsed.query else ""
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def param_items(self) -> list[tuple[str, str]]:
        return parse_qsl(self.query, keep_blank_values=True)

    def params(self) -> dict[str, str]:
        return dict(self.param_items())


class _Clock:
    """The Date header, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class Responder:
    """Writes one response on a connection; knows when the client is gone."""

    __slots__ = ("_conn", "_keep_alive", "started", "finished")

    def __init__(self, conn: "Connection", keep_alive: bool):
        self._conn = conn
        self._keep_alive = keep_alive
        self.started = False
        self.finished = False

    @property
    def disconnected(self) -> bool:
        return self._conn.lost

    def wait_disconnect(self) -> "asyncio.Future[None]":
        """A future done when the client closes the connection."""
        return self._conn.lost_future()

    def _head(self, status: int, fields: bytes) -> bytes:
        conn = b"" if self._keep_alive else b"connection: close\r\n"
        return b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: uvicorn\r\n%svary: Origin\r\n%s\r\n" % (
            status, REASONS.get(status, "Unknown").encode(), self._conn.clock.date(), fields, conn)

    def send(self, status: int, body: bytes, content_type: Optional[bytes] = b"application/json",
             headers: bytes = b"") -> None:
        """A whole response with Content-Length (no content-type when `content_type` is None)."""
        if self.started or self._conn.lost:
            return
        self.started = self.finished = True
        fields = b"%scontent-length: %d\r\n" % (headers, len(body))
        if content_type is not None:
            fields += b"content-type: %s\r\n" % content_type
        self._conn.write(self._head(status, fields) + body)

    def start_stream(self, status: int = 200, content_type: bytes = b"text/event-stream; charset=utf-8") -> None:
        """Begin a chunked response; follow with `chunk()` and `end()`."""
        self.started = True
        self._conn.write(self._head(status, b"content-type: %s\r\ntransfer-encoding: chunked\r\n" % content_type))

    def chunk(self, data: bytes) -> None:
        if data and not self._conn.lost:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self, last: bytes = b"") -> None:
        """Final chunk (if any) and the terminating zero-length chunk, in one write."""
        if self.finished or self._conn.lost:
            return
        self.finished = True
        self._conn.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n")


class Connection(asyncio.Protocol):
    """One client connection: parses requests and runs the handler for each in order."""

    def __init__(self, handler: Handler, clock: _Clock, live: set["Connection"]):
        self.handler = handler
        self.clock = clock
        self.live = live
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpRequestParser(self)
        self.lost = False
        self._lost_future: Optional[asyncio.Future[None]] = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._pending: deque[Request] = deque()
        self._busy = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.live.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrade not supported")
        except httptools.HttpParserError:
            self._fail(400, b"malformed HTTP request")

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        self.live.discard(self)
        if self._lost_future is not None and not self._lost_future.done():
            self._lost_future.set_result(None)

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # curl asks before sending a body over 1 KiB; without this it waits a second.
        if self._headers.get("expect", "").lower() == "100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self.closing:  # refused (413) earlier in this read: the rest is dropped
            return
        self._size += len(body)
        if self._size > MAX_BODY:
            self._fail(413, b"request body too large")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.closing:  # a refused request never reaches the handler
            return
        req = Request(self.parser.get_method().decode("latin-1"), self._url, self._headers,
                      b"".join(self._body), self.parser.should_keep_alive())
        self._pending.append(req)
        if not self._busy:
            self._next()

    # -- internals
    @property
    def closing(self) -> bool:
        """Gone, or closed by us: nothing more is read or answered."""
        return self.lost or (self.transport is not None and self.transport.is_closing())

    def lost_future(self) -> "asyncio.Future[None]":
        if self._lost_future is None:
            self._lost_future = asyncio.get_running_loop().create_future()
            if self.lost:
                self._lost_future.set_result(None)
        return self._lost_future

    def write(self, data: bytes) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    def _fail(self, status: int, message: bytes) -> None:
        """Answer a request we could not parse, then close."""
        body = b'{"error":{"message":"%s","type":"BadRequestError","param":null,"code":%d}}' % (message, status)
        Responder(self, keep_alive=False).send(status, body)
        self.close()

    def _next(self) -> None:
        if not self._pending or self.lost:
            self._busy = False
            return
        self._busy = True
        req = self._pending.popleft()
        task = asyncio.ensure_future(self._run(req))
        task.add_done_callback(self._done)

    async def _run(self, req: Request) -> None:
        resp = Responder(self, req.keep_alive)
        try:
            await self.handler(req, resp)
        finally:
            if not resp.started:
                resp.send(500, b'{"error":{"message":"the simulator sent no response","type":"InternalServerError","param":null,"code":500}}')
            elif not resp.finished:
                # A stream abandoned mid-way (a fault knob): the connection cannot be reused.
                self.close()
            if not req.keep_alive:
                self.close()

    def _done(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())
            self.close()
        self._next()


class HttpServer:
    """Serves `handler` on host:port until `close()`."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.clock = _Clock()
        self.live: set[Connection] = set()
        self._server: Optional[asyncio.AbstractServer] = None

    async def listen(self, host: str, port: int, backlog: int = 4096) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self.handler, self.clock, self.live), host, port, backlog=backlog,
            reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.live):
            conn.close()
        await self._server.wait_closed()
        self._server = None
