"""What proxy workers cost: ``python benchmarks/workers.py [--workers N] [--quick] [--max-concurrency N]
[--old-router COMMIT]``.

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

``--old-router COMMIT`` also runs the router of COMMIT (its router/ from ``git
archive``, as benchmarks/overhead.py does) in both modes on the same engines,
in the same alternating phases (four routers, the order reversed every other
round), and prints this tree's CPU per request and per chunk over that commit's,
for one process and for N workers (workers + controller): a ratio above 1 is
this tree costing more. The machine's other load falls on all four alike, which
is why the comparison is made within one run and not between two runs.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from overhead import phase, relayed_chunks, wait_ready  # noqa: E402
from routers import API_KEY, SIMS, CheckoutFailed, checkout, config_text, cpu_seconds, free_port, router_argv, start_router, stop_processes  # noqa: E402

from router.bench.loadgen import Recorder, Span, Target, Workload, new_session  # noqa: E402


@dataclass
class Router:
    """One router under measure: one process, or a controller and its proxy workers."""

    process: psutil.Process
    workers: int
    url: str

    def proxy_workers(self) -> list[psutil.Process]:
        """The proxy workers: the controller's children that serve (not multiprocessing's resource tracker)."""
        if self.workers == 1:
            return []
        return sorted((c for c in self.process.children() if "spawn_main" in " ".join(c.cmdline())),
                      key=lambda c: c.pid)

    def sample(self) -> dict[str, float]:
        """CPU seconds so far: "controller" (the one process, or the controller) and each "workerI"."""
        out = {"controller": cpu_seconds(self.process.pid)}
        for i, w in enumerate(self.proxy_workers()):
            out[f"worker{i}"] = cpu_seconds(w.pid)
        return out


#: the routers by name: this tree's and, with --old-router, the commit's, each as one process and with workers
NAMES = ("single", "workers", "old single", "old workers")


@contextlib.contextmanager
def routers(tmp: Path, workers: int, limit: int = 0, old: Optional[Path] = None) -> Iterator[tuple[dict[str, Router],
                                                                                                  dict[str, str]]]:
    """The routers (this tree's, and `old`'s when given, each with 1 and `workers` processes) on the
    same simulated engines; yields them by name and the engines' URLs."""
    ports = {name: free_port() for name in SIMS}
    procs: list[subprocess.Popen] = []
    out: dict[str, Router] = {}
    trees = {"": ROOT, **({"old ": old} if old is not None else {})}
    try:
        for prefix, tree in trees.items():
            for mode, n in (("single", 1), ("workers", workers)):
                name, port = prefix + mode, free_port()
                config = tmp / f"{name.replace(' ', '-')}.yaml"
                config.write_text(config_text(port, ports, n, limit))
                procs.append(start_router(tree, router_argv(tree, config), tmp / f"{name.replace(' ', '-')}.log"))
                out[name] = Router(psutil.Process(procs[-1].pid), n, f"http://127.0.0.1:{port}")
        for sim, port in ports.items():
            with open(tmp / f"sim-{sim}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "router.sim", "--engine", "vllm", "--model", sim,
                                               "--port", str(port), *SIMS[sim]], stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, cwd=ROOT))
        yield out, {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    finally:
        stop_processes(procs)


Row = tuple[str, float, str]


def mode_rows(label: str, unit: str, workers: int, cpu_used: dict[str, dict[str, float]], done: dict[str, int],
              prefix: str) -> tuple[list[Row], dict[str, float]]:
    """The rows of one tree (prefix "" or "old "): one process against N workers; and its CPU per unit
    ("single", "workers": workers + controller) for the ratios between trees."""
    single_used, with_workers = cpu_used[prefix + "single"], cpu_used[prefix + "workers"]
    single = single_used["controller"] / done[prefix + "single"] * 1e6
    worker_keys = sorted(k for k in with_workers if k.startswith("worker"))
    in_workers = sum(with_workers[k] for k in worker_keys) / done[prefix + "workers"] * 1e6
    controller = with_workers["controller"] / done[prefix + "workers"] * 1e6
    rows: list[Row] = [
        (f"{label}{unit}s relayed: one process / {workers} workers", done[prefix + "single"],
         f"/ {done[prefix + 'workers']}"),
        (f"{label}one-process router: CPU per {unit}", single, "us"),
        (f"{label}{workers} workers: worker CPU per {unit} (all workers)", in_workers, "us"),
        (f"{label}{workers} workers: controller CPU per {unit}", controller, "us"),
        (f"{label}{workers} workers: (workers + controller) / one process, per {unit}",
         (in_workers + controller) / single, "x"),
        (f"{label}{workers} workers: controller / one process, per {unit}", controller / single, "x")]
    total = sum(with_workers[k] for k in worker_keys)
    for k in worker_keys:
        rows.append((f"{label}{workers} workers: {k}'s share of worker CPU ({unit}s)",
                     with_workers[k] / total * 100, "%"))
    return rows, {"single": single, "workers": in_workers + controller, "controller": controller}


async def measure(rt: dict[str, Router], sims: dict[str, str], quick: bool, workers: int,
                  old: Optional[str] = None) -> list[Row]:
    rows: list[Row] = []
    scale = 0.5 if quick else 1.0
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with new_session(120.0) as session:
        await wait_ready(session, [r.url + "/health" for r in rt.values()] + [u + "/health" for u in sims.values()])
        deadline = time.monotonic() + 30
        while any(len(r.proxy_workers()) < r.workers for r in rt.values() if r.workers > 1) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cases: list[tuple[str, str, Workload, Callable[[Recorder], int]]] = [
            ("request", "fast", Workload(stream=False, input_len=Span(32, 32), output_len=Span(16, 16),
                                         concurrency=64, duration=4.0 * scale), lambda rec: rec.ok),
            ("chunk", "stream", Workload(stream=True, input_len=Span(32, 32), output_len=Span(50, 50),
                                         concurrency=500, duration=4.0 * scale), relayed_chunks)]
        order = tuple(name for name in NAMES if name in rt)
        for unit, model, work, count in cases:
            cpu_used: dict[str, dict[str, float]] = {name: {} for name in order}
            done = dict.fromkeys(order, 0)
            for n in range(4):  # alternating, every other round reversed
                for via in order if n % 2 == 0 else order[::-1]:
                    before = rt[via].sample()
                    rec = await phase(session, Target(model, ((rt[via].url, model),), headers), work)
                    after = rt[via].sample()
                    done[via] += count(rec)
                    for k, t in after.items():
                        cpu_used[via][k] = cpu_used[via].get(k, 0.0) + t - before.get(k, t)
            new_rows, new = mode_rows("", unit, workers, cpu_used, done, "")
            rows += new_rows
            if old is None:
                continue
            old_rows, was = mode_rows(f"[{old}] ", unit, workers, cpu_used, done, "old ")
            rows += old_rows
            rows.append((f"this tree / {old}: one process, CPU per {unit}", new["single"] / was["single"], "x"))
            rows.append((f"this tree / {old}: {workers} workers (workers + controller), CPU per {unit}",
                         new["workers"] / was["workers"], "x"))
            rows.append((f"this tree / {old}: {workers} workers, controller CPU per {unit}",
                         new["controller"] / was["controller"], "x"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/workers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="proxy workers of the second router (default 2)")
    p.add_argument("--quick", action="store_true", help="half-length phases")
    p.add_argument("--max-concurrency", type=int, default=0,
                   help="give every instance this max_concurrency (and max_queue): the workers then lease each "
                        "slot from the controller; above the load's concurrency (500) it never binds")
    p.add_argument("--old-router", metavar="COMMIT",
                   help="also measure the router of COMMIT (its router/ from git archive), one process and with "
                        "workers, in the same phases, and print this tree's CPU per request and per chunk over its")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvr-workers-") as d:
        old = None
        if args.old_router:
            try:
                old = checkout(args.old_router, Path(d) / "old")
            except CheckoutFailed as e:
                p.error(f"--old-router {args.old_router}: {e}")
        load0 = os.getloadavg()[0]
        with routers(Path(d), args.workers, args.max_concurrency, old) as (rt, sims):
            rows = uvloop.run(measure(rt, sims, args.quick, args.workers, args.old_router))
    print(f"proxy workers: CPU per unit of work, {os.cpu_count()} cores, load average before/after "
          f"{load0:.2f}/{os.getloadavg()[0]:.2f}")
    for label, value, unit in rows:
        print(f"{label:<92} {value:>12,.2f} {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
