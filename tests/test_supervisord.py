"""The rendered files run for real: supervisord keeps simulated engines and the
router alive, tmux shows their logs, and nothing outlives a shutdown."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from helpers import PY, distinct_ports, http_status, render, short_tmp, wait_for, wait_http  # noqa: F401  (fixture)
from supervised import Supervised, alive, render_cli

from router.supervision.supervisord import SOCKET_NAME, connect

pytestmark = pytest.mark.timeout(120)


def sim_config(router_port: int, a: int, b: int) -> dict:
    return {
        "router": {"router_port": router_port, "shutdown_grace_seconds": 1, "health_check_interval_seconds": 1},
        "launch_delay_seconds": 0.2,
        "instances": [
            {"name": "a", "model": "org/model-a", "engine": "vllm", "engine_args": [f"--port={a}"]},
            {"name": "b", "model": "org/model-b", "engine": "sglang", "engine_args": ["--host", "127.0.0.1", "--port", str(b)]},
        ],
    }


@contextlib.contextmanager
def running_sim_stack() -> Iterator[tuple[Supervised, list[int]]]:
    """Two simulated engines and the router under a real supervisord; its ports (router, a, b)."""
    tmp = Path(tempfile.mkdtemp(prefix="kvr", dir="/tmp"))
    ports = distinct_ports(3)
    stack = Supervised(render(tmp, sim_config(*ports), "--sim"), tmp / "tmux")
    try:
        stack.start()
        stack.wait_running(["a", "b", "router", "logs"])
        yield stack, ports
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sim_stack() -> Iterator[tuple[Supervised, list[int]]]:
    """Shared by the tests that leave it as they found it (every program RUNNING)."""
    with running_sim_stack() as stack:
        yield stack


@pytest.fixture
def own_sim_stack() -> Iterator[tuple[Supervised, list[int]]]:
    with running_sim_stack() as stack:
        yield stack


def test_supervisord_runs_engines_and_router_and_restarts_a_killed_engine(sim_stack: tuple[Supervised, list[int]]) -> None:
    stack, (router_port, a, b) = sim_stack
    for port in (a, b):
        wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
    wait_http(f"http://127.0.0.1:{router_port}/health", timeout=20)
    assert (stack.out / "supervisor.sock").stat().st_mode & 0o777 == 0o700

    old = stack.pid("a")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: http_status(f"http://127.0.0.1:{a}/health") is None, 10, "the killed engine to stop answering")
    wait_for(lambda: stack.status().get("a") == "RUNNING" and stack.pid("a") != old, 20, "supervisord to restart engine a")
    wait_http(f"http://127.0.0.1:{a}/health", timeout=20)
    assert stack.status() == {"a": "RUNNING", "b": "RUNNING", "router": "RUNNING", "logs": "RUNNING"}


def test_tmux_sessions_follow_each_log_under_supervisord(sim_stack: tuple[Supervised, list[int]]) -> None:
    stack, _ = sim_stack
    sessions = {"kvcached-a": "simulated vllm engine", "kvcached-b": "simulated sglang engine", "kvcached-frontend": ""}

    def listed() -> bool:
        return set(stack.tmux("list-sessions", "-F", "#{session_name}").stdout.split()) == set(sessions)
    wait_for(listed, 15, f"tmux sessions {sorted(sessions)}")

    def shows(session: str, text: str) -> bool:
        pane = stack.tmux("capture-pane", "-p", "-S", "-", "-t", f"={session}:").stdout
        return bool(pane.strip()) and text in pane
    for session, text in sessions.items():
        wait_for(lambda session=session, text=text: shows(session, text), 15, f"log lines in tmux session {session}")

    # A session the user closes comes back.
    stack.tmux("kill-session", "-t", "=kvcached-a")
    wait_for(listed, 15, "kvcached-a to be reopened")


def test_shutdown_leaves_no_process_behind(own_sim_stack: tuple[Supervised, list[int]]) -> None:
    stack, ports = own_sim_stack
    wait_for(lambda: stack.tmux_server(), 15, "the tmux server of the logs program")
    before = stack.snapshot()
    assert len(before) >= 7  # supervisord, 2 engines, router, logs (bash + sleep), tmux server (+ tails)
    stack.shutdown()
    wait_for(lambda: not [p for p in before if alive(p)], 15, f"every process to exit: {[p for p in before if alive(p)]}")
    for port in ports:
        assert http_status(f"http://127.0.0.1:{port}/health") is None
    assert stack.tmux("list-sessions").returncode != 0  # the private tmux server is gone too


# An engine that starts a worker process, as vLLM and SGLang do; the worker
# outlives the engine unless supervisord stops the whole process group.
ENGINE_WITH_WORKER = f"""#!/usr/bin/env bash
sleep 1000 &
shift 2  # -m <engine module>; what follows is the engine's own flags
exec {PY} -m router.sim --engine vllm "$@"
"""


def test_stopping_an_engine_stops_its_workers_too(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(ENGINE_WITH_WORKER)
    (venv / "bin" / "python").chmod(0o700)
    (port,) = distinct_ports(1)
    out = render(tmp, {"router": {"enable_router": False}, "instances": [
        {"name": "w", "model": "m", "engine": "vllm", "using_venv": True, "venv_path": str(venv), "engine_args": [f"--port={port}"]},
    ]})
    stack = Supervised(out, tmp / "tmux")
    try:
        stack.start()
        stack.wait_running(["w", "logs"])
        wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
        engine = psutil.Process(stack.pid("w"))
        workers = engine.children()
        assert [w.name() for w in workers] == ["sleep"]
        assert "stopped" in stack.ctl("stop", "w").stdout
        wait_for(lambda: not alive(workers[0]) and not alive(engine), 10, "the engine and its worker to exit")
    finally:
        stack.close()


def test_tmux_launch_script_starts_lists_and_kills_exactly_its_sessions(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    router_port, a, b = distinct_ports(3)
    out = render(tmp, sim_config(router_port, a, b), "--sim")
    stack = Supervised(out, tmp / "tmux")  # only for its private tmux server; no supervisord here
    launch = str(out / "tmux-launch.sh")
    ours = ["kvcached-a", "kvcached-b", "kvcached-frontend"]
    try:
        stack.tmux("new-session", "-d", "-s", "kvcached-a-decoy", "sleep 60")  # shares a prefix; not ours
        started = subprocess.run([launch], env=stack.env, capture_output=True, text=True, timeout=30)
        assert started.returncode == 0, started.stderr
        assert started.stdout.splitlines() == [f"{s}: started (tmux attach -t {s})" for s in ours]
        for port in (a, b, router_port):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
        again = subprocess.run([launch, "start"], env=stack.env, capture_output=True, text=True, timeout=30)
        assert again.stdout.splitlines() == [f"{s}: already running" for s in ours]
        listed = subprocess.run([launch, "list"], env=stack.env, capture_output=True, text=True, timeout=30)
        assert listed.stdout.split() == ours
        pane = stack.tmux("capture-pane", "-p", "-S", "-", "-t", "=kvcached-a:").stdout
        assert "simulated vllm engine" in pane
        engines = [p for p in stack.snapshot() if "router.sim" in p.cmdline()]
        assert len(engines) == 2
        killed = subprocess.run([launch, "kill"], env=stack.env, capture_output=True, text=True, timeout=30)
        assert killed.stdout.splitlines() == [f"{s}: killed" for s in ours]
        assert stack.tmux("list-sessions", "-F", "#{session_name}").stdout.split() == ["kvcached-a-decoy"]
        wait_for(lambda: not any(alive(p) for p in engines), 10, "the engines in the killed sessions to exit")
        assert subprocess.run([launch, "bogus"], env=stack.env, capture_output=True, timeout=30).returncode == 2

        # A session of one of our names that this stack did not make is neither adopted nor killed.
        stack.tmux("new-session", "-d", "-s", "kvcached-b", "sleep 60")
        clash = subprocess.run([launch], env=stack.env, capture_output=True, text=True, timeout=30)
        assert clash.returncode == 1
        assert "kvcached-b: a session of this name belongs to another stack (none recorded); not started" in clash.stderr
        assert subprocess.run([launch, "list"], env=stack.env, capture_output=True, text=True, timeout=30).stdout.split() == ["kvcached-a", "kvcached-frontend"]
        subprocess.run([launch, "kill"], env=stack.env, capture_output=True, timeout=30)
        assert sorted(stack.tmux("list-sessions", "-F", "#{session_name}").stdout.split()) == ["kvcached-a-decoy", "kvcached-b"]
    finally:
        stack.close()


# A stand-in engine that notes each start, then crashes a second later.
CRASHING_ENGINE = """#!/usr/bin/env bash
date +%s.%N >> "$VIRTUAL_ENV/starts"
sleep 1
exit 1
"""


@pytest.mark.slow  # waits out three crash restarts
def test_launch_delay_is_waited_once_not_on_restarts_after_a_crash(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    venvs = []
    for name, body in (("idle", "#!/usr/bin/env bash\nexec sleep 1000\n"), ("crash", CRASHING_ENGINE)):
        (tmp / name / "bin").mkdir(parents=True)
        (tmp / name / "bin" / "python").write_text(body)
        (tmp / name / "bin" / "python").chmod(0o700)
        venvs.append(str(tmp / name))
    delay = 4
    out = render(tmp, {"router": {"enable_router": False}, "launch_delay_seconds": delay, "instances": [
        {"name": f"e{i}", "model": "m", "engine": "vllm", "using_venv": True, "venv_path": venv, "engine_args": [f"--port={9100 + i}"]}
        for i, venv in enumerate(venvs)
    ]})
    stack = Supervised(out, tmp / "tmux")
    starts = tmp / "crash" / "starts"
    try:
        t0 = time.time()
        stack.start()
        wait_for(lambda: starts.exists() and len(starts.read_text().split()) >= 3, 40, "engine e1 to be started three times")
        first, second, third = (float(t) for t in starts.read_text().split()[:3])
        assert first - t0 >= delay  # its first start waits its turn
        # restarts follow the crash (1 s) and supervisord's back-off (1 s, then 2 s), without the delay
        assert second - first < 1 + 1 + 1.5 and third - second < 1 + 2 + 1.5, (first - t0, second - first, third - second)
    finally:
        stack.close()


def prefixed_sim_config(prefix: str, ports: list[int]) -> dict:
    return {**sim_config(*ports), "tmux_session_prefix": prefix}


def sessions(stack: Supervised) -> dict[str, str]:
    """Every session on the stack's tmux server -> the stack folder it is tagged with."""
    listed = stack.tmux("list-sessions", "-F", "#{session_name}\t#{@kvrouter_stack}").stdout
    return dict(line.split("\t") for line in listed.splitlines())


