"""What the router costs on top of the engine, measured against the simulated engine.

Run from the project root: ``python benchmarks/overhead.py`` (about two
minutes on 2 cores). It starts three simulated vLLM engines (answering at
once, streaming at 20 ms per token, near-idle streams), the router with every
feature on (metrics, traffic stats, health checks, API key, sleep manager,
access log to a file) and a bare pass-through on uvicorn + aiohttp
(benchmarks/passthrough.py) as separate processes on free ports, and drives
them from this process with the project's load generator (router.loadgen).

Figures are CPU time of the router process per unit of work (from
/proc/<pid>/stat) and differences against going to the engine directly in
the same run: one request or stream at a time side by side with direct,
heavier loads in alternating phases, since wall-clock alone is too noisy on a
shared 2-core machine. Each figure is printed next to its target from issue 4
with PASS or MISS.

``--rust-router`` adds the Rust `vllm-router` (``pip install vllm-router``;
benchmarks/rust_router.py) routing to the same engines by model, measured in the
same alternating phases as the router at 64 requests and 500 streams, and prints
our figures as ratios against it (CPU per request and per chunk ours/Rust, req/s
ours/Rust) with their targets. ``--old-router COMMIT`` does the same for the
router of an earlier commit (its ``router/`` from ``git archive``), to tell what
the commits since cost per request. Neither changes anything without the flag.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import aiohttp
import psutil
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rust_router  # noqa: E402  (benchmarks/rust_router.py, next to this file)
from routers import API_KEY, SIMS, CheckoutFailed, checkout, config_text, cpu_seconds, free_port, router_argv, start_router, stop_processes  # noqa: E402

from router.bench.loadgen import Recorder, Span, Target, Workload, new_session, run_model  # noqa: E402
from router.bench.report import distribution_ms  # noqa: E402

# --------------------------------------------------------------------------
# Processes and their figures (psutil: it reads /proc/<pid>/stat, status and fd)

def kernel_seconds(pid: int) -> float:
    """System (kernel) CPU time of `pid`."""
    return float(psutil.Process(pid).cpu_times().system)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def open_fds(pid: int) -> int:
    return int(psutil.Process(pid).num_fds())


@dataclass
class Stack:
    router_pid: int
    baseline_pid: int
    urls: dict[str, str]
    sim_pids: dict[str, int]
    sim_urls: dict[str, str]
    #: yardsticks beyond the bare pass-through, by name ("rust": the Rust vllm-router, "old": the
    #: router of an earlier commit), each measured like the router in the alternating phases
    extra_pids: dict[str, int] = field(default_factory=dict)

    def target(self, model: str, via: str) -> Target:
        """`via` is "router", "baseline" (the bare pass-through), "direct" (the engine itself) or an extra."""
        headers = {"Authorization": f"Bearer {API_KEY}"} if via in ("router", "old") else {}
        return Target(model, ((self.sim_urls[model] if via == "direct" else self.urls[via], model),), headers)

    def pid(self, via: str) -> int:
        return self.router_pid if via == "router" else self.baseline_pid if via == "baseline" else self.extra_pids[via]


@contextlib.contextmanager
def stack(tmp: Path, rust: bool = False, old: Optional[Path] = None, server: str = "fast") -> Iterator[Stack]:
    """Simulated engines, the router and the bare pass-through, each in its own process group;
    with `rust` also the Rust vllm-router, with `old` also the router found in that directory."""
    ports = {name: free_port() for name in SIMS}
    router_port, baseline_port = free_port(), free_port()
    config = tmp / "overhead.yaml"
    config.write_text(config_text(router_port, ports))
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], log: str) -> subprocess.Popen:
        with open(tmp / log, "wb") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        procs.append(p)
        return p

    try:
        sims = {n: start([sys.executable, "-m", "router.sim", "--engine", "vllm", "--model", n, "--host", "127.0.0.1",
                          "--port", str(p), *SIMS[n]], f"sim-{n}.log") for n, p in ports.items()}
        router = start_router(ROOT, router_argv(ROOT, config, server), tmp / "router.log")
        procs.append(router)
        baseline = start([sys.executable, str(ROOT / "benchmarks" / "passthrough.py"), "--port", str(baseline_port),
                          *(f"--upstream={n}=http://127.0.0.1:{p}" for n, p in ports.items())], "passthrough.log")
        urls = {"router": f"http://127.0.0.1:{router_port}", "baseline": f"http://127.0.0.1:{baseline_port}"}
        extra: dict[str, int] = {}
        if rust:
            rust_port = free_port()
            extra["rust"] = start(rust_router.argv(rust_port, free_port()), "rust-router.log").pid
            urls["rust"] = f"http://127.0.0.1:{rust_port}"
        if old is not None:
            old_port = free_port()
            (tmp / "overhead-old.yaml").write_text(config_text(old_port, ports))
            procs.append(start_router(old, router_argv(old, tmp / "overhead-old.yaml", server), tmp / "old-router.log"))
            extra["old"] = procs[-1].pid
            urls["old"] = f"http://127.0.0.1:{old_port}"
        yield Stack(router.pid, baseline.pid, urls,
                    {n: s.pid for n, s in sims.items()}, {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}, extra)
    finally:
        stop_processes(procs)


@contextlib.contextmanager
def profiled(pid: int, fmt: str, out: Optional[Path]) -> Iterator[None]:
    """py-spy profile of `pid` while the block runs, in py-spy's format `fmt` (flamegraph: an SVG; raw:
    collapsed stacks, which benchmarks/profile_summary.py sums up); nothing when `out` is None."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--format", fmt,
                            "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


