"""``python -m router.status`` against real supervised --sim stacks, run as a user runs it (piped).

`--wait` exits 0 once every engine is healthy and 1 within 3 s of an engine
failing (its port held by a test socket, so it exits at once: BACKOFF, then
FATAL), naming it with the end of its log; piped output is plain lines;
`--json` has a stable shape, also when nothing is running.
"""
from __future__ import annotations

import contextlib
import json
import os
import pty
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers import distinct_ports, wait_for
from rich.console import Console
from supervised import give_up_sooner, sim_stack

from router.status.snapshot import RouterView, Row, Snapshot, Source, router_views
from router.status.view import status_table
from router.status.wait import Waiter
from router.supervision.processes import ProcessState

pytestmark = pytest.mark.timeout(120)

PY = sys.executable


class Stack:
    """A rendered --sim stack under a real supervisord, and its config for the status tool."""

    def __init__(self, engines: dict[str, int], extra: dict[str, object] | None = None,
                 before_start: Callable[[Path], None] | None = None):
        (self.router_port,) = distinct_ports(1)
        doc = {"router": {"router_port": self.router_port, "health_check_interval_seconds": 0.3},
               # Its own tmux session names: render refuses names another stack on this machine uses.
               "tmux_session_prefix": f"kvs{self.router_port}-",
               "instances": [{"name": n, "model": f"m/{n}", "engine": "vllm", "engine_args": [f"--port={p}"]}
                             for n, p in engines.items()], **(extra or {})}
        self._owned = contextlib.ExitStack()
        # Not started: some tests start the status tool first, as a deploy script would.
        self.supervised = self._owned.enter_context(sim_stack(doc, prefix="kvs", start=False, before_start=before_start))
        self.out = self.supervised.out
        self.config = self.out.parent / "config.yaml"

    def status(self, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "router.status", "--config", str(self.config), "--out", str(self.out), *flags],
                              capture_output=True, text=True, timeout=timeout)

    def start_status(self, *flags: str) -> subprocess.Popen[str]:
        return subprocess.Popen([PY, "-m", "router.status", "--config", str(self.config), "--out", str(self.out),
                                 *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        self._owned.close()


@pytest.fixture(scope="module")
def healthy() -> Iterator[Stack]:
    """Two engines that come up; `--wait` is started before supervisord, as a deploy script would."""
    stack = Stack(dict(zip(("alpha", "beta"), distinct_ports(2))))
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[Stack, socket.socket]]:
    """An engine whose port a test socket holds: it exits at once, BACKOFF, then FATAL. Started here,
    so the first test's --wait starts while supervisord is still trying it."""
    good, taken = distinct_ports(2)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", taken))
    squatter.listen()
    stack = Stack({"good": good, "broken": taken}, before_start=give_up_sooner)
    try:
        stack.supervised.start()
        yield stack, squatter
    finally:
        stack.close()
        squatter.close()


def test_wait_exits_0_once_all_are_healthy_with_plain_lines(healthy: Stack) -> None:
    waiting = healthy.start_status("--wait", "--timeout", "60")
    time.sleep(0.5)  # the tool sees nothing running first: it must wait, not fail
    healthy.supervised.start()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, out + err
    lines = out.splitlines()
    # A pipe gets plain lines: no escape codes, no table, one line per change.
    assert "\x1b" not in out and "┃" not in out
    assert any("supervisord not reachable" in ln or "router not reachable" in ln for ln in lines), out
    for name in ("alpha", "beta"):
        mine = [ln.split("] ", 1)[1].split(" | ")[0] for ln in lines if f"] {name}:" in ln]
        assert mine[-1] == f"{name}: process RUNNING, health healthy", out
        assert all(a != b for a, b in zip(mine, mine[1:])), f"a line repeated without a change:\n{out}"
    assert lines[-1].startswith("all 2 launched instances are healthy after"), out
    # Once up, a plain status agrees (exit 0), and a second wait returns at once.
    assert healthy.status("--wait").returncode == 0


def test_json_shape(healthy: Stack) -> None:
    healthy.supervised.start() if not healthy.supervised.running() else None
    assert healthy.status("--wait", "--timeout", "60").returncode == 0
    done = healthy.status("--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert set(doc) == {"ready", "taken_at", "supervisord", "router", "instances"} and doc["ready"] is True
    assert doc["supervisord"] == {"socket": str(healthy.out / "supervisor.sock"), "reachable": True, "error": None}
    assert doc["router"]["reachable"] and doc["router"]["url"] == f"http://127.0.0.1:{healthy.router_port}"
    assert doc["router"]["process"]["state"] == "RUNNING"
    assert [i["name"] for i in doc["instances"]] == ["alpha", "beta"]
    for inst in doc["instances"]:
        assert set(inst) == {"name", "model", "launched", "on_demand", "ready", "process", "health", "health_detail",
                             "residency", "in_flight", "requests_per_second", "tokens_per_second", "last_activity",
                             "uptime_seconds"}
        assert inst["process"]["state"] == "RUNNING" and inst["process"]["log"].endswith(f"{inst['name']}.log")
        assert inst["health"] == "healthy" and inst["residency"] == "awake" and inst["in_flight"] == 0
        assert inst["requests_per_second"] == 0 and inst["tokens_per_second"] == 0 and inst["uptime_seconds"] >= 0
    # The table, piped: plain text naming every instance and state.
    table = healthy.status()
    assert table.returncode == 0 and "\x1b" not in table.stdout
    assert all(w in table.stdout for w in ("alpha", "beta", "RUNNING", "healthy", "awake"))
    header = next(ln for ln in table.stdout.splitlines() if " instance " in ln)
    assert [w for w in header.split() if w not in "┃│"][:6] == ["instance", "model", "process", "health", "residency", "in-flight"], header
    assert "sleep" not in header


def test_json_when_nothing_runs(tmp_path: Path) -> None:
    (port,) = distinct_ports(1)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"router": {"router_port": port}, "instances": [
        {"name": "solo", "model": "m/solo", "engine": "vllm", "engine_args": ["--port=1"]}]}))
    done = subprocess.run([PY, "-m", "router.status", "--config", str(config), "--out", str(tmp_path), "--json"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ready"] is False and not doc["supervisord"]["reachable"] and not doc["router"]["reachable"]
    assert "supervisord is not running" in doc["supervisord"]["error"] and doc["router"]["error"]
    assert doc["instances"][0]["process"] is None and doc["instances"][0]["health"] is None
    table = subprocess.run([PY, "-m", "router.status", "--config", str(config), "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 1 and "router not reachable at" in table.stdout and "solo" in table.stdout
    bad = subprocess.run([PY, "-m", "router.status", "--config", str(tmp_path / "none.yaml")],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "none.yaml" in bad.stderr


def test_wait_exits_1_within_3s_of_an_engine_failing(failing: tuple[Stack, socket.socket]) -> None:
    stack, _ = failing
    waiting = stack.start_status("--wait", "--timeout", "60")
    failed_at = float(wait_for(lambda: stack.supervised.status().get("broken") in ("BACKOFF", "FATAL")
                               and time.monotonic(), 60, "supervisord to give up on 'broken'", interval=0.05))
    out, err = waiting.communicate(timeout=30)
    assert time.monotonic() - failed_at < 3.0
    assert waiting.returncode == 1, out + err
    assert err.startswith("error: instance broken is ") and ("FATAL" in err or "BACKOFF" in err), err
    # The end of its log: the simulated engine says why it could not start.
    assert "broken.log" in err and "cannot listen on 127.0.0.1" in err, err


def test_wait_exits_1_on_an_engine_already_fatal(failing: tuple[Stack, socket.socket]) -> None:
    stack, _ = failing
    wait_for(lambda: stack.supervised.status().get("broken") == "FATAL", 60, "'broken' FATAL", interval=0.1)
    t0 = time.monotonic()
    done = stack.status("--wait", "--json", timeout=30)
    assert done.returncode == 1 and time.monotonic() - t0 < 3.0
    assert "error: instance broken is FATAL: Exited too quickly" in done.stderr, done.stderr
    broken = next(i for i in json.loads(done.stdout)["instances"] if i["name"] == "broken")
    assert broken["process"]["state"] == "FATAL" and broken["ready"] is False


def test_router_views_read_what_is_there_and_show_residency() -> None:
    health = {"models": {
        "m/a": {"status": "healthy", "sleep": {"state": "awake"}, "residency": {"state": "resident", "bytes": 1},
                "endpoints": [{"instance": "a", "status": "healthy", "outstanding": 2}]},
        "m/b": {"status": "sleeping", "sleep": {"state": "sleeping"},
                "endpoints": [{"instance": "b", "status": "sleeping", "residency": "evicted"}, {"status": "x"}]},
        "m/c": "not an object"}}
    traffic = {"traffic_stats": {"m/a": {"request_rate": 1.5, "last_activity_time": 100.0}}}
    views = router_views(health, traffic)
    assert views == {"a": RouterView("healthy", None, "resident", 2, 1.5, 100.0),
                     "b": RouterView("sleeping", None, "evicted")}
    assert router_views(["garbage"], None) == {}
    snapshot = Snapshot(taken_at=160.0, supervisord=Source("s", "down"), router=Source("r"),
                        rows=(Row("a", "m/a", True, None, views["a"]), Row("b", "m/b", True, None, views["b"])))
    assert snapshot.ready
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        console.print(status_table(snapshot))
    text = captured.get()
    assert "residency" in text and "resident" in text and "evicted" in text and "1m00s ago" in text
    assert "supervisord not reachable at s: down" in text


def test_status_shows_tokens_per_second_per_model_from_usage() -> None:
    health = {"models": {m: {"status": "healthy", "endpoints": [{"instance": m[-1], "status": "healthy"}]}
                         for m in ("m/a", "m/b")}}
    usage = {"window_seconds": 10, "by": "model",
             "usage": {"m/a": {"requests": 3, "prompt_tokens": 30, "completion_tokens": 95}}}
    views = router_views(health, {}, usage)
    assert views["a"].tokens_rate == 12.5 and views["b"].tokens_rate == 0.0
    assert router_views(health, {})["a"].tokens_rate is None  # no /usage for this reader: unknown, not zero
    snapshot = Snapshot(taken_at=time.time(), supervisord=Source("s"), router=Source("r"),
                        rows=(Row("a", "m/a", True, None, views["a"]),))
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        console.print(status_table(snapshot))
    assert "tok/s (10s)" in captured.get() and "12.5" in captured.get()


def test_progress_shows_a_log_line_as_a_terminal_would(tmp_path: Path) -> None:
    log = tmp_path / "e.log"
    log.write_text("loading\n\x1b[32mINFO\x1b[0m weights 10%\r weights\t90%\r\n")
    process = ProcessState("e", "STARTING", 7, "", None, str(log))
    assert Row("e", "m/e", True, process, RouterView()).last_log_line() == " weights 90%"
    assert Row("e", "m/e", True, None, RouterView()).last_log_line() == ""


def snapshot_of(*rows: Row, router_process: ProcessState | None = None, router_up: bool = True) -> Snapshot:
    return Snapshot(taken_at=time.time(), supervisord=Source("sock"), router=Source("url", None if router_up else "refused"),
                    rows=rows, router_process=router_process)


def test_waiter_verdicts(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("Traceback\nImportError: no module named x\n")
    starting = ProcessState("e", "STARTING", 7, "", None, None)
    up = Row("e", "m/e", True, ProcessState("e", "RUNNING", 7, "", time.time(), None), RouterView(health="healthy"))
    coming = Row("e", "m/e", True, starting, RouterView(health="down", detail="process STARTING"))
    remote = Row("r", "m/r", False, None, RouterView(health="unhealthy"))  # launch: false: not waited for
    # on_demand: stopped until a request needs it, so not waited for either.
    idle = Row("o", "m/o", True, ProcessState("o", "STOPPED", None, "Not started", None, None), RouterView(), True)
    waiter = Waiter(timeout=10, started=100.0)
    assert waiter.judge(snapshot_of(coming, remote), 101.0) is None
    assert waiter.judge(snapshot_of(coming, remote, router_up=False), 101.0) is None
    done = waiter.judge(snapshot_of(up, remote, idle), 102.5)
    assert done is not None and done.ok and done.message == "all 1 launched instances are healthy after 2.5s"
    assert waiter.elapsed(snapshot_of(up), 200.0) == {"e": 2.5}  # the time it took, kept once it is up
    late = Waiter(timeout=10, started=100.0).judge(snapshot_of(coming), 110.0)
    assert late is not None and not late.ok
    assert late.message == "not healthy after 10s: e: process STARTING, health down (process STARTING)"
    dead_router = ProcessState("router", "FATAL", None, "Exited too quickly", None, str(log))
    failed = Waiter(timeout=10, started=100.0).judge(snapshot_of(up, router_process=dead_router, router_up=False), 101.0)
    assert failed is not None and not failed.ok and failed.message.startswith("the router is FATAL")
    assert failed.culprits[0].log == ("Traceback", "ImportError: no module named x")


def test_plain_progress_prints_only_changes() -> None:
    waiter = Waiter(timeout=10, started=100.0)
    coming = Row("e", "m/e", True, ProcessState("e", "STARTING", 7, "", None, None), RouterView())
    first = waiter.changes(snapshot_of(coming, router_up=False), 100.5, {"e": "loading"})
    assert first == ["[   0.5s] router not reachable at url: refused", "[   0.5s] e: process STARTING, health ? | loading"]
    assert waiter.changes(snapshot_of(coming, router_up=False), 101.0, {"e": "still loading"}) == []
    assert waiter.changes(snapshot_of(coming), 101.5, {"e": "x"}) == ["[   1.5s] router answering",
                                                                     "[   1.5s] e: process STARTING, health - | x"]


def test_a_terminal_gets_the_live_table(healthy: Stack) -> None:
    if not healthy.supervised.running():
        healthy.supervised.start()
    primary, secondary = pty.openpty()
    # The terminal is read while the command runs: a live table redraws often, and a pty's buffer
    # that nobody drains would block the command's writes until it timed out.
    proc = subprocess.Popen([PY, "-m", "router.status", "--config", str(healthy.config), "--out", str(healthy.out),
                             "--wait", "--timeout", "60"], stdout=secondary, stderr=secondary,
                            env={**os.environ, "COLUMNS": "150", "TERM": "xterm"})
    os.close(secondary)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the command exited and closed its end
                break
            if not chunk:
                break
            out += chunk
        returncode = proc.wait(timeout=60)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = out.decode(errors="replace")
    assert returncode == 0, text
    # rich.live draws (and hides the cursor while it does), then the verdict.
    assert "\x1b[?25l" in text and "waiting for the engines" in text and "┃" in text and "alpha" in text
    assert "all 2 launched instances are healthy" in text


def test_a_sleeping_model_is_said_sleeping_once() -> None:
    """The router reports a model that is not awake by its state in three places (the model's
    sleep, each endpoint's status and residency); the table says it in the residency column only."""
    health = {"models": {
        "m/a": {"status": "healthy", "sleep": {"state": "awake"},
                "endpoints": [{"instance": "a", "status": "healthy", "residency": "awake", "outstanding": 0}]},
        "m/s": {"status": "sleeping", "sleep": {"state": "sleeping"},
                "endpoints": [{"instance": "s", "status": "sleeping", "residency": "sleeping", "outstanding": 0}]},
        "m/o": {"status": "stopped", "sleep": {"state": "stopped"}, "endpoints": [{"instance": "o", "status": "stopped"}]}}}
    views = router_views(health, {})
    assert views["o"].residency == "stopped"  # an endpoint without residency: the model's state
    snapshot = Snapshot(taken_at=160.0, supervisord=Source("s"), router=Source("r"),
                        rows=tuple(Row(n, f"m/{n}", True, None, views[n]) for n in ("a", "s", "o")))
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        console.print(status_table(snapshot))
    lines = captured.get().splitlines()
    header = next(ln for ln in lines if " instance " in ln)
    assert [h for h in header.split() if h in ("health", "sleep", "residency")] == ["health", "residency"]
    for name, words in (("a", ["healthy", "awake"]), ("s", ["-", "sleeping"]), ("o", ["-", "stopped"])):
        cells = [c.strip() for c in next(ln for ln in lines if f" m/{name} " in ln).split("│")]
        assert cells[4:6] == words, cells
        assert sum(c in ("sleeping", "stopped", "awake") for c in cells) == 1, cells
