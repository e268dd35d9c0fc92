"""What proxy workers cost: ``python benchmarks/workers.py [--workers N] [--quick] [--max-concurrency N]``.

Runs the router twice side by side on the same simulated engines: one process
(``router.workers: 1``) and a controller with N proxy workers (``router.workers:
N``), every feature on as in benchmarks/overhead.py. Both are loaded in
alternating phases (64 non-streaming requests at a time, then 500 streams),
and CPU is read from /proc for every process: the one-process router, the
controller, and the workers together. These 2-core machines cannot show
wall-clock scaling, so the figures are CPU per unit of work:

- CPU per request and per relayed chunk in the workers, against the one-process router's;
- each worker's share of the workers' CPU (the kernel spreads connections
  over them; with an even share, each worker costs the figure above per unit);
- the controller's CPU per request and per chunk: what the workers' reports
  (counts, records) cost the owner. It must stay small.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead import API_KEY, SIMS, free_port, phase, relayed_chunks, stop_processes, wait_ready  # noqa: E402

from router.bench.loadgen import Span, Target, Workload, new_session  # noqa: E402


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


class Routers:
    """The one-process router and the controller with its workers, on the same engines."""

    def __init__(self, single: psutil.Process, controller: psutil.Process, urls: dict[str, str], sims: dict[str, str]):
        self.single = single
        self.controller = controller
        self.urls = urls
        self.sims = sims

    def workers(self) -> list[psutil.Process]:
        """The proxy workers: the controller's children that serve (not multiprocessing's resource tracker)."""
        return [c for c in self.controller.children() if "spawn_main" in " ".join(c.cmdline())]

    def sample(self) -> dict[str, float]:
        out = {"single": cpu(self.single), "controller": cpu(self.controller)}
        for i, w in enumerate(sorted(self.workers(), key=lambda p: p.pid)):
            out[f"worker{i}"] = cpu(w)
        return out


@contextlib.contextmanager
def routers(tmp: Path, workers: int, limit: int = 0) -> Iterator[Routers]:
    ports = {name: free_port() for name in SIMS}
    # A limit, even one never reached, makes the workers lease every slot from the controller.
    cap = f"max_concurrency: {limit}, max_queue: {limit}, " if limit else ""
    instances = "\n".join(f"  - {{name: {n}, model: {n}, engine: vllm, launch: false, engine_env: ['VLLM_SERVER_DEV_MODE=1'], "
                          f"{cap}engine_args: ['--port {p} --enable-sleep-mode']}}" for n, p in ports.items())
    procs: list[subprocess.Popen] = []
    urls = {}
    try:
        for name, n in (("single", 1), ("workers", workers)):
            port = free_port()
            config = tmp / f"{name}.yaml"
            config.write_text(f"router:\n  router_port: {port}\n  workers: {n}\n  access_log: true\n"
                              f"  api_keys: [{API_KEY}]\n  health_check_interval_seconds: 5\n"
                              f"sleep_manager:\n  auto_sleep_enabled: true\n  idle_threshold_seconds: 3600\n"
                              f"  check_interval_seconds: 5\ninstances:\n{instances}\n")
            with open(tmp / f"{name}.log", "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "router.serve", "--config", str(config)],
                                              stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT))
            urls[name] = f"http://127.0.0.1:{port}"
        for n, p in ports.items():
            with open(tmp / f"sim-{n}.log", "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "router.sim", "--engine", "vllm", "--model", n,
                                               "--port", str(p), *SIMS[n]], stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True, cwd=ROOT))
        yield Routers(psutil.Process(procs[0].pid), psutil.Process(procs[1].pid), urls,
                      {n: f"http://127.0.0.1:{p}" for n, p in ports.items()})
    finally:
        stop_processes(procs)


async def measure(rt: Routers, quick: bool, workers: int) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    scale = 0.5 if quick else 1.0
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with new_session(120.0) as session:
        await wait_ready(session, [u + "/health" for u in rt.urls.values()] + [u + "/health" for u in rt.sims.values()])
        deadline = time.monotonic() + 30
        while len(rt.workers()) < workers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cases = [("request", "fast", Workload(stream=False, input_len=Span(32, 32), output_len=Span(16, 16),
                                              concurrency=64, duration=4.0 * scale), lambda rec: rec.ok),
                 ("chunk", "stream", Workload(stream=True, input_len=Span(32, 32), output_len=Span(50, 50),
                                              concurrency=500, duration=4.0 * scale), relayed_chunks)]
        for unit, model, work, count in cases:
            cpu_used: dict[str, float] = {}
            done = {"single": 0, "workers": 0}
            for n in range(4):  # alternating, every other round reversed
                for via in ("single", "workers") if n % 2 == 0 else ("workers", "single"):
                    before = rt.sample()
                    rec = await phase(session, Target(model, ((rt.urls[via], model),), headers), work)
                    after = rt.sample()
                    done[via] += count(rec)
                    keys = ["single"] if via == "single" else [k for k in after if k != "single"]
                    for k in keys:
                        cpu_used[k] = cpu_used.get(k, 0.0) + after[k] - before.get(k, after[k])
            worker_keys = sorted(k for k in cpu_used if k.startswith("worker"))
            single = cpu_used["single"] / done["single"] * 1e6
            in_workers = sum(cpu_used[k] for k in worker_keys) / done["workers"] * 1e6
            controller = cpu_used["controller"] / done["workers"] * 1e6
            rows.append((f"{unit}s relayed: one process / {workers} workers", done["single"], f"/ {done['workers']}"))
            rows.append((f"one-process router: CPU per {unit}", single, "us"))
            rows.append((f"{workers} workers: worker CPU per {unit} (all workers)", in_workers, "us"))
            rows.append((f"{workers} workers: controller CPU per {unit}", controller, "us"))
            rows.append((f"{workers} workers: (workers + controller) / one process, per {unit}",
                         (in_workers + controller) / single, "x"))
            rows.append((f"{workers} workers: controller / one process, per {unit}", controller / single, "x"))
            total = sum(cpu_used[k] for k in worker_keys)
            for k in worker_keys:
                rows.append((f"{workers} workers: {k}'s share of worker CPU ({unit}s)", cpu_used[k] / total * 100, "%"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/workers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="proxy workers of the second router (default 2)")
    p.add_argument("--quick", action="store_true", help="half-length phases")
    p.add_argument("--max-concurrency", type=int, default=0,
                   help="give every instance this max_concurrency (and max_queue): the workers then lease each "
                        "slot from the controller; above the load's concurrency (500) it never binds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvr-workers-") as d, \
            routers(Path(d), args.workers, args.max_concurrency) as rt:
        rows = uvloop.run(measure(rt, args.quick, args.workers))
    print(f"proxy workers: CPU per unit of work, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    for label, value, unit in rows:
        print(f"{label:<92} {value:>12,.2f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