async def wait_ready(session: aiohttp.ClientSession, urls: list[str], timeout: float = 60.0,
                     raise_as: type[BaseException] = SystemExit) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise raise_as(f"{url} did not come up within {timeout:g}s; see the logs in the temp dir")
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------
# Measurement

@dataclass
class Sides:
    """Figures of one scenario from alternating phases: through the router, the bare pass-through, direct."""

    recs: dict[str, Recorder]
    #: CPU seconds of the proxy process during its own phases ("router", "baseline"), and of the
    #: engine and of this load generator while they served `shared`.
    cpu: dict[str, float]
    shared: tuple[str, ...] = ("router",)
    router_rss_mb: float = 0.0
    #: of `cpu`, the kernel's part, per proxy (filled in the alternating phases)
    kernel: dict[str, float] = field(default_factory=dict)


async def phase(session: aiohttp.ClientSession, target: Target, work: Workload) -> Recorder:
    rec = Recorder()
    await run_model(session, target, work, asyncio.Event(), rec)
    return rec


async def sides(session: aiohttp.ClientSession, st: Stack, model: str, work: Workload, rounds: int,
                baseline: bool, warmup: Optional[Workload] = None) -> Sides:
    order = ("router", "baseline", *st.extra_pids, "direct") if baseline else ("router", "direct")
    if warmup:
        for via in order:
            await phase(session, st.target(model, via), warmup)
    out = Sides({via: Recorder() for via in order},
                {"router": 0.0, "baseline": 0.0, **{x: 0.0 for x in st.extra_pids}, "engine": 0.0, "client": 0.0})
    for n in range(rounds):
        # Every other round in reverse, so no proxy always follows the same one (measured: the first
        # of a fixed order came out ~15% dearer than the same code measured fourth).
        for via in order if n % 2 == 0 else order[::-1]:
            proxy = cpu_seconds(st.pid(via)) if via != "direct" else 0.0
            kernel = kernel_seconds(st.pid(via)) if via != "direct" else 0.0
            engine, client = cpu_seconds(st.sim_pids[model]), time.process_time()
            out.recs[via].merge(await phase(session, st.target(model, via), work))
            if via != "direct":
                out.cpu[via] += cpu_seconds(st.pid(via)) - proxy
                out.kernel[via] = out.kernel.get(via, 0.0) + kernel_seconds(st.pid(via)) - kernel
            if via == "router":
                out.cpu["engine"] += cpu_seconds(st.sim_pids[model]) - engine
                out.cpu["client"] += time.process_time() - client
                out.router_rss_mb = max(out.router_rss_mb, rss_mb(st.router_pid))
    return out


