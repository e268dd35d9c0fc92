"""Every engine's and the router's log over HTTP: ``GET /logs/{name}`` and ``GET /logs/{name}/stream``.

An operator on another machine (or a dashboard) should not need a shell on
the GPU node to see why an engine does not come up. The logs are the files
supervisord writes for each program; only supervisord knows where they are
(``ProcessState.logfile``), so a router that does not run under supervisord
has no log to serve and says so (503). Logs can hold prompts, so the routes
live under ``/logs/``, an admin prefix of the Guard (router.server.proxy.auth):
admin key, or loopback only when none is set.

``/logs/{name}/stream`` follows the file as ``tail -F`` does: supervisord
rotates a log by renaming ``name.log`` to ``name.log.1`` and opening a new
``name.log``, so the follower notices the path's inode change (or the file
shrinking under it: a truncation) and reopens, losing no line written to the
old file before the rename.
"""
from __future__ import annotations

import asyncio
import mmap
import os
from dataclasses import dataclass
from typing import AsyncIterator, BinaryIO, NamedTuple, Optional

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from router.server.proxy.errors import error_response
from router.server.state import RouterState

#: The router's own program in supervisord.conf (render's ``[program:router]``).
ROUTER_PROGRAM = "router"
DEFAULT_LINES = 100
MAX_LINES = 10_000
#: Lines a stream starts with before following, as ``tail -f`` does.
DEFAULT_STREAM_LINES = 10
#: A tail answer never reads more than this much of the file's end, whatever `lines` asks.
MAX_TAIL_BYTES = 16 * 1024 * 1024
#: How often a follower looks for new bytes, a rotation or a truncation (well under the 1 s a reader expects).
POLL_SECONDS = 0.2
#: Longest silence on a stream before a keep-alive comment, so proxies do not close it.
HEARTBEAT_SECONDS = 15.0
#: A line longer than this (a runaway progress bar) is sent in pieces rather than held in memory.
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024


