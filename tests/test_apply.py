"""``render --apply``: a running stack takes a new rendering, changing only what changed.

The stack here is started the way the README's Quick start does (daemonized
supervisord, ``-c`` relative to the working folder), which is also what broke
``supervisorctl update`` while supervisord.conf had a ``directory=``.
"""
from __future__ import annotations

import http.server
import json
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from helpers import distinct_ports, post_json, short_tmp, wait_http  # noqa: F401  (fixture)
from supervised import PY, Supervised, render_cli

from router.config import parse_config
from router.render import render_files
from router.render.apply import SCRIPT_CHANGED, make_plan, reload_router, router_step
from router.render.files import started_copy

pytestmark = pytest.mark.timeout(180)


def engine(name: str, port: int, *sim_args: str) -> dict:
    return {"name": name, "model": f"org/{name}", "engine": "vllm", "engine_args": [f"--port={port}"], "sim_args": list(sim_args)}


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def rendered_files(out: Path) -> dict[str, tuple[bytes, int]]:
    """The rendered files' bytes and mtimes: a dry run must leave both alone."""
    paths = [out / "supervisord.conf", out / "tmux-launch.sh", out / "tmux-logs.sh", *(out / "engines").glob("*.sh")]
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@pytest.fixture
def tmp(short_tmp: str) -> Path:
    return Path(short_tmp)