async def paired(session: aiohttp.ClientSession, st: Stack, model: str, work: Workload) -> Sides:
    """Router, bare pass-through and direct loads at the same time, so all meet the same machine;
    for one request or stream at a time, where the figures are wall-clock differences and drift
    would swamp them. The pass-through's added time tells how much of the router's is the stack's
    (two more process wake-ups per exchange) rather than the router's own work."""
    order = ("router", "baseline", "direct")
    before = {via: cpu_seconds(st.pid(via)) for via in order if via != "direct"}
    engine, client = cpu_seconds(st.sim_pids[model]), time.process_time()
    recs = await asyncio.gather(*(phase(session, st.target(model, via), work) for via in order))
    cpu = {via: cpu_seconds(st.pid(via)) - t for via, t in before.items()}
    cpu.update(engine=cpu_seconds(st.sim_pids[model]) - engine, client=time.process_time() - client)
    return Sides(dict(zip(order, recs)), cpu, order, rss_mb(st.router_pid))


async def idle_streams(session: aiohttp.ClientSession, st: Stack, n: int) -> dict:
    """`n` streams open at once through the router; peak RSS and sockets sampled while they last."""
    work = Workload(stream=True, input_len=Span(8, 8), output_len=Span(3, 3), concurrency=n, duration=None,
                    requests=n, timeout=120.0)
    rec = Recorder()
    rss0 = rss_mb(st.router_pid)
    run = asyncio.ensure_future(run_model(session, st.target("idle", "router"), work, asyncio.Event(), rec))
    peak_rss = peak_fds = 0.0
    while not run.done():
        peak_rss = max(peak_rss, rss_mb(st.router_pid))
        peak_fds = max(peak_fds, open_fds(st.router_pid))
        await asyncio.sleep(0.25)
    await run
    return {"streams": n, "ok": rec.ok, "errors": sum(v for k, v in rec.failed.items() if k != "refused"),
            "refused": rec.failed.get("refused", 0), "failed_by_status": dict(rec.failed),
            "router_rss_before_mb": rss0, "router_rss_peak_mb": peak_rss, "router_open_fds_peak": peak_fds}


def _ms(rec: Recorder, attr: str, q: str) -> float:
    d = distribution_ms(getattr(rec, attr))
    return d[q] if d else float("nan")


def relayed_chunks(rec: Recorder) -> int:
    """SSE events the router relayed: every data chunk plus each stream's [DONE]."""
    return rec.chunks + rec.ok


def failures(s: Sides) -> int:
    return sum(sum(rec.failed.values()) for rec in s.recs.values())


# --------------------------------------------------------------------------
# Report

class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.figures: dict[str, float] = {}
        self.misses = 0

    def add(self, key: str, label: str, value: float, unit: str, target: Optional[tuple[str, float]] = None) -> None:
        self.figures[key] = value
        verdict = ""
        if target:
            op, limit = target
            ok = value == value and {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]
            verdict = f"{op} {limit:g} {unit}  {'PASS' if ok else 'MISS'}"
            self.misses += not ok
        text = f"{value:,.0f}" if value == int(value) and not unit else f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
        self.rows.append((label, text, unit, verdict))

    def section(self, title: str) -> None:
        self.rows.append((f"-- {title}", "", "", ""))

    def text(self) -> str:
        w = [max(len(r[i]) for r in self.rows) for i in range(3)]
        return "\n".join(f"{a.ljust(w[0])}  {b.rjust(w[1])} {c.ljust(w[2])}  {d}".rstrip() if b else a
                         for a, b, c, d in self.rows)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def per_unit(s: Sides, unit: Callable[[Recorder], int]) -> dict[str, float]:
    """CPU microseconds per unit of work: each proxy over its own phases, engine and client over the router's."""
    shared = sum(unit(s.recs[via]) for via in s.shared)
    n = {"router": unit(s.recs["router"]), "engine": shared, "client": shared}
    for via in s.recs:
        if via not in ("router", "direct"):
            n[via] = unit(s.recs[via])
    return {k: s.cpu[k] / max(v, 1) * 1e6 for k, v in n.items()}


