"""supervisord's view of every engine process, polled for the router.

An engine's HTTP health says whether it answers, not why it does not: only
supervisord knows whether it is still STARTING, crash-looping in BACKOFF,
FATAL after its retries, or STOPPED by an operator, and where its log is.
`ProcessWatcher` polls ``supervisor.getAllProcessInfo()`` over the unix socket
and hands each change to a callback on the event loop, so /health/all can show
it and point at the log; `python -m router.status` reads the same states once.

Depends only on router.supervision.supervisord, router.util, the supervisor
package and the standard library, so the server, status and render can all use it.
"""
from __future__ import annotations

import asyncio
import http.client
import logging
import os
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypedDict, Union

from supervisor.xmlrpc import Faults

from router.supervision.supervisord import connect
from router.util.periodic import Periodic

log = logging.getLogger("router.processes")

RUNNING = "RUNNING"
#: The state of a program that supervisord no longer has (removed by `update`);
#: not one of supervisord's own statenames.
REMOVED = "REMOVED"

#: One value of a getAllProcessInfo entry (XML-RPC strings and integers).
InfoValue = Union[str, int]

#: Read a log's tail in blocks this size, and never more than `_TAIL_MAX_BYTES`:
#: an engine's log can be 50 MB with very long lines, and a tail is for error messages.
_TAIL_BLOCK = 8192
_TAIL_MAX_BYTES = 256 * 1024


class ProcessReport(TypedDict):
    """The ``process`` block of one engine in /health/all."""

    state: str
    pid: Optional[int]
    description: str
    uptime_seconds: Optional[float]
    log: Optional[str]