def test_apply_changes_only_what_changed_on_a_stack_started_with_a_relative_path(tmp: Path) -> None:
    router_port, a, b, c = distinct_ports(4)
    router = {"router_port": router_port, "shutdown_grace_seconds": 1, "health_check_interval_seconds": 1}
    cfg = write(tmp / "config.yaml", {"router": router, "instances": [engine("a", a), engine("b", b)]})
    stack = Supervised(tmp / "out", tmp / "tmux")
    env = stack.env
    try:
        assert render_cli(cfg, "out", "--sim", cwd=tmp, env=env).returncode == 0
        stack.start(daemon_from=tmp)
        stack.wait_running(["a", "b", "router", "logs"])
        # supervisord kept its working folder, so the relative -c still names the file
        relative = subprocess.run([PY, "-m", "supervisor.supervisorctl", "-c", "out/supervisord.conf", "update"],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=30)
        assert relative.returncode == 0, relative.stdout + relative.stderr
        assert "CANT_REREAD" not in relative.stdout + relative.stderr
        pids = {n: stack.pid(n) for n in ("a", "b", "router", "logs")}

        write(cfg, {"router": router, "instances": [engine("a", a, "--ttft-ms", "5"), engine("c", c)]})
        before = rendered_files(tmp / "out")
        dry = render_cli(cfg, "out", "--sim", "--apply", "--dry-run", cwd=tmp, env=env)
        assert dry.returncode == 0, dry.stderr
        assert "Files that would change: added engines/c.sh; changed engines/a.sh, supervisord.conf, tmux-launch.sh, tmux-logs.sh; removed engines/b.sh" in dry.stdout
        assert "  start:   c\n" in dry.stdout
        assert "  restart: a (its launch script changed), logs (its launch script changed)\n" in dry.stdout
        assert "  stop:    b\n" in dry.stdout
        assert "  keep:    router\n" in dry.stdout
        assert f"router: reload with POST http://127.0.0.1:{router_port}/action/reload" in dry.stdout
        assert rendered_files(tmp / "out") == before and not (tmp / "out" / "engines" / "c.sh").exists()
        assert {n: stack.pid(n) for n in pids} == pids

        done = render_cli(cfg, "out", "--sim", "--apply", cwd=tmp, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "  stopped and removed b\n" in done.stdout and "  started c\n" in done.stdout
        stack.wait_running(["a", "c", "router", "logs"])
        assert stack.pid("router") == pids["router"]  # reloaded, not restarted
        # ...and serving the new table: c answers, b is gone.
        assert post_json(f"http://127.0.0.1:{router_port}/v1/completions", {"model": "org/c", "prompt": "x"})[0] == 200
        assert post_json(f"http://127.0.0.1:{router_port}/v1/completions", {"model": "org/b", "prompt": "x"})[0] == 404
        assert stack.pid("a") != pids["a"] and stack.pid("logs") != pids["logs"]
        wait_http(f"http://127.0.0.1:{c}/health", timeout=20)
        assert (tmp / "out" / "run" / "a.script").read_text() == (tmp / "out" / "engines" / "a.sh").read_text()

        pids = {n: stack.pid(n) for n in ("a", "c", "router", "logs")}
        again = render_cli(cfg, "out", "--sim", "--apply", cwd=tmp, env=env)
        assert "Files: unchanged" in again.stdout and "  nothing to change\n" in again.stdout, again.stdout
        assert "  keep:    a, c, router, logs\n" in again.stdout
        assert {n: stack.pid(n) for n in pids} == pids
    finally:
        stack.close()


@pytest.mark.slow  # a second whole stack to apply to; test_apply's first test keeps apply in the fast suite
def test_apply_keeps_the_mode_the_running_stack_was_rendered_with(tmp: Path) -> None:
    """A --sim stack applied without --sim (or from another YAML) is refused before anything is
    written; the command printed after rendering, flags included, is the one that applies. An
    on-demand engine it adds is said to be left stopped, and is."""
    router_port, a, b = distinct_ports(3)
    router = {"router_port": router_port, "shutdown_grace_seconds": 1, "health_check_interval_seconds": 1}
    cfg = write(tmp / "config.yaml", {"router": router, "instances": [engine("a", a)]})
    stack = Supervised(tmp / "out", tmp / "tmux")
    try:
        first = render_cli(cfg, "out", "--sim", cwd=tmp, env=stack.env)
        assert first.returncode == 0, first.stderr
        assert json.loads((tmp / "out" / "rendered.json").read_text()) == {
            "config": str(cfg), "sim": True, "target": "supervisord", "node": None}
        hint = [ln.strip() for ln in first.stdout.splitlines() if ln.strip().endswith("--apply")]
        assert hint == [f"python -m router.render --config {cfg} --out {tmp / 'out'} --sim --apply"], first.stdout
        stack.start()
        stack.wait_running(["a", "router", "logs"])
        pids = {n: stack.pid(n) for n in ("a", "router", "logs")}

        write(cfg, {"router": router, "instances": [engine("a", a), {**engine("b", b), "on_demand": True}]})
        before = rendered_files(tmp / "out")
        for flags in (["--apply"], ["--apply", "--dry-run"]):
            real = render_cli(cfg, "out", *flags, cwd=tmp, env=stack.env)
            assert real.returncode == 2, real.stdout + real.stderr
            assert "it was rendered with --sim (simulated engines), this run has no --sim" in real.stderr
            assert "nothing was written, started or stopped" in real.stderr
            assert f"python -m router.render --config {cfg} --out {tmp / 'out'} --sim {' '.join(flags)}\n" in real.stderr
            assert "Plan" not in real.stdout
        other = write(tmp / "other.yaml", json.loads(cfg.read_text()))
        elsewhere = render_cli(other, "out", "--sim", "--apply", cwd=tmp, env=stack.env)
        assert elsewhere.returncode == 2 and f"it was rendered from --config {cfg}, this run reads {other}" in elsewhere.stderr
        assert rendered_files(tmp / "out") == before and not (tmp / "out" / "engines" / "b.sh").exists()
        assert {n: stack.pid(n) for n in pids} == pids
        assert " -m router.sim " in (tmp / "out" / "engines" / "a.sh").read_text()

        argv = hint[0].split()
        done = subprocess.run([PY, *argv[1:]], cwd=tmp, env=stack.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "  add:     b (on demand: left stopped until its first request)\n" in done.stdout
        assert "  added b (on demand: left stopped until its first request)\n" in done.stdout
        assert "started b" not in done.stdout
        states = stack.status()
        assert (states["a"], states["b"], states["router"]) == ("RUNNING", "STOPPED", "RUNNING"), states
        assert (stack.pid("a"), stack.pid("router")) == (pids["a"], pids["router"])  # logs restarts: its script changed
    finally:
        stack.close()


def test_apply_without_a_running_supervisord_renders_then_exits_1(tmp: Path) -> None:
    (port,) = distinct_ports(1)
    cfg = write(tmp / "config.yaml", {"router": {"enable_router": False}, "instances": [engine("a", port)]})
    done = render_cli(cfg, tmp / "out", "--sim", "--apply", cwd=tmp)
    assert done.returncode == 1
    assert f"error: no supervisord is running for {tmp / 'out'}" in done.stderr and "Traceback" not in done.stderr
    assert (tmp / "out" / "engines" / "a.sh").is_file()
    dry = render_cli(cfg, tmp / "out2", "--sim", "--apply", "--dry-run", cwd=tmp)
    assert dry.returncode == 1 and "no supervisord is running" in dry.stderr
    assert not (tmp / "out2").exists()


def test_dry_run_goes_with_apply(tmp: Path) -> None:
    done = render_cli(tmp / "none.yaml", tmp / "out", "--dry-run", cwd=tmp)
    assert done.returncode == 2 and "--dry-run goes with --apply" in done.stderr


def test_plan_compares_with_what_each_program_started_from(tmp: Path) -> None:
    """Files rendered earlier without --apply already equal the new ones; the programs
    still run their old scripts, and those are what count. One stopped on purpose stays so."""
    out = tmp / "out"
    doc = {"router": {"enable_router": False}, "instances": [engine("a", 9001), engine("b", 9002)]}
    old = render_files(parse_config(json.dumps(doc)), out, sim=True)
    doc["instances"] = [engine("a", 9001, "--ttft-ms", "5"), engine("b", 9002, "--ttft-ms", "5")]
    new = render_files(parse_config(json.dumps(doc)), out, sim=True)
    (out / "run").mkdir(parents=True)
    for name in ("a", "b"):
        started_copy(out, name).write_text(old[f"engines/{name}.sh"][0])
    on_disk = {rel: text for rel, (text, _) in new.items()}
    plan = make_plan(out, on_disk, new, {"a": "RUNNING", "b": "STOPPED", "logs": "RUNNING", "gone": "FATAL"})
    assert plan.restart == {"a": SCRIPT_CHANGED}
    assert (plan.start, plan.stop, plan.keep) == ([], ["gone"], ["b", "logs"])


# -- the router's reload, against a stand-in router ---------------------------

class StubRouter(http.server.BaseHTTPRequestHandler):
    """Answers POST /action/reload with the server's `answer` (status, JSON) and records headers."""

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        self.server.seen.append((self.path, self.headers.get("Authorization")))  # type: ignore[attr-defined]
        status, body = self.server.answer  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), StubRouter)
    server.seen, server.answer = [], (200, {})  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def config_for(port: int, **router: object) -> object:
    doc = {"router": {"router_port": port, **router}, "instances": [engine("a", port + 1 if port < 65535 else 1)]}
    return parse_config(json.dumps(doc))