#: how the extra yardsticks are named in the rows
EXTRAS = {"rust": "Rust vllm-router", "old": "router at the --old-router commit"}


def cpu_rows(r: Report, key: str, label: str, us: dict[str, float], unit: str,
             target: Optional[tuple[str, float]], s: Optional[Sides] = None) -> None:
    r.add(f"{key}_router_cpu_us", f"{label}: router CPU per {unit}", us["router"], "us", target)
    if "baseline" in us:
        r.add(f"{key}_baseline_cpu_us", f"{label}: bare pass-through CPU per {unit} (yardstick)", us["baseline"], "us")
        r.add(f"{key}_router_vs_baseline", f"{label}: router CPU / bare pass-through CPU", us["router"] / us["baseline"], "x")
    for via, name in EXTRAS.items():
        if via in us:
            r.add(f"{key}_{via}_cpu_us", f"{label}: {name} CPU per {unit}", us[via], "us")
            r.add(f"{key}_router_vs_{via}", f"{label}: router CPU / {name} CPU", us["router"] / us[via], "x")
    extras = [via for via in EXTRAS if via in us]
    if s is not None and extras:  # only with --rust-router / --old-router
        for via in ("router", *extras):
            share = s.kernel.get(via, 0.0) / s.cpu[via] * 100 if s.cpu[via] else float("nan")
            r.add(f"{key}_{via}_kernel_pct", f"{label}: {EXTRAS.get(via, 'router')} CPU in the kernel (system time)",
                  share, "%")
    r.add(f"{key}_engine_cpu_us", f"{label}: simulated engine CPU per {unit} (reference)", us["engine"], "us")
    r.add(f"{key}_client_cpu_us", f"{label}: load generator CPU per {unit} (reference)", us["client"], "us")


def added(r: Report, key: str, label: str, s: Sides, attr: str, limit: Optional[float]) -> None:
    what = "TTFT" if attr == "ttft" else "latency"
    for q in ("p50", "p99"):
        value = _ms(s.recs["router"], attr, q) - _ms(s.recs["direct"], attr, q)
        r.add(f"{key}_added_{attr}_{q}", f"{label}: added {what} {q}", value, "ms",
              ("<", limit) if limit is not None and q == "p50" else None)
    if "baseline" in s.recs:
        value = _ms(s.recs["baseline"], attr, "p50") - _ms(s.recs["direct"], attr, "p50")
        r.add(f"{key}_baseline_added_{attr}_p50", f"{label}: added {what} p50, bare pass-through (yardstick)",
              value, "ms")


def request_rows(r: Report, conc: int, s: Sides) -> None:
    label = f"c={conc}"
    for via in ("router", "direct"):
        rec = s.recs[via]
        r.add(f"ns_c{conc}_{via}_rps", f"{label}: req/s {'through the router' if via == 'router' else via}",
              rec.ok / rec.elapsed, "req/s")
    for via, name in EXTRAS.items():
        if via in s.recs:
            r.add(f"ns_c{conc}_{via}_rps", f"{label}: req/s through the {name}", s.recs[via].ok / s.recs[via].elapsed,
                  "req/s")
    added(r, f"ns_c{conc}", label, s, "latency", 0.3 if conc == 1 else None)
    cpu_rows(r, f"ns_c{conc}", label, per_unit(s, lambda rec: rec.ok), "request", ("<=", 150) if conc > 1 else None,
             s)
    r.add(f"ns_c{conc}_errors", f"{label}: failed requests", failures(s), "")


