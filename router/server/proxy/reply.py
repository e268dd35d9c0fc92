"""Where the proxy writes an answer: ASGI messages, or a client connection of the fast server.

The hot path answers through the small `Reply` interface so both servers share
everything above it; `EarlyStream` lets a stream open (and show its wait)
before the model is ready.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, MutableMapping, Optional, Protocol

from router.server.proxy.errors import error_body_for

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
JSON_HEADERS = [(b"content-type", b"application/json")]


class Reply(Protocol):
    """Where the proxy writes one answer: ASGI messages (`AsgiReply`) or straight to a client
    connection (router/server/http/fastserver.py). `gone` turns true once the client has left."""

    @property
    def gone(self) -> bool:
        """The client has left: nothing more need be written."""

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A complete answer; the content-length is added here."""

    async def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The status and headers of a streamed answer (chunked)."""

    async def chunk(self, data: bytes) -> None:
        """More of a streamed answer (waits while the client's buffer is full)."""

    async def end(self, data: bytes = b"") -> None:
        """The last piece of a streamed answer (may be empty), and its end."""


class AsgiReply:
    """A `Reply` as ASGI messages."""

    __slots__ = ("send", "gone")

    def __init__(self, send: Send):
        self.send = send
        self.gone = False

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-length", b"%d" % len(body)), *headers]})
        await self.send({"type": "http.response.body", "body": body})

    async def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        await self.send({"type": "http.response.body", "body": data})


def retry_after(seconds: int) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(seconds).encode())]


class EarlyStream:
    """The client's stream, opened before its model is ready, so the wait can be shown as it goes.

    SSE comment lines (``: waiting for M: starting, 12 s``) are ignored by SSE
    clients. Once open, the engine's own stream continues it; any other answer
    that follows (an error) is sent as one SSE data event, since the status
    line has gone.
    """

    __slots__ = ("_reply", "_opened", "_wrap")

    def __init__(self, reply: Reply):
        self._reply = reply
        self._opened = False
        self._wrap = False

    @property
    def gone(self) -> bool:
        return self._reply.gone

    async def open(self) -> None:
        await self._reply.head(200, [(b"content-type", b"text/event-stream"), *STREAM_HEADERS])
        self._opened = True

    async def comment(self, text: str) -> None:
        await self._reply.chunk(f": {text}\n\n".encode())

    @staticmethod
    def _wraps(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        kind = next((v for k, v in headers if k == b"content-type"), b"")
        return status != 200 or not kind.startswith(b"text/event-stream")

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if not self._opened:
            return await self._reply.whole(status, headers, body)
        if body and self._wraps(status, headers):
            body = b"data: " + body + b"\n\n"
        await self._reply.end(body)

    async def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if not self._opened:
            return await self._reply.head(status, headers)
        self._wrap = self._wraps(status, headers)

    async def chunk(self, data: bytes) -> None:
        if self._wrap and data:
            data = b"data: " + data + b"\n\n"
        await self._reply.chunk(data)

    async def end(self, data: bytes = b"") -> None:
        if self._wrap and data:
            data = b"data: " + data + b"\n\n"
        await self._reply.end(data)


async def send_error(send: Send, status: int, message: str, param: Optional[str] = None,
                     headers: Optional[list[tuple[bytes, bytes]]] = None, path: str = "") -> None:
    """The router's own error answer, in the shape the client of `path` parses."""
    await answer_error(AsgiReply(send), status, message, param, headers, path)


async def answer_error(reply: "Reply", status: int, message: str, param: Optional[str] = None,
                       headers: Optional[list[tuple[bytes, bytes]]] = None, path: str = "") -> None:
    await reply.whole(status, [*JSON_HEADERS, *headers] if headers else JSON_HEADERS,
                      error_body_for(path, status, message, param))
