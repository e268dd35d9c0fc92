"""How the benchmarks start a router: the simulated engines it fronts, its configuration (every
feature on), its command line, and the router of an earlier commit.

benchmarks/overhead.py and benchmarks/workers.py both measure the router of this tree against the
router of an earlier commit (``--old-router COMMIT``) in the same run, so that the load other work
puts on the machine falls on both alike. For the ratio to mean anything the two must run the same
configuration on the same engines and differ only in their code: hence one place that writes the
configuration and one that runs a tree's router.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "overhead-bench-key"
#: name -> simulator knobs; one router model per simulated engine.
SIMS = {
    "fast": ["--ttft-ms", "0", "--itl-ms", "0"],
    "stream": ["--ttft-ms", "20", "--itl-ms", "20"],
    "idle": ["--ttft-ms", "0", "--itl-ms", "3000"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(port: int, engine_ports: dict[str, int], workers: int = 1, limit: int = 0) -> str:
    """The router's YAML: one model per simulated engine and every feature on (access log, health
    checks, API key, the sleep manager's idle loop with a threshold no phase reaches; metrics and
    traffic stats are always on). A `limit` gives every instance that max_concurrency and max_queue:
    even one never reached makes proxy workers lease each slot from the controller."""
    cap = f"max_concurrency: {limit}, max_queue: {limit}, " if limit else ""
    instances = "\n".join(f"  - {{name: {n}, model: {n}, engine: vllm, launch: false, "
                          f"engine_env: ['VLLM_SERVER_DEV_MODE=1'], {cap}engine_args: ['--port {p} --enable-sleep-mode']}}"
                          for n, p in engine_ports.items())
    # `workers` only where it is not the default, so that commits from before the setting read it too.
    processes = f"  workers: {workers}\n" if workers != 1 else ""
    return (f"router:\n  router_port: {port}\n{processes}  access_log: true\n  api_keys: [{API_KEY}]\n"
            f"  health_check_interval_seconds: 5\n"
            f"sleep_manager:\n  auto_sleep_enabled: true\n  idle_threshold_seconds: 3600\n"
            f"  check_interval_seconds: 5\ninstances:\n{instances}\n")


class CheckoutFailed(Exception):
    """`git archive` could not give the commit's router/ (unknown commit, not a git checkout)."""


def checkout(commit: str, into: Path) -> Path:
    """The commit's router/ extracted into `into` (created), through ``git archive``: a tree to run
    with `router_argv`, whatever the working tree holds."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "router"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        raise CheckoutFailed((e.stderr or b"").decode(errors="replace").strip()) from None
    return into


def router_argv(tree: Path, config: Path, server: str = "fast") -> list[str]:
    """The command that serves `config` with the router found in `tree` (ROOT or a `checkout`).

    This tree: `python -m router.serve` on router/server/http/fastserver.py's protocol ("fast") or
    on uvicorn's own ("uvicorn", through benchmarks/serve_uvicorn.py). An earlier commit with
    router/server/fastserver.py ran router.serve on it through that module's main (router.serve
    itself chose uvicorn's protocol at some of those commits); later ones serve on it from router.serve."""
    if tree == ROOT:
        entry = ["-m", "router.serve"] if server == "fast" else [str(ROOT / "benchmarks" / "serve_uvicorn.py")]
    else:
        fast = (tree / "router/server/fastserver.py").exists()
        entry = ["-m", "router.server.fastserver" if fast and server == "fast" else "router.serve"]
    return [sys.executable, *entry, "--config", str(config)]


def start_router(tree: Path, argv: list[str], log: Path) -> subprocess.Popen:
    """Run `argv` in `tree` with only `tree` on PYTHONPATH, in its own process group: `router` then
    imports from that tree, not from an installed copy (an editable install points elsewhere), and
    its proxy workers (spawned, they import afresh) do too."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tree, env=env)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, last started first; SIGKILL any still there after 15 s."""
    for p in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, children not included (psutil reads /proc/<pid>/stat)."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)