def stream_rows(r: Report, conc: int, s: Sides) -> None:
    label = f"{conc} stream{'s' if conc > 1 else ''}"
    r.add(f"s_c{conc}_streams_router", f"{label}: streams measured through the router", s.recs["router"].ok, "")
    r.add(f"s_c{conc}_streams_direct", f"{label}: streams measured direct", s.recs["direct"].ok, "")
    added(r, f"s_c{conc}", label, s, "ttft", 0.5 if conc == 1 else None)
    gap_r, gap_d = _ms(s.recs["router"], "gaps", "mean"), _ms(s.recs["direct"], "gaps", "mean")
    r.add(f"s_c{conc}_gap_router_ms", f"{label}: mean inter-chunk gap, router", gap_r, "ms")
    r.add(f"s_c{conc}_gap_direct_ms", f"{label}: mean inter-chunk gap, direct", gap_d, "ms")
    r.add(f"s_c{conc}_gap_excess_pct", f"{label}: router gap vs direct, |difference|",
          abs(gap_r / gap_d - 1) * 100, "%", ("<=", 2) if conc == 1 else None)
    cpu_rows(r, f"s_c{conc}", label, per_unit(s, relayed_chunks), "chunk", ("<=", 50) if conc > 1 else None, s)
    r.add(f"s_c{conc}_router_rss_mb", f"{label}: router RSS", s.router_rss_mb, "MB")
    r.add(f"s_c{conc}_errors", f"{label}: failed streams", failures(s), "")


