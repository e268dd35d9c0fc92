"""ProcessWatcher against a real supervisord: it sees programs start, fail and
stop within about a second, reads their logs, and shrugs off a supervisord
that is missing or goes away."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers import wait_for, wait_for_async
from supervised import Supervised

from router.supervision.processes import REMOVED, ProcessState, ProcessWatcher, tail_lines
from router.supervision.supervisord import connect

pytestmark = pytest.mark.timeout(60)

CONF = """\
[unix_http_server]
file=%(here)s/supervisor.sock
chmod=0700

[supervisord]
logfile=%(here)s/logs/supervisord.log
pidfile=%(here)s/supervisord.pid

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/supervisor.sock

[program:good]
command=sh -c 'for i in 1 2 3 4 5; do echo "good line $i"; done; exec sleep 1000'
startsecs=1
stopwaitsecs=2
redirect_stderr=true
stdout_logfile=%(here)s/logs/good.log

[program:bad]
command=sh -c 'echo "bad: cannot start" >&2; exit 3'
startsecs=1
startretries=1
redirect_stderr=true
stdout_logfile=%(here)s/logs/bad.log
"""


class Seen:
    """Every on_change call, with the monotonic time it arrived."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, ProcessState]] = []

    def __call__(self, state: ProcessState) -> None:
        self.calls.append((time.monotonic(), state))

    def first(self, name: str, state: str) -> tuple[float, ProcessState] | None:
        return next(((t, s) for t, s in self.calls if s.name == name and s.state == state), None)


@pytest.fixture
def supervisord() -> Iterator[Supervised]:
    """A supervisord running `good` and `bad`, shut down whatever the test did."""
    tmp = Path(tempfile.mkdtemp(prefix="kvp", dir="/tmp"))
    (tmp / "logs").mkdir()
    (tmp / "supervisord.conf").write_text(CONF)
    stack = Supervised(tmp, tmp / "tmux", ctl_timeout=10, shutdown_timeout=15)
    try:
        stack.start()
        # Watchers start once it answers: a socket not there yet would count as supervisord going away.
        wait_for(lambda: statename(stack, "good"), 10, "supervisord to answer")
        yield stack
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


def socket_of(stack: Supervised) -> str:
    return str(stack.out / "supervisor.sock")


def statename(stack: Supervised, name: str) -> str | None:
    """The program's state straight from supervisord, None while it does not answer."""
    try:
        with connect(socket_of(stack)) as proxy:
            return proxy.supervisor.getProcessInfo(name)["statename"]
    except OSError:
        return None


def call(stack: Supervised, method: str, *args: str) -> object:
    """supervisord's XML-RPC `method` (supervisor.<method>) on `args`, over a connection closed after."""
    with connect(socket_of(stack)) as proxy:
        return getattr(proxy.supervisor, method)(*args)


async def until_state(stack: Supervised, name: str, state: str, timeout: float) -> float:
    """When supervisord itself first reported `name` in `state` (polled every 50 ms)."""
    async def reached() -> bool:
        return await asyncio.to_thread(statename, stack, name) == state
    await wait_for_async(reached, timeout, f"supervisord to put {name} in {state}", interval=0.05)
    return time.monotonic()


def test_watcher_sees_running_fatal_stopped_and_removed(supervisord: Supervised) -> None:
    seen = Seen()

    async def scenario() -> None:
        watcher = ProcessWatcher(socket_of(supervisord), seen)
        watcher.start()
        try:
            await wait_for_async(lambda: seen.first("good", "RUNNING"), 10, "good RUNNING")
            good = watcher.states()["good"]
            assert good.running and good.pid == await asyncio.to_thread(supervisord.pid, "good")
            assert good.logfile == str(supervisord.out / "logs" / "good.log")
            report = good.report(time.time())
            assert report["state"] == "RUNNING" and report["pid"] == good.pid
            assert report["log"] == good.logfile and report["uptime_seconds"] is not None
            assert good.log_tail(2) == ["good line 4", "good line 5"]

            fatal_at = await until_state(supervisord, "bad", "FATAL", 15)
            seen_at, _ = await wait_for_async(lambda: seen.first("bad", "FATAL"), 5, "bad FATAL reported")
            assert seen_at - fatal_at < 2
            bad = watcher.states()["bad"]
            assert bad.pid is None and not bad.running and bad.description
            assert bad.report(time.time())["uptime_seconds"] is None
            assert bad.log_tail(5)[-1] == "bad: cannot start"
            # BACKOFF came first: each change is reported, not just the latest state.
            assert seen.first("bad", "BACKOFF") is not None

            await asyncio.to_thread(call, supervisord, "stopProcess", "good")
            stopped_at = time.monotonic()
            seen_at, _ = await wait_for_async(lambda: seen.first("good", "STOPPED"), 3, "good STOPPED reported")
            assert seen_at - stopped_at < 1.5
            assert watcher.states()["good"].pid is None

            # A RUNNING program's description ticks its uptime: that alone is no change.
            assert len([s for _, s in seen.calls if s.name == "good" and s.state == "RUNNING"]) == 1

            await asyncio.to_thread(call, supervisord, "removeProcessGroup", "good")
            await wait_for_async(lambda: seen.first("good", REMOVED), 3, "good REMOVED reported")
            gone = seen.calls[-1][1]
            assert gone.state == REMOVED and gone.pid is None and gone.logfile == good.logfile
            assert set(watcher.states()) == {"bad"}
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_no_supervisord_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    tmp = tempfile.mkdtemp(prefix="kvp", dir="/tmp")
    seen = Seen()

    async def scenario() -> None:
        watcher = ProcessWatcher(f"{tmp}/supervisor.sock", seen, interval=0.1)
        watcher.start()
        await asyncio.sleep(0.8)
        assert watcher.running
        assert not watcher.reachable and watcher.states() == {}
        await watcher.stop()

    try:
        with caplog.at_level(logging.INFO, logger="router.processes"):
            asyncio.run(scenario())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert seen.calls == []
    assert len(caplog.records) == 1 and "not reachable" in caplog.records[0].getMessage()