def test_reload_reports_the_models_and_sends_the_admin_key(stub: http.server.HTTPServer) -> None:
    stub.answer = (200, {"changed": True, "models": {"added": ["org/c"], "removed": ["org/b"], "changed": []}})  # type: ignore[attr-defined]
    ok, message = reload_router(config_for(stub.server_port, admin_api_key="s3cret"))
    assert ok and message == "router: reloaded; models added org/c; removed org/b"
    assert stub.seen == [("/action/reload", "Bearer s3cret")]  # type: ignore[attr-defined]
    stub.answer = (200, {"changed": False, "models": {"added": [], "removed": [], "changed": []}})  # type: ignore[attr-defined]
    assert reload_router(config_for(stub.server_port)) == (True, "router: reloaded, no model changed")
    assert stub.seen[-1] == ("/action/reload", None)  # type: ignore[attr-defined]  # loopback needs no key


def test_a_refused_reload_prints_the_routers_message(stub: http.server.HTTPServer) -> None:
    stub.answer = (400, {"error": {"message": "instances[0].engine: unknown engine 'tgi'"}})  # type: ignore[attr-defined]
    assert reload_router(config_for(stub.server_port)) == (False, "router: reload failed (400): instances[0].engine: unknown engine 'tgi'")


def test_a_router_that_is_down_or_disabled_is_no_failure() -> None:
    (port,) = distinct_ports(1)
    ok, message = reload_router(config_for(port))
    assert ok and message.startswith(f"router: not reachable at http://127.0.0.1:{port}/action/reload")
    assert router_step(config_for(port, enable_router=False), set(), dry_run=False) == (True, "router: disabled in the config; nothing to reload")
    assert router_step(config_for(port), {"router"}, dry_run=False) == (True, "router: (re)started, so it reads the new config")