async def measure(st: Stack, quick: bool, profile: Optional[Path], profile_format: str = "flamegraph") -> Report:
    """One at a time: router and direct side by side. Many at once: alternating phases, twice."""
    r = Report()
    scale = 0.5 if quick else 1.0
    ext = "svg" if profile_format == "flamegraph" else "txt"
    async with new_session(120.0) as session:
        await wait_ready(session, [u + "/health" for via, u in st.urls.items() if via != "rust"] +
                         [u + "/health" for u in st.sim_urls.values()])
        if "rust" in st.urls:
            try:
                await wait_ready(session, [st.urls["rust"] + "/health"], raise_as=rust_router.Unavailable)
                await rust_router.register(session, st.urls["rust"], st.sim_urls)
            except rust_router.Unavailable as e:
                raise rust_router.Unavailable(f"{e} (its log: rust-router.log)") from None

        r.section("non-streaming, 16 output tokens, engine answers at once")
        fast = dict(stream=False, input_len=Span(32, 32), output_len=Span(16, 16))
        request_rows(r, 1, await paired(session, st, "fast", Workload(concurrency=1, duration=6.0 * scale, **fast)))
        with profiled(st.router_pid, profile_format, profile / f"router-nonstream-c64.{ext}" if profile else None):
            s = await sides(session, st, "fast", Workload(concurrency=64, duration=4.0 * scale, **fast), rounds=2,
                            baseline=True, warmup=Workload(concurrency=64, duration=0.5, **fast))
        request_rows(r, 64, s)

        r.section("streaming, 50 tokens at 20 ms each")
        stream = dict(stream=True, input_len=Span(32, 32), output_len=Span(50, 50))
        stream_rows(r, 1, await paired(session, st, "stream", Workload(concurrency=1, duration=30.0 * scale, **stream)))
        with profiled(st.router_pid, profile_format, profile / f"router-stream-c500.{ext}" if profile else None):
            s = await sides(session, st, "stream", Workload(concurrency=500, duration=4.0 * scale, **stream),
                            rounds=2, baseline=True)
        stream_rows(r, 500, s)

        if "rust" in st.urls:
            f = r.figures
            r.section(f"ours against the Rust vllm-router {rust_router.version()} (same engines, same phases)")
            r.add("rust_ratio_cpu_per_request", "CPU per request at c=64, ours / Rust",
                  f["ns_c64_router_vs_rust"], "x", ("<=", 0.9))
            r.add("rust_ratio_cpu_per_chunk", "CPU per chunk at 500 streams, ours / Rust",
                  f["s_c500_router_vs_rust"], "x", ("<=", 0.9))
            r.add("rust_ratio_rps_c64", "req/s at c=64, ours / Rust",
                  f["ns_c64_router_rps"] / f["ns_c64_rust_rps"], "x", (">=", 1.1))

        r.section("1,000 simultaneous idle streams through the router")
        idle = await idle_streams(session, st, 1000)
        r.add("idle_ok", "idle streams: completed", idle["ok"], "")
        r.add("idle_errors", "idle streams: errors", idle["errors"], "", ("<=", 0))
        r.add("idle_refused", "idle streams: connections refused", idle["refused"], "", ("<=", 0))
        r.add("idle_router_rss_mb", "idle streams: router RSS at peak", idle["router_rss_peak_mb"], "MB")
        r.add("idle_router_fds", "idle streams: router open sockets at peak", idle["router_open_fds_peak"], "")
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="half-length phases (about a minute)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the router and engine logs")
    p.add_argument("--profile", metavar="DIR", type=Path,
                   help="write py-spy flame graphs of the router at 64 requests and 500 streams to DIR "
                        "(pip install py-spy)")
    p.add_argument("--profile-format", choices=("flamegraph", "raw"), default="flamegraph",
                   help="with --profile: flamegraph (SVG) or raw (collapsed stacks, .txt: "
                        "python benchmarks/profile_summary.py FILE sums them up by function and module)")
    p.add_argument("--rust-router", action="store_true",
                   help="also measure the Rust vllm-router (pip install vllm-router) on the same engines and "
                        "print our figures as ratios against it, with targets")
    p.add_argument("--old-router", metavar="COMMIT",
                   help="also measure the router of COMMIT (its router/ from git archive) in the same phases")
    p.add_argument("--server", choices=("fast", "uvicorn"), default="fast",
                   help="our router's HTTP server: fast (router/server/http/fastserver.py's protocol, the default) or "
                        "uvicorn (uvicorn's own httptools protocol, through benchmarks/serve_uvicorn.py); --old-router runs the fast one if that commit has "
                        "router/server/fastserver.py, else (and with uvicorn) `python -m router.serve` as it is there")
    args = p.parse_args()
    if args.rust_router and rust_router.version() is None:
        print("--rust-router: the Rust vllm-router is not installed (pip install vllm-router); nothing measured",
              file=sys.stderr)
        return 3
    if args.profile:
        if shutil.which("py-spy") is None:
            p.error("--profile needs py-spy on PATH: pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    old = None
    if args.old_router:
        try:
            old = checkout(args.old_router, tmp / "old")
        except CheckoutFailed as e:
            p.error(f"--old-router {args.old_router}: {e}")
    print(f"machine: {machine()}", flush=True)
    if args.rust_router:
        print(f"yardstick: Rust vllm-router {rust_router.version()} ({' '.join(rust_router.argv(0, 0)[1:])})",
              flush=True)
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    try:
        with stack(tmp, args.rust_router, old, args.server) as st:
            report = uvloop.run(measure(st, args.quick, args.profile, args.profile_format))
    except rust_router.Unavailable as e:
        print(f"--rust-router: the Rust vllm-router could not be started: {e}; logs kept in {tmp}", file=sys.stderr)
        return 3
    except BaseException:
        print(f"the benchmark stopped; the processes' logs are in {tmp}", file=sys.stderr)
        raise
    print(report.text())
    print(f"took {time.monotonic() - t0:.0f}s; load average before/after: {load0:.2f}/{os.getloadavg()[0]:.2f} "
          f"(other work on the machine inflates every figure, the yardsticks as much as the router)")
    print("workers: these figures are the router as one process; python benchmarks/workers.py measures\n"
          "router.workers: 2 (CPU per request and per chunk in the proxy workers, and the controller's share).")
    print(f"targets missed: {report.misses}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "figures": report.figures}, indent=2))
    if args.keep_logs:
        print(f"logs: {tmp}")
    else:
        shutil.rmtree(tmp)
    return 0 if report.misses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