def test_supervisord_going_away_and_coming_back(supervisord: Supervised, caplog: pytest.LogCaptureFixture) -> None:
    seen = Seen()

    async def scenario() -> None:
        watcher = ProcessWatcher(socket_of(supervisord), seen, interval=0.2)
        watcher.start()
        try:
            await wait_for_async(lambda: seen.first("good", "RUNNING"), 10, "good RUNNING")
            old_pid = watcher.states()["good"].pid
            await asyncio.to_thread(supervisord.shutdown)
            await wait_for_async(lambda: not watcher.reachable, 3, "the watcher to notice supervisord is gone")
            await asyncio.sleep(0.6)
            assert watcher.running
            assert watcher.states()["good"].name == "good"  # the last known states stay

            before = len(seen.calls)
            supervisord.start()
            await wait_for_async(lambda: watcher.reachable, 10, "the watcher to reach the new supervisord")
            await wait_for_async(lambda: any(s.name == "good" and s.running and s.pid != old_pid
                                    for _, s in seen.calls[before:]), 10, "good RUNNING with a new pid")
        finally:
            await watcher.stop()

    with caplog.at_level(logging.INFO, logger="router.processes"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "not reachable" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], messages


def test_one_bad_poll_or_callback_does_not_end_watching(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    polls: list[int] = []
    ok = ProcessState(name="a", state="RUNNING", pid=42, description="pid 42, uptime 0:00:01",
                      started_at=time.time(), logfile=None)

    def flaky(socket_path: str) -> list[ProcessState]:
        polls.append(1)
        if len(polls) == 1:
            raise RuntimeError("boom")
        return [ok]

    def angry(state: ProcessState) -> None:
        raise ValueError("callback bug")

    monkeypatch.setattr("router.supervision.processes.fetch_all", flaky)

    async def scenario() -> None:
        watcher = ProcessWatcher("/nonexistent.sock", angry, interval=0.05)
        watcher.start()
        await wait_for_async(lambda: len(polls) >= 4, 3, "polling to go on")
        assert watcher.states() == {"a": ok} and watcher.reachable
        await watcher.stop()

    with caplog.at_level(logging.INFO, logger="router.processes"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 2 and "failed" in messages[0] and "on_change" in messages[1], messages


def test_tail_lines_reads_the_end_of_big_and_odd_files(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    big.write_text("".join(f"line {i}\n" for i in range(200_000)))
    assert tail_lines(big, 3) == ["line 199997", "line 199998", "line 199999"]
    assert tail_lines(big, 0) == []
    partial = tmp_path / "partial.log"
    partial.write_text("one\ntwo\nthree (no newline yet)")
    assert tail_lines(partial, 2) == ["two", "three (no newline yet)"]
    assert tail_lines(partial, 10) == ["one", "two", "three (no newline yet)"]
    (tmp_path / "empty.log").write_text("")
    assert tail_lines(tmp_path / "empty.log", 5) == []
    assert tail_lines(tmp_path / "missing.log", 5) == []
    assert tail_lines(tmp_path, 5) == []  # a folder is unreadable as a log
    assert ProcessState(name="x", state="STOPPED", pid=None, description="Not started",
                        started_at=None, logfile=None).log_tail() == []