@pytest.mark.slow  # two whole stacks
def test_two_stacks_share_a_tmux_server_and_never_touch_each_others_sessions(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    ports = distinct_ports(6)
    stacks: list[Supervised] = []
    try:
        for i, prefix in enumerate(("one-", "two.")):
            (tmp / prefix).mkdir()
            cfg = tmp / prefix / "config.yaml"
            cfg.write_text(json.dumps(prefixed_sim_config(prefix, ports[3 * i:3 * i + 3])))
            stack = Supervised(tmp / prefix / "out", tmp / "tmux")  # one tmux server for both
            done = render_cli(cfg, stack.out, "--sim", env=stack.env)
            assert done.returncode == 0, done.stderr
            stacks.append(stack)
        one, two = stacks
        # the user's own session with one of stack two's names: stack two must leave it alone
        two.tmux("new-session", "-d", "-s", "two_b", "sleep 600")
        for stack in stacks:
            stack.start()
        for stack in stacks:
            stack.wait_running(["a", "b", "router", "logs"])
        mine = {f"{p}{n}": str(s.out) for p, s in (("one-", one), ("two_", two)) for n in ("a", "b", "frontend")}
        expected = {**mine, "two_b": ""}
        wait_for(lambda: sessions(one) == expected, 15, f"sessions {expected} (now {sessions(one)})")
        assert "tmux session two_b belongs to another stack (none recorded); left alone" in two.log("logs")

        # a third stack using stack one's names is refused before anything is written
        (tmp / "three").mkdir()
        cfg = tmp / "three" / "config.yaml"
        cfg.write_text(json.dumps(prefixed_sim_config("one-", distinct_ports(3))))
        clash = render_cli(cfg, tmp / "three" / "out", "--sim", env=one.env)
        assert clash.returncode == 2, clash.stderr
        assert f"error: tmux session 'one-a' belongs to the stack in {one.out}; set a different top-level 'tmux_session_prefix' in {cfg}" in clash.stderr
        assert "Nothing was written." in clash.stderr and not (tmp / "three" / "out").exists()

        # stopping stack one closes its sessions only
        one.shutdown()
        rest = {k: v for k, v in expected.items() if not k.startswith("one-")}
        wait_for(lambda: sessions(two) == rest, 15, f"only {sorted(rest)} left (now {sessions(two)})")
        two.tmux("kill-session", "-t", "=two_b")  # now the name is free: stack two's logs program takes it
        wait_for(lambda: sessions(two).get("two_b") == str(two.out), 15, "stack two to open its own two_b session")
    finally:
        for stack in stacks:
            stack.close()


@pytest.mark.slow  # three 2 s loads one after another, then a restart: about 15 s
def test_launch_order_healthy_starts_engines_on_one_gpu_one_after_another(short_tmp: str) -> None:
    """Three simulated engines on GPU 0 that each take 2 s to listen: each starts once the one
    before it serves; one killed afterwards comes back at once, without waiting for the others."""
    tmp = Path(short_tmp)
    startup = 2.0
    ports = distinct_ports(3)
    names = [f"e{i}" for i in range(3)]
    out = render(tmp, {"router": {"enable_router": False}, "launch_order": "healthy", "instances": [
        {"name": name, "model": f"m{i}", "engine": "vllm", "engine_args": [f"--port={port}"], "sim_args": [f"--startup-s {startup:g}"]}
        for i, (name, port) in enumerate(zip(names, ports))
    ]}, "--sim")
    health = {name: f"http://127.0.0.1:{port}/health" for name, port in zip(names, ports)}
    stack = Supervised(out, tmp / "tmux")
    serving: dict[str, float] = {}

    def all_serving() -> bool:
        for name, url in health.items():
            if name not in serving and http_status(url, timeout=0.2) == 200:
                serving[name] = time.monotonic()
        return len(serving) == len(health)

    try:
        stack.start()
        wait_for(all_serving, 40, "every engine to serve", interval=0.05)
        # each engine loaded (2 s) only after the one before it served: not all at once
        assert serving["e1"] - serving["e0"] >= startup - 0.3, serving
        assert serving["e2"] - serving["e1"] >= startup - 0.3, serving
        assert "waiting for" not in stack.log("e0")
        assert "launch_order healthy: starting after" in stack.log("e1") and "(e0 healthy)" in stack.log("e1")
        assert "(e1 healthy)" in stack.log("e2")
        stack.wait_running(["logs", *names])

        # e0 is stopped (a wait on it would last STOPPED_FOR_SECONDS) and e1 dies: e1's restart does not wait
        stack.ctl("stop", "e0")
        logged = len((out / "logs" / "e1.log").read_text())
        supervisor = connect(out / SOCKET_NAME).supervisor
        old_pid = stack.pid("e1")
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        seen: dict[str, float] = {}

        def back_and_running() -> bool:  # when e1 serves again, and when supervisord says its new process RUNNING
            info = supervisor.getProcessInfo("e1")
            if "running" not in seen and info["pid"] not in (0, old_pid) and info["statename"] == "RUNNING":
                seen["running"] = time.monotonic() - killed
            if "back" not in seen and http_status(health["e1"], timeout=0.2) == 200:
                seen["back"] = time.monotonic() - killed
            return len(seen) == 2
        wait_for(back_and_running, 20, "e1 to serve and be RUNNING again", interval=0.05)
        back, running = seen["back"], seen["running"]
        assert "waiting for" not in (out / "logs" / "e1.log").read_text()[logged:]
        assert back < startup + 3, back  # its own load only: a wait would add STOPPED_FOR_SECONDS
        assert running < 2, running  # RUNNING after the engine's short startsecs, which holds no wait

        # e3, added to GPU 0 by --apply while supervisord is in its first minute, starts at once:
        # e0 is still stopped, so a turn-wait would show in its log and last STOPPED_FOR_SECONDS
        port = distinct_ports(1)[0]
        config = json.loads((tmp / "config.yaml").read_text())
        config["instances"].append({"name": "e3", "model": "m3", "engine": "vllm", "engine_args": [f"--port={port}"],
                                    "sim_args": [f"--startup-s {startup:g}"]})
        (tmp / "config.yaml").write_text(json.dumps(config))
        applied = render_cli(tmp / "config.yaml", out, "--sim", "--apply", env=stack.env)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        added = time.monotonic()
        wait_for(lambda: http_status(f"http://127.0.0.1:{port}/health", timeout=0.2) == 200, 20, "e3 to serve",
                 interval=0.05)
        assert time.monotonic() - added < startup + 2
        assert "waiting for" not in stack.log("e3")
    finally:
        stack.close()
