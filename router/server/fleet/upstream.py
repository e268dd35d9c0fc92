"""A lean HTTP/1.1 keep-alive client for the proxy hot path.

Profiles of the router (issue 4) showed aiohttp's client machinery (request
and response objects, header multidicts, payload registry, per-chunk read
timers) costing more router CPU per request than all of the router's own
work. The proxy needs little of it: one POST of bytes it already has, to an
engine on a known host:port, and the answer relayed as bytes. So the hot path
writes the request in one `write`, parses the answer with httptools (the
parser uvicorn uses), and keeps connections per backend for reuse. The
shared aiohttp session still serves everything else (health probes, sleep
and wake calls, admin).

Timeouts cost less than a timer per request: a non-streaming answer has a
deadline, watched by one timer per connection that is re-armed only when it
fires before the current request's deadline; a stream has an idle watchdog
that re-arms itself only when it fires and sees progress, so silence is caught
between one and two idle periods after the last byte.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Optional

import httptools

#: Bytes of a response buffered before reading from the engine pauses (backpressure).
HIGH_WATER = 256 * 1024
#: Idle keep-alive connections kept per backend.
MAX_IDLE = 512


class UpstreamError(Exception):
    """A failure talking to an engine; `kind` is connect, timeout or disconnect (metrics label)."""

    kind = "disconnect"


class ConnectFailed(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        #: A request was sent and its answer is not over; idle connections must stay silent.
        self.busy = False
        #: The current request's deadline (loop time; None: none) and the one timer that watches it,
        #: re-armed only when it fires early (a timer made and cancelled per request costs more).
        self.deadline: Optional[float] = None
        self.deadline_seconds = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.received = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: Optional[UpstreamError] = None
        self.paused = False
        #: Only a stream's reader takes pieces as they come; a whole body must not pause reading.
        self.streaming = False
        #: Signs of life for the idle watchdog: body pieces received, and resumes after a full client.
        self.progress = 0
        #: While piping (`Response.pipe`): where each read's body goes; False back means "the client is full".
        self.sink: Optional[Callable[[bytes], bool]] = None
        self.relayed = 0
        self.first_relayed_at: Optional[float] = None
        self._waiter: Optional[asyncio.Future[None]] = None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes on an idle connection (say a 408 before closing): never reuse it
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.fail(UpstreamError(f"the engine sent an invalid HTTP response: {e}"))
        if self.sink is not None and self.chunks:
            self.relay()

    def relay(self) -> None:
        """Hand what arrived to the sink in one piece (all the chunks of one read together)."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if not self.relayed:
            self.first_relayed_at = time.perf_counter()
        self.relayed += len(data)
        assert self.sink is not None
        if not self.sink(data) and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        """The sink can take more again."""
        if self.paused and not self.closed and self.transport is not None:
            self.paused = False
            self.progress += 1  # the engine gets its next idle period from now
            self.transport.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool.forget(self)
        if not self.complete and self.error is None:
            self.error = UpstreamError("the engine closed the connection" + (f": {exc}" if exc else ""))
        self._wake()

    # ---------------------------------------------------------------- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.progress += 1
        if self.sink is not None:
            return  # relayed at the end of this read, by data_received
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.streaming and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked now: httptools forgets it once the message is over.
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # ---------------------------------------------------------------- used by Response

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    def take(self) -> bytes:
        """Everything buffered so far, as one piece."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def fail(self, error: UpstreamError) -> None:
        """End this connection with `error` (timeouts, parse errors)."""
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    def time_out(self, seconds: float) -> None:
        self.fail(UpstreamTimeout(f"the engine did not answer within {seconds:g}s"))

    def arm(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Time the exchange out `seconds` from now, unless `disarm` comes first."""
        deadline = self.deadline = loop.time() + seconds
        self.deadline_seconds = seconds
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._check_deadline, loop)
            self._timer_at = deadline

    def disarm(self) -> None:
        self.deadline = None

    def _check_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        deadline = self.deadline
        if deadline is None or self.closed:
            return
        if loop.time() >= deadline:
            self.deadline = None
            self.time_out(self.deadline_seconds)
        else:  # a later request's deadline
            self._timer = loop.call_at(deadline, self._check_deadline, loop)
            self._timer_at = deadline

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """The engine's answer on a connection; `close()` frees the connection (reused only if read whole)."""

    __slots__ = ("conn", "status", "headers", "_watchdog")

    def __init__(self, conn: Connection):
        self.conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._watchdog: Optional[_IdleWatchdog] = None

    def header(self, name: bytes) -> Optional[bytes]:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def read(self) -> bytes:
        """The whole body (the request's deadline still applies)."""
        conn = self.conn
        while not conn.complete:
            if conn.error is not None:
                raise conn.error
            await conn.wait()
        return conn.take()

    def stream(self, idle_timeout: float) -> None:
        """Switch from the deadline to an idle watchdog, for reading with `next_chunk` or `pipe`."""
        self.conn.disarm()
        self.conn.streaming = True
        self._watchdog = _IdleWatchdog(self.conn, idle_timeout)

    async def next_chunk(self) -> bytes:
        """What arrived since the last call (waiting for something), or b"" at the end of the body."""
        conn = self.conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    async def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """Relay the rest of the body (after `stream`) to `sink` as it arrives, from the connection's
        own callback: no wake-up of this coroutine per chunk. `sink` gets each read's body in one
        piece and returns False when its client is full: reading then pauses until `resume()`. What
        was relayed: `relayed` bytes, the first at `first_relayed_at` (perf_counter)."""
        conn = self.conn
        conn.sink = sink
        try:
            if conn.chunks:
                conn.relay()
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        finally:
            conn.sink = None

    @property
    def relayed(self) -> int:
        return self.conn.relayed

    @property
    def first_relayed_at(self) -> Optional[float]:
        return self.conn.first_relayed_at

    def resume(self) -> None:
        self.conn.resume()

    def close(self) -> None:
        self.conn.disarm()
        if self._watchdog is not None:
            self._watchdog.cancel()
        conn = self.conn
        if conn.keep_alive and not conn.closed and conn.error is None:
            conn.pool.put(conn)
        else:
            conn.abort()


