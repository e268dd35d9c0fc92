"""Logs over HTTP: ``GET /logs/{name}`` tails a program's log, ``/logs/{name}/stream`` follows it.

The router runs on a real uvicorn with a process watcher whose programs are
fixed by the test (log files in tmp_path), so tails, rotations and
truncations are exact; one test runs a real supervisord whose tiny
``stdout_logfile_maxbytes`` makes it rotate the router's own log while a
stream follows it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest
from helpers import distinct_ports, http_status, render, wait_for
from router_support import LoopThread, RouterServer, config_from, instance, loop  # noqa: F401 (fixture)
from supervised import Supervised

from router.config import Config
from router.server.http.app import create_app
from router.server.http.logs import MAX_TAIL_BYTES, tail_of
from router.supervision.processes import ProcessState, ProcessWatcher

pytestmark = pytest.mark.timeout(120)


class FixedPrograms(ProcessWatcher):
    """A watcher that never polls: its programs are the test's."""

    def __init__(self, programs: dict[str, ProcessState]):
        super().__init__("/nonexistent/supervisor.sock", lambda _: None)
        self.programs = programs

    def states(self) -> dict[str, ProcessState]:
        return dict(self.programs)

    async def poll(self) -> None:
        return None

    def start(self) -> None:
        return None


def program(name: str, log: Optional[Path]) -> ProcessState:
    return ProcessState(name=name, state="RUNNING", pid=1, description="", started_at=time.time(),
                        logfile=str(log) if log else None)


class LoggedRouter:
    """A router on uvicorn whose supervisord programs are `engine` and `router`, logging into tmp."""

    def __init__(self, loop: LoopThread, tmp: Path):
        self.engine_log = tmp / "engine.log"
        self.router_log = tmp / "router.log"
        config = config_from(tmp, [instance("m/one", 1, name="engine")])
        self.server = RouterServer(loop, config)
        self.server.app.state.processes = FixedPrograms(
            {"engine": program("engine", self.engine_log), "router": program("router", self.router_log),
             "logs": program("logs", tmp / "logs.log")})
        self.server.start()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.server.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture
def logged(loop: LoopThread, tmp_path: Path) -> Iterator[LoggedRouter]:
    r = LoggedRouter(loop, tmp_path)
    yield r
    r.server.stop()


class Stream:
    """An SSE client on a raw socket, read in a thread: every ``data:`` line arrives on `events`.

    A raw socket, so `close` really closes the connection (http.client keeps it open while a
    reader thread holds the response) and the router sees the client go.
    """

    def __init__(self, port: int, path: str):
        self.events: queue.Queue[str] = queue.Queue()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        while self.file.readline() not in (b"\r\n", b""):
            pass  # the headers
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        """Chunk-size lines and blank lines are skipped: only the events' data lines matter."""
        try:
            for raw in self.file:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    self.events.put(line[len("data: "):])
        except (OSError, ValueError):
            pass  # closed by the test

    def next(self, timeout: float) -> str:
        return self.events.get(timeout=timeout)

    def expect(self, lines: list[str], within: float) -> None:
        """The next events are exactly `lines`, each arriving within `within` seconds."""
        assert [self.next(within) for _ in lines] == lines

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_tail_gives_the_last_lines(logged: LoggedRouter) -> None:
    logged.engine_log.write_text("".join(f"line {i}\n" for i in range(500)))
    status, body = logged.get("/logs/engine?lines=3")
    assert status == 200 and body == b"line 497\nline 498\nline 499\n"
    status, body = logged.get("/logs/engine")
    assert status == 200 and body.decode().splitlines() == [f"line {i}" for i in range(400, 500)]
    logged.router_log.write_text("started\nhalf a li")  # an unfinished last line is shown as it is
    assert logged.get("/logs/router?lines=10") == (200, b"started\nhalf a li\n")


