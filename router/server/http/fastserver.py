"""uvicorn's httptools protocol, with the proxy's client requests served without ASGI.

Profiles against the Rust vllm-router (benchmarks/PERF.md) put about a third of
the router's CPU per request in uvicorn's ASGI cycle: a scope and message
dicts per request, a task running the app, `receive` with an `asyncio.Event`
per wait, a task per request watching for the client leaving, and the answer
leaving in two writes (head, then body). `FastHttpProtocol` keeps uvicorn for
the connection (accept, keep-alive timer, pipelining, graceful shutdown,
limits, every other route and method) and takes over one kind of request in
`on_headers_complete`: a POST to a client path of the router's table, with a
content-length within `router.max_request_bytes`, that the app's guard lets
through. Its body is gathered as it comes, then one task runs
`Proxy.serve(scope, body, reply)`, whose `FastReply` writes straight to the
transport: a whole answer in one write, a stream's chunks framed and written
as they come (waiting while the client's buffer is full). A client that
leaves is seen in `connection_lost`, which cancels that task (the engine
request with it); no watcher task is needed.

Anything else (chunked uploads, ``Expect: 100-continue``, upgrades, pipelined
requests, a refused key, other paths) goes through uvicorn's ASGI cycle
unchanged, to the same app.

Use: ``uvicorn.Config(app, http=FastHttpProtocol, ...)``, or the import
string ``http="router.server.http.fastserver:FastHttpProtocol"``. The app must be
the router's `RouterApp` (anything with ``.state.guard``, ``.state.table`` and
``.state.proxy``); for any other app the protocol is uvicorn's.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping, Optional

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

#: Framing of a streamed answer's end.
LAST_CHUNK = b"0\r\n\r\n"

logger = logging.getLogger("uvicorn.error")


class _NoEvent:
    """What uvicorn's `connection_lost` sets on a cycle: nothing waits on ours."""

    __slots__ = ()

    def set(self) -> None:
        pass


NO_EVENT = _NoEvent()


class FastReply:
    """One proxied request on a `FastHttpProtocol` connection: its body as it arrives, then its answer.

    Stands in for uvicorn's `RequestResponseCycle` (the protocol reads
    `response_complete`, `disconnected`, `keep_alive` and `message_event`),
    and is the `Reply` (router/server/proxy/forward.py) the proxy answers through.
    """

    __slots__ = ("protocol", "transport", "scope", "proxy", "keep_alive", "parts", "started", "response_started",
                 "response_complete", "disconnected", "gone", "task", "message_event", "on_drain")

    def __init__(self, protocol: "FastHttpProtocol", scope: Mapping[str, Any], proxy: Any, keep_alive: bool):
        self.protocol = protocol
        self.transport = protocol.transport
        self.scope = scope
        self.proxy = proxy
        self.keep_alive = keep_alive
        self.parts: list[bytes] = []
        self.started = time.perf_counter()
        self.response_started = False
        self.response_complete = False
        #: The connection is gone: nothing more is written.
        self.disconnected = False
        #: The client left before its answer was complete (what the proxy reads).
        self.gone = False
        self.task: Optional[asyncio.Task[None]] = None
        self.message_event = NO_EVENT
        #: Called when the client's buffer has drained (a piped stream resumes reading its engine).
        self.on_drain: Optional[Callable[[], None]] = None

    # ---------------------------------------------------------------- the request

    async def run(self) -> None:
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.parts = []
        try:
            await self.proxy.serve(self.scope, body, self, self.started)
        except asyncio.CancelledError:
            if not self.response_complete:
                self.transport.close()
            raise
        except BaseException as exc:
            logger.error("Exception in the router's proxy", exc_info=exc)
            if not self.response_started and not self.disconnected:
                await self.whole(500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error")
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                logger.error("The router's proxy returned without completing its answer.")
                self.transport.close()

    # ---------------------------------------------------------------- Reply

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], *rest: bytes) -> bytes:
        """Status line and headers, then `rest` (the framing header and blank line, maybe a body)."""
        parts = [STATUS_LINE[status], self.protocol.default_head()]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += rest
        return b"".join(parts)

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.disconnected or self.response_started:
            return
        self.response_started = True
        self.transport.write(self._head(status, headers, b"content-length: %d\r\n\r\n" % len(body), body))
        self._complete()

    async def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.disconnected or self.response_started:
            return
        self.response_started = True
        self.transport.write(self._head(status, headers, b"transfer-encoding: chunked\r\n\r\n"))

    async def chunk(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.flow.write_paused and not self.disconnected:
            await protocol.flow.drain()
        if self.disconnected or not data:
            return
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def pipe_sink(self, upstream: Any) -> Callable[[bytes], bool]:
        """Where `Response.pipe` hands a stream's pieces: each written as one chunk at once; False
        when the client's buffer is full, and `upstream.resume()` once it has drained."""
        self.on_drain = upstream.resume
        transport = self.transport
        flow = self.protocol.flow

        def sink(data: bytes) -> bool:
            if self.disconnected:
                return True
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return not flow.write_paused
        return sink

    async def end(self, data: bytes = b"") -> None:
        if self.disconnected or self.response_complete:
            return
        self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else LAST_CHUNK)
        self._complete()

    def _complete(self) -> None:
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        self.protocol.on_response_complete()


class FastHttpProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol`, serving the router's proxied POSTs without ASGI (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app
        if type(app) is ProxyHeadersMiddleware:
            # It rewrites the client address and scheme, which the proxied paths never read.
            app = app.app
        state = getattr(app, "state", None)
        plain = (self.root_path or self.limit_concurrency is not None
                 or not all(hasattr(state, a) for a in ("guard", "table", "proxy")))
        self.router_state = None if plain else state
        #: The last proxied request on this connection (a pipelined request may follow it as `cycle`).
        self.fast: Optional[FastReply] = None
        #: Loop time the connection went idle (its last answer ended); None while a request is on.
        self.idle_since: Optional[float] = None

    # ---------------------------------------------------------------- keep-alive, one timer per connection
    # uvicorn arms a timer after every answer and cancels it at the next request; here the last
    # answer's time is kept, and one timer, re-armed only when it fires, closes a connection idle
    # for `timeout_keep_alive`.

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_check)

    def _keep_alive_check(self) -> None:
        self.timeout_keep_alive_task = None
        since = self.idle_since
        if since is None or self.transport.is_closing():
            return  # busy: the answer's end arms it again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left <= 0:
            self.transport.close()
        else:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_check)

    def default_head(self) -> bytes:
        """uvicorn's default headers (server, date) as header lines, built once per change of the date."""
        headers = self.server_state.default_headers
        cached = _DEFAULT_HEAD
        if cached[0] is not headers:
            cached[1] = b"".join(b"%b: %b\r\n" % pair for pair in headers)
            cached[0] = headers
        return cached[1]

    def on_message_begin(self) -> None:
        # uvicorn's scope without its "asgi" and "state" entries, which the proxy never reads;
        # `asgi_scope` adds them when a request goes to the ASGI app after all.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {"type": "http", "http_version": "1.1", "server": self.server,  # type: ignore[typeddict-item]
                      "client": self.client, "scheme": self.scheme, "root_path": self.root_path,
                      "headers": self.headers}

    def asgi_scope(self) -> None:
        scope = self.scope
        scope["asgi"] = {"version": self.asgi_version, "spec_version": "2.3"}
        scope["state"] = self.app_state.copy()

    def on_headers_complete(self) -> None:
        state = self.router_state
        parser = self.parser
        if (state is None or parser.get_method() != b"POST" or self.expect_100_continue
                or (self.cycle is not None and not self.cycle.response_complete) or parser.should_upgrade()):
            return self.to_asgi()
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return self.to_asgi()
        if "%" in path or path not in state.table.client_paths:
            return self.to_asgi()
        proxy = state.proxy
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                return self.to_asgi()
        if length is None or not length.isdigit() or int(length) > proxy.max_bytes:
            return self.to_asgi()
        scope = self.scope
        http_version = parser.get_http_version()
        if http_version != "1.1":
            scope["http_version"] = http_version
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = parsed.query or b""
        if state.guard.check(scope) is not None:
            return self.to_asgi()  # the app answers the refusal
        self.cycle = self.fast = FastReply(self, scope, proxy,  # type: ignore[assignment]
                                           http_version != "1.0" and parser.should_keep_alive())

    def to_asgi(self) -> None:
        """This request goes through uvicorn's ASGI cycle to the app."""
        self.asgi_scope()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is FastReply:
            cycle.parts.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is not FastReply:
            return super().on_message_complete()
        if cycle.task is not None:
            return
        task = cycle.task = self.loop.create_task(cycle.run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def resume_writing(self) -> None:
        super().resume_writing()
        cycle = self.fast
        if cycle is not None and cycle.on_drain is not None:
            cycle.on_drain()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        cycle = self.fast
        if cycle is not None:
            cycle.disconnected = True
            if not cycle.response_complete:
                cycle.gone = True
                task = cycle.task
                if task is not None and not task.done():
                    task.cancel()


#: [the default_headers list the bytes were built from, the bytes]
_DEFAULT_HEAD: list[Any] = [None, b""]