class LogUnavailable(Exception):
    """Why a log cannot be served: the HTTP status and a message naming the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def log_path(state: RouterState, name: str) -> str:
    """The log file of program `name` (an instance or ``router``) as supervisord reports it."""
    if state.processes is None:
        raise LogUnavailable(503, "This router does not run under supervisord (it was started without "
                                  "--supervisor-socket), so it has no program logs to serve; start the stack with "
                                  "python -m router.render ... && supervisord -c <out>/supervisord.conf.")
    programs = state.processes.states()
    known = sorted(n for n in servable(state) if programs.get(n) is not None and programs[n].logfile)
    process = programs.get(name)
    if name not in servable(state) or process is None or not process.logfile:
        if not programs:
            raise LogUnavailable(503, "supervisord has not answered the router yet, so no log file is known; "
                                      "retry in a moment (is supervisord running?).")
        raise LogUnavailable(404, f"No log named '{name}'. Known logs: {', '.join(known) or 'none'}.")
    return process.logfile


def servable(state: RouterState) -> set[str]:
    """The names a log may be asked for: every configured instance and the router (never other programs)."""
    return {r.name for r in state.table.replicas()} | {ROUTER_PROGRAM}


def lines_param(request: Request, default: int) -> int:
    """``?lines=N``, 0..MAX_LINES; LogUnavailable(400) naming the parameter otherwise."""
    raw = request.query_params.get("lines")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LINES:
        raise LogUnavailable(400, f"query parameter 'lines' must be a whole number from 0 to {MAX_LINES}, not {raw!r}")
    return value


class Tail(NamedTuple):
    """The end of a file: its last lines, and where a follower continues."""

    lines: list[bytes]
    #: The offset just after the file's last newline: an unfinished last line is read from there.
    resume: int


def tail_of(f: BinaryIO, lines: int, whole_lines_only: bool = False) -> Tail:
    """The last `lines` lines of the open file `f` (with `whole_lines_only`, an unfinished last one is left out).

    Maps the file rather than using processes.tail_lines, which is made for a
    few lines of an error message and stops at 256 KB: here a reader may ask
    for 10,000 lines, so up to `MAX_TAIL_BYTES` are scanned, backwards from
    the end, one ``rfind`` per line.
    """
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return Tail([], 0)
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as data:
        floor = max(0, size - MAX_TAIL_BYTES)
        last = data.rfind(b"\n", floor)
        # A last line with no newline in the whole window is not held back: it is given up on.
        resume = last + 1 if last >= 0 else 0 if floor == 0 else size
        # A closing newline does not start a line of its own.
        end = resume - 1 if whole_lines_only else size - 1 if last == size - 1 else size
        if lines == 0 or end < floor:
            return Tail([], resume)
        start = end + 1  # as if a newline stood at `end`
        for _ in range(lines):
            cut = data.rfind(b"\n", floor, start - 1)
            start = cut + 1 if cut >= 0 else floor
            if cut < 0:
                break
        chunk = data[start:end]
    return Tail(chunk.split(b"\n"), resume)


def tail_text(path: str, lines: int) -> str:
    """The last `lines` lines of the file at `path` as text; empty while supervisord has not created it."""
    try:
        with open(path, "rb") as f:
            found = tail_of(f, lines).lines
    except FileNotFoundError:
        return ""
    return b"".join(line + b"\n" for line in found).decode("utf-8", errors="replace")


def events_of(line: bytes) -> list[bytes]:
    """One log line as SSE events: a progress bar's carriage returns split it, since SSE treats
    ``\\r`` as a line end and would otherwise cut the event short."""
    parts = [p for p in line.rstrip(b"\r").split(b"\r") if p]
    return parts or [b""]


def sse(line: bytes) -> bytes:
    return b"".join(b"data: " + part + b"\n\n" for part in events_of(line))


@dataclass
class Follower:
    """Reads the lines appended to a log path, across supervisord's rotation and truncation."""

    path: str
    file: Optional[BinaryIO] = None
    #: Bytes of an unfinished last line, held until its newline arrives.
    partial: bytes = b""

    @classmethod
    def after_tail(cls, path: str, lines: int) -> tuple[Follower, list[bytes]]:
        """A follower starting right after the last `lines` lines of `path`, and those lines.

        The tail and the follower share one open file, so no line written
        between the two is lost or sent twice; an unfinished last line is
        held back until it is finished.
        """
        follower = cls(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return follower, []  # supervisord has not created it yet: the follower waits for it
        tail = tail_of(f, lines, whole_lines_only=True)
        f.seek(tail.resume)
        follower.file = f
        return follower, tail.lines

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def poll(self) -> list[bytes]:
        """The complete lines written since the last poll (reopening the path once it was rotated)."""
        if self.file is None:
            try:
                self.file = open(self.path, "rb")
            except OSError:
                return []  # between the rename and the new file
        out = self._drain()
        if self._replaced():
            # What was written to the old file up to its rename, then the new file from its start.
            out += self._drain()
            self.close()
            if self.partial:
                out.append(self.partial)
                self.partial = b""
            out += self.poll()
        return out

    def _drain(self) -> list[bytes]:
        assert self.file is not None
        lines: list[bytes] = []
        while True:
            data = self.file.read(READ_BYTES)
            if not data:
                return lines
            *complete, self.partial = (self.partial + data).split(b"\n")
            lines += complete
            if len(self.partial) > MAX_LINE_BYTES:
                lines.append(self.partial)
                self.partial = b""

    def _replaced(self) -> bool:
        """Whether the path now names another file (rotated); a file that shrank (truncated) is reread from 0."""
        assert self.file is not None
        try:
            now = os.stat(self.path)
        except OSError:
            return True
        held = os.fstat(self.file.fileno())
        if (now.st_ino, now.st_dev) != (held.st_ino, held.st_dev):
            return True
        if now.st_size < self.file.tell():
            self.file.seek(0)
            self.partial = b""
        return False


class LogRoutes:
    """The handlers, bound to one router's state."""

    def __init__(self, state: RouterState):
        self.state = state

    def _target(self, request: Request, default_lines: int) -> tuple[str, int]:
        """The log file and ``?lines`` a request asks for; LogUnavailable when it cannot be served."""
        return log_path(self.state, request.path_params["name"]), lines_param(request, default_lines)

    async def tail(self, request: Request) -> Response:
        try:
            path, lines = self._target(request, DEFAULT_LINES)
        except LogUnavailable as e:
            return self._error(e)
        # Up to MAX_TAIL_BYTES read and decoded: in a thread, off the event loop that serves the requests.
        text = await asyncio.to_thread(tail_text, path, lines)
        return PlainTextResponse(text)

    async def stream(self, request: Request) -> Response:
        try:
            path, lines = self._target(request, DEFAULT_STREAM_LINES)
        except LogUnavailable as e:
            return self._error(e)
        follower, backlog = Follower.after_tail(path, lines)
        return StreamingResponse(self._events(request, follower, backlog), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @staticmethod
    async def _events(request: Request, follower: Follower, backlog: list[bytes]) -> AsyncIterator[bytes]:
        """The backlog, then new lines as they come; ends when the client goes away (checked at each
        poll, so a reader that left does not hold its file open until the next write fails)."""
        try:
            if backlog:
                yield b"".join(sse(line) for line in backlog)
            quiet = 0.0
            while True:
                new = follower.poll()
                if new:
                    quiet = 0.0
                    yield b"".join(sse(line) for line in new)
                    continue
                await asyncio.sleep(POLL_SECONDS)
                if await request.is_disconnected():
                    return
                quiet += POLL_SECONDS
                if quiet >= HEARTBEAT_SECONDS:
                    quiet = 0.0
                    yield b": keep-alive\n\n"
        finally:
            follower.close()

    @staticmethod
    def _error(e: LogUnavailable) -> Response:
        return error_response(e.status, e.message, param="lines" if e.status == 400 else "name")


def log_routes(state: RouterState) -> list[BaseRoute]:
    """``/logs/{name}`` and ``/logs/{name}/stream``; admin-only through the Guard's ``/logs/`` prefix."""
    routes = LogRoutes(state)
    return [Route("/logs/{name}", routes.tail, methods=["GET"]),
            Route("/logs/{name}/stream", routes.stream, methods=["GET"])]