def test_tail_of_a_big_log_reads_only_its_end(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    line = b"x" * 4000 + b"\n"  # 10,000 of them are more than MAX_TAIL_BYTES
    path.write_bytes(line * (MAX_TAIL_BYTES // len(line) + 500))
    with open(path, "rb") as f:
        got = tail_of(f, 10_000).lines
    # Whole lines back to the limit, the first one cut where the limit falls.
    assert got[1:] == [line[:-1]] * (MAX_TAIL_BYTES // len(line))
    assert 0 < len(got[0]) < len(line) and sum(len(g) + 1 for g in got) == MAX_TAIL_BYTES
    with open(path, "rb") as f:
        assert tail_of(f, 2).lines == [line[:-1]] * 2
    path.write_bytes(b"\n")
    with open(path, "rb") as f:
        assert tail_of(f, 5).lines == [b""]


def test_unknown_names_and_bad_lines_get_openai_errors(logged: LoggedRouter) -> None:
    status, body = logged.get("/logs/nope")
    err = json.loads(body)["error"]
    # Only instances and the router: supervisord's other programs (the tmux `logs`) are not served.
    assert status == 404 and err["message"] == "No log named 'nope'. Known logs: engine, router."
    assert err["type"] == "not_found_error" and err["param"] == "name"
    assert logged.get("/logs/logs")[0] == 404
    assert logged.get("/logs/nope/stream")[0] == 404
    for bad in ("-1", "10001", "ten"):
        status, body = logged.get(f"/logs/engine?lines={bad}")
        assert status == 400 and json.loads(body)["error"]["param"] == "lines"
    # No log file yet: an empty tail, not an error.
    assert logged.get("/logs/engine") == (200, b"")


def test_without_supervisord_there_are_no_logs(loop: LoopThread, tmp_path: Path) -> None:
    server = RouterServer(loop, config_from(tmp_path, [instance("m/one", 1, name="engine")])).start()
    try:
        for path in ("/logs/engine", "/logs/router/stream"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(server.url + path, timeout=5)
            assert e.value.code == 503 and "does not run under supervisord" in json.loads(e.value.read())["error"]["message"]
    finally:
        server.stop()


def test_stream_follows_new_lines_rotation_and_truncation(logged: LoggedRouter) -> None:
    log = logged.engine_log
    log.write_text("".join(f"old {i}\n" for i in range(20)) + "unfinis")
    stream = Stream(logged.server.port, "/logs/engine/stream?lines=2")
    try:
        assert stream.status == 200
        stream.expect(["old 18", "old 19"], 1)
        append(log, "hed\nLoading 10%\rLoading 50%\r\n")
        stream.expect(["unfinished", "Loading 10%", "Loading 50%"], 1)
        # supervisord's rotation: the last line written to the old file, a rename, a new file.
        append(log, "last before rotation\n")
        os.rename(log, f"{log}.1")
        append(log, "first after rotation\n")
        stream.expect(["last before rotation", "first after rotation"], 1)
        append(log, "second after rotation\n")
        stream.expect(["second after rotation"], 1)
        # A truncation in place (copytruncate): read again from the start.
        time.sleep(0.5)
        log.write_text("after truncation\n")
        stream.expect(["after truncation"], 1)
    finally:
        stream.close()


def test_stream_waits_for_a_log_that_does_not_exist_yet(logged: LoggedRouter) -> None:
    stream = Stream(logged.server.port, "/logs/router/stream")
    try:
        time.sleep(0.3)
        append(logged.router_log, "hello\n")
        stream.expect(["hello"], 1)
    finally:
        stream.close()


def guarded(config: Config, path: str, client: tuple[str, int], headers: list[tuple[bytes, bytes]]
            ) -> tuple[Optional[int], Optional[dict]]:
    """One GET through the app as ASGI from the peer address `client`: the guard's (status, error),
    or (None, None) when it lets the request through to the route."""
    app = create_app(config)
    app.state.processes = FixedPrograms({"router": program("router", None)})
    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": headers, "client": client}
    if app.state.guard.check(scope) is None:
        return None, None
    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    async def receive() -> dict:
        raise AssertionError("a refused request's body is never read")
    asyncio.run(app(scope, receive, send))
    return messages[0]["status"], json.loads(messages[1]["body"])["error"]


@pytest.mark.parametrize("path", ["/logs/router", "/logs/router/stream", "/logs/nope"])
def test_logs_are_admin_only(tmp_path: Path, path: str) -> None:
    remote, local = ("203.0.113.9", 40000), ("127.0.0.1", 40000)
    plain = config_from(tmp_path, [instance("m/one", 1, name="engine")])
    status, err = guarded(plain, path, remote, [])
    assert status == 403 and err is not None and "router.admin_api_key" in err["message"]
    assert guarded(plain, path, local, []) == (None, None)
    keyed = config_from(tmp_path, [instance("m/one", 1, name="engine")], {"admin_api_key": "adm-key-1"})
    assert guarded(keyed, path, local, [])[0] == 401
    assert guarded(keyed, path, remote, [(b"authorization", b"Bearer wrong")])[0] == 401
    assert guarded(keyed, path, remote, [(b"authorization", b"Bearer adm-key-1")]) == (None, None)


# -- a real supervisord rotating the router's log ------------------------------------------------

@pytest.mark.slow  # waits for supervisord to rotate a log; rotation itself is checked without it
def test_stream_survives_supervisords_own_rotation() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kvl", dir="/tmp"))
    router_port, engine_port = distinct_ports(2)
    doc = {"router": {"router_port": router_port, "health_check_interval_seconds": 0.3},
           # Its own tmux session names: render refuses names another stack on this machine uses.
           "tmux_session_prefix": f"kvl{router_port}-",
           "instances": [{"name": "eng", "model": "m/eng", "engine": "vllm", "engine_args": [f"--port={engine_port}"]}]}
    out = render(tmp, doc, "--sim")
    conf = out / "supervisord.conf"
    # Hand-tuned: supervisord rotates the router's log every 2 KB (a few access-log lines).
    conf.write_text(re.sub(r"stdout_logfile_maxbytes=\S+", "stdout_logfile_maxbytes=2KB", conf.read_text()))
    stack = Supervised(out, tmp / "tmux")
    url = f"http://127.0.0.1:{router_port}"
    try:
        stack.start()
        stack.wait_running(["eng", "router", "logs"], 30)
        wait_for(lambda: http_status(f"{url}/health/m/eng") == 200, 30, "the engine healthy in the router")
        stream = Stream(router_port, "/logs/router/stream?lines=0")
        try:
            # Each completion adds one access-log line; 40 of them (about 4 KB) make two rotations.
            # They go in batches of 5, each batch's lines all expected within 1 s.
            body = json.dumps({"model": "m/eng", "prompt": "x", "max_tokens": 1}).encode()
            for _ in range(8):
                for _ in range(5):
                    req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                                 headers={"content-type": "application/json"})
                    assert urllib.request.urlopen(req, timeout=10).status == 200
                deadline = time.monotonic() + 1.0
                got = 0
                while got < 5:
                    got += "m/eng single -> eng 200" in stream.next(max(0.01, deadline - time.monotonic()))
            rotated = out / "logs" / "router.log.1"
            assert rotated.exists(), "supervisord did not rotate the router's log: the test proves nothing"
        finally:
            stream.close()
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