class _IdleWatchdog:
    """Fails the connection when a check finds no progress since the previous one."""

    __slots__ = ("conn", "timeout", "_seen", "_handle")

    def __init__(self, conn: Connection, timeout: float):
        self.conn = conn
        self.timeout = timeout
        self._seen = conn.progress
        self._handle = asyncio.get_running_loop().call_later(timeout, self._check)

    def _check(self) -> None:
        # Bytes still waiting for the relay, or reading paused for a full client, mean the hold-up
        # is a slow client (backpressure), not a silent engine: only the engine's silence times out.
        conn = self.conn
        if conn.progress == self._seen and not conn.chunks and not conn.paused:
            conn.fail(UpstreamTimeout(f"the engine sent nothing for {self.timeout:g}s"))
            return
        self._seen = conn.progress
        self._handle = asyncio.get_running_loop().call_later(self.timeout, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class Pool:
    """Keep-alive connections to one engine (host, port)."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.idle: list[Connection] = []

    def put(self, conn: Connection) -> None:
        conn._reset()
        conn.busy = False
        conn.reused = True
        if len(self.idle) < MAX_IDLE:
            self.idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: Connection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in self.idle[:]:
            conn.abort()
        self.idle.clear()

    async def _connect(self, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: Connection(self), self.host, self.port),
                                             timeout)
        except asyncio.TimeoutError:
            raise ConnectFailed(f"no connection to {self.host}:{self.port} within {timeout:g}s") from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}") from None
        return conn

    async def request(self, head: bytes, body: bytes, connect_timeout: float, timeout: float) -> Response:
        """Send `head` (request line and headers, ending with a blank line) and `body`; wait for the status.

        `timeout` bounds the whole exchange until `Response.stream` replaces it.
        When a reused connection is closed by the engine before any answer
        (its keep-alive expired as we sent), the request goes again on another
        connection: the engine never saw it.
        """
        loop = asyncio.get_running_loop()
        while True:
            conn = self.idle.pop() if self.idle else await self._connect(connect_timeout)
            if conn.closed:
                continue
            reused = conn.reused
            conn.arm(loop, timeout)
            assert conn.transport is not None
            conn.busy = True
            conn.transport.write(head + body)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait()
            except BaseException as e:
                conn.disarm()
                conn.abort()
                if reused and not conn.received and type(e) is UpstreamError:
                    continue
                raise
            return Response(conn)