@dataclass(frozen=True)
class ProcessState:
    """One program as supervisord last reported it."""

    #: The program's name, which the renderer makes the instance's name.
    name: str
    #: supervisord's statename (RUNNING, STARTING, BACKOFF, FATAL, STOPPED,
    #: EXITED, STOPPING, UNKNOWN), or `REMOVED`.
    state: str
    #: None when supervisord reports 0 (no process).
    pid: Optional[int]
    #: supervisord's own words, e.g. "Exited too quickly (process log may have details)".
    description: str
    #: Unix time of the last start; None if never started.
    started_at: Optional[float]
    #: The program's stdout_logfile; None when it has none.
    logfile: Optional[str]

    @classmethod
    def from_info(cls, info: dict[str, InfoValue]) -> ProcessState:
        """From one entry of ``supervisor.getAllProcessInfo()``."""
        pid = int(info["pid"])
        start = int(info["start"])
        logfile = str(info.get("stdout_logfile") or info.get("logfile") or "")
        return cls(name=str(info["name"]), state=str(info["statename"]), pid=pid or None,
                   description=str(info["description"]), started_at=float(start) if start else None,
                   logfile=logfile or None)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def removed(self) -> ProcessState:
        """This program once supervisord no longer has it: the log path stays, for a look at why."""
        return ProcessState(name=self.name, state=REMOVED, pid=None, description="removed from supervisord",
                            started_at=None, logfile=self.logfile)

    def change_key(self) -> tuple[str, Optional[int], str]:
        """What a change is: state, pid or description. A RUNNING program's description
        is "pid N, uptime H:MM:SS", new every second, so it is left out there."""
        return self.state, self.pid, "" if self.running else self.description

    def uptime_seconds(self, now: float) -> Optional[float]:
        """Seconds since it started, while RUNNING (a stopped program has no uptime)."""
        if not self.running or self.started_at is None:
            return None
        return round(max(0.0, now - self.started_at), 1)

    def report(self, now: float) -> ProcessReport:
        """The JSON block the router shows under ``process``; `now` is unix time."""
        return {"state": self.state, "pid": self.pid, "description": self.description,
                "uptime_seconds": self.uptime_seconds(now), "log": self.logfile}

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last `lines` lines of its log, for an error message; [] if there is none to read."""
        return tail_lines(self.logfile, lines) if self.logfile else []


def tail_lines(path: str | Path, lines: int) -> list[str]:
    """The last `lines` lines of the file at `path`, read from its end; [] if unreadable.

    Reads backwards block by block, so a 50 MB log costs a few reads, and at most
    `_TAIL_MAX_BYTES` (a longer last line comes back cut at its start).
    """
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            data = b""
            # lines + 1 newlines: the file's closing newline does not start a line.
            while pos > 0 and data.count(b"\n") <= lines and end - pos < _TAIL_MAX_BYTES:
                step = min(_TAIL_BLOCK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


def fetch_all(socket_path: str | Path) -> list[ProcessState]:
    """Every program supervisord has, in one blocking call over a fresh connection.

    A fresh connection per poll: the transport keeps a broken connection after
    supervisord restarts, and one connect on a unix socket per poll is cheap.
    """
    with connect(socket_path) as proxy:
        return [ProcessState.from_info(info) for info in proxy.supervisor.getAllProcessInfo()]


def _program_call(socket_path: str | Path, name: str, call: str, wait: bool, already: int) -> ProcessState:
    """Ask supervisord to start or stop `name`; its state after. Fault `already` (it is already
    where the caller wants it) is no error."""
    with connect(socket_path) as proxy:
        try:
            getattr(proxy.supervisor, call)(name, wait)
        except xmlrpc.client.Fault as e:
            if e.faultCode != already:
                raise
        return ProcessState.from_info(proxy.supervisor.getProcessInfo(name))


def start_program(socket_path: str | Path, name: str) -> ProcessState:
    """Start `name`, not waiting for it to count as started (the caller waits for its health check)."""
    return _program_call(socket_path, name, "startProcess", False, Faults.ALREADY_STARTED)


def stop_program(socket_path: str | Path, name: str) -> ProcessState:
    """Stop `name` and wait until it (its whole process group) is down."""
    return _program_call(socket_path, name, "stopProcess", True, Faults.NOT_RUNNING)


def _unreachable(error: Exception) -> bool:
    """Whether `error` only means no supervisord answers now: none listens, it is
    going away mid-answer, or it is shutting down and refuses calls."""
    if isinstance(error, xmlrpc.client.Fault):
        return error.faultCode == Faults.SHUTDOWN_STATE
    return isinstance(error, (OSError, http.client.HTTPException))


class ProcessWatcher:
    """Polls supervisord every `interval` seconds and reports each program's changes.

    `on_change(state)` runs on the event loop, for every program on the first
    poll that reaches supervisord, then for each program whose state, pid or
    description changed. A program that supervisord no longer has is reported
    once more, with state `REMOVED` (pid None, its last log path), then dropped
    from `states()`; one callback serves both, so its owner needs no second path.

    A supervisord that does not answer is not an error: the last known states
    are kept, `reachable` turns False, and one line is logged when it goes away
    and one when it comes back; the poll after it comes back reports whatever
    changed meanwhile (a restarted supervisord gives every program a new pid).
    """

    def __init__(self, socket_path: str | Path, on_change: Callable[[ProcessState], None], interval: float = 0.5):
        self._socket_path = socket_path
        self._on_change = on_change
        self._states: dict[str, ProcessState] = {}
        self._reachable = False
        #: Whether supervisord was ever reached or found missing: the first miss is logged too.
        self._polled = False
        self._loop = Periodic("router-processes", self.poll, lambda: interval, log)

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def reachable(self) -> bool:
        """Whether the last poll reached supervisord."""
        return self._reachable

    def states(self) -> dict[str, ProcessState]:
        """Program name -> its last known state (a copy)."""
        return dict(self._states)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Ends polling; a getAllProcessInfo still blocked in its thread is left to finish there."""
        await self._loop.stop()

    async def poll(self) -> None:
        """One poll: fetch every program's state and report what changed."""
        try:
            current = await asyncio.to_thread(fetch_all, self._socket_path)
        except Exception as e:
            if not _unreachable(e):
                raise
            if self._reachable or not self._polled:
                log.warning("supervisord at %s is not reachable (%s); its programs' states are not updated",
                            self._socket_path, e)
            self._reachable = False
            self._polled = True
            return
        if not self._reachable and self._polled:
            log.warning("supervisord at %s is reachable again", self._socket_path)
        self._reachable = True
        self._polled = True
        self._apply(current)

    def _apply(self, current: list[ProcessState]) -> None:
        seen = {s.name: s for s in current}
        changed = [s for s in current if s.name not in self._states
                   or self._states[s.name].change_key() != s.change_key()]
        gone = [self._states[name].removed() for name in self._states if name not in seen]
        self._states = seen
        for state in changed + gone:
            try:
                self._on_change(state)
            except Exception:
                log.exception("on_change for program %s (%s) failed", state.name, state.state)
