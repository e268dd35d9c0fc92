"""The chaos soak's evidence and verdict (benchmarks/chaos.py): what each request and fault recorded, the
router processes' resources, and which failures a fault explains."""
from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import psutil
from chaos_stack import ENGINES, KILLS, SHUTDOWN_GRACE, Stack

#: Shortest life of a router process whose descriptors are compared (start vs end), and the span of each end.
FD_MIN_LIFE = 12.0
FD_SPAN = 3.0
#: Seconds after a router process starts before its samples count (its pools fill first).
FD_WARMUP = 3.0

#: What a proxy worker answers (503) to a request that was waiting on its controller when the controller died.
CONTROLLER_GONE = "the router's controller went away"
#: Latest a CONTROLLER_GONE answer may come after a SIGKILL of the router and still be the kill's: a worker
#: answers so when it reads the end of its controller's link, then stops within its shutdown grace.
CONTROLLER_GONE_WITHIN = SHUTDOWN_GRACE + 1.0
CLASS_KILL = "in flight at a kill"
CLASS_DOWN = "refused/connection error while the router was down"
CLASS_OTHER = "other"
CLASS_CORRUPT = "corrupted answer"

# --------------------------------------------------------------------------
# Records


@dataclass
class Request:
    client: int
    model: str
    stream: bool
    chat: bool
    start: float
    end: float
    ok: bool
    what: str  # "ok", a status, "stream_error <code>", "truncated", a connection error's name, "corrupt"
    got_status: bool  # an HTTP status arrived (so the router was up and answering)
    detail: str = ""
    klass: str = ""
    faults: str = ""  # for a failure no kill explains: the faults whose windows it overlaps


@dataclass
class Fault:
    kind: str
    target: str
    injected: float
    recovered: Optional[float] = None
    outcome: str = ""
    problem: str = ""  # the fault itself went wrong (not recovered, an internal error)
    failures: int = 0  # the failed requests it explains

    def window_end(self, margin: float, run_end: float) -> float:
        return (self.recovered if self.recovered is not None else run_end) + margin


@dataclass
class Sample:
    t: float
    rss: int
    fds: int


@dataclass
class RouterLife:
    pid: int
    created: float
    samples: list[Sample] = field(default_factory=list)


# --------------------------------------------------------------------------
# The router's resources


class RouterWatch:
    """Samples the router's RSS and open descriptors, per router process (its pid from supervisord)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.lives: dict[tuple[int, float], RouterLife] = {}
        #: When the load stopped: descriptors are compared under load only (the quiet end has fewer sockets).
        self.load_end = float("inf")

    def sample(self) -> None:
        try:
            info = self.stack.process("router")
            if info["statename"] != "RUNNING":
                return
            proc = psutil.Process(info["pid"])
            created = proc.create_time()
            # With proxy workers, the controller and its workers together (they end with it), and only
            # once every worker is up: a worker spawned late on a loaded machine would look like growth.
            tree = [proc, *proc.children(recursive=True)]
            workers = sum("spawn_main" in " ".join(p.cmdline()) for p in tree)
            if self.stack.workers > 1 and workers < self.stack.workers:
                return
            s = Sample(time.monotonic(), sum(p.memory_info().rss for p in tree), sum(p.num_fds() for p in tree))
        except (OSError, psutil.Error):
            return  # between a kill and the restart
        self.lives.setdefault((proc.pid, created), RouterLife(proc.pid, created)).samples.append(s)

    async def run(self, stop: asyncio.Event, every: float = 0.5) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    def fd_growth(self) -> list[tuple[int, int, int]]:
        """(pid, descriptors early, descriptors late) of each router process that lived long enough.

        Each end is the median over FD_SPAN seconds (after FD_WARMUP): under load the count moves with the
        connections in flight, a leak moves it one way for good."""
        out = []
        for life in self.lives.values():
            if not life.samples:
                continue
            first = life.samples[0].t
            settled = [s for s in life.samples if first + FD_WARMUP <= s.t <= self.load_end]
            if not settled or settled[-1].t - settled[0].t < FD_MIN_LIFE:
                continue
            early = [s.fds for s in settled if s.t <= settled[0].t + FD_SPAN]
            late = [s.fds for s in settled if s.t >= settled[-1].t - FD_SPAN]
            out.append((life.pid, int(statistics.median(early)), int(statistics.median(late))))
        return out

    def final(self) -> Optional[RouterLife]:
        return max(self.lives.values(), key=lambda life: life.created, default=None)


# --------------------------------------------------------------------------
# Verdict


def overlaps(r: Request, f: Fault, margin: float, run_end: float) -> bool:
    return r.end >= f.injected and r.start <= f.window_end(margin, run_end)


def classify(r: Request, faults: list[Fault], margin: float, run_end: float) -> tuple[str, Optional[Fault]]:
    """Which failure class `r` is in, and the kill that explains it (None for CLASS_OTHER and CLASS_CORRUPT)."""
    if r.what == "corrupt":
        return CLASS_CORRUPT, None
    if r.what == "503" and CONTROLLER_GONE in r.detail:
        return controller_gone(r, faults)
    for f in faults:
        if f.kind not in KILLS or not overlaps(r, f, margin, run_end):
            continue
        if f.kind == "engine_kill":
            if ENGINES[f.target][0] == r.model and r.got_status:
                return CLASS_KILL, f  # the router answered: the engine it was sent to died under it
            continue
        if r.got_status and r.what.isdigit():
            continue  # a router that answers with an HTTP error is no gap of the router's
        if f.kind == "router_kill" and r.start <= f.injected:
            return CLASS_KILL, f
        if r.start > f.injected or (not r.got_status and r.end - f.injected < 1.0):
            # Sent while it was down, or (SIGTERM) a request racing the close of an idle keep-alive connection.
            return CLASS_DOWN, f
    return CLASS_OTHER, None


def controller_gone(r: Request, faults: list[Fault]) -> tuple[str, Optional[Fault]]:
    """A proxy worker's 503 for its lost controller (module docstring): the request was waiting on the
    controller a SIGKILL of the router ended (in flight at the kill), or reached the worker after the kill
    and before the worker read the end of the link (the router was down); anything else is unexplained."""
    for f in faults:
        if f.kind == "router_kill" and f.injected <= r.end <= f.injected + CONTROLLER_GONE_WITHIN:
            return (CLASS_KILL if r.start <= f.injected else CLASS_DOWN), f
    return CLASS_OTHER, None


@dataclass
class Report:
    seconds: float
    requests: int
    ok: int
    streamed: int
    failures: dict[str, int]
    failures_by_what: dict[str, dict[str, int]]
    faults: dict[str, int]
    fault_list: list[dict[str, Any]]
    router_processes: int
    final_router: dict[str, Any]
    peak_rss_mb: float
    peak_fds: int
    fd_growth: list[tuple[int, int, int]]
    unexplained: list[dict[str, Any]]
    problems: list[str]
    #: seconds from the SIGKILL of the router to each CONTROLLER_GONE answer it explains (workers only)
    controller_gone_after: list[float] = field(default_factory=list)


def verdict(log: list[Request], faults: list[Fault], watch: RouterWatch, margin: float, fd_bound: int,
            started: float, run_end: float) -> Report:
    by_class: Counter[str] = Counter()
    by_what: dict[str, Counter[str]] = {}
    gone_after: list[float] = []
    for r in log:
        if r.ok:
            continue
        r.klass, cause = classify(r, faults, margin, run_end)
        if cause is not None:
            cause.failures += 1
            if CONTROLLER_GONE in r.detail:
                gone_after.append(round(r.end - cause.injected, 3))
        else:  # what was going on, for whoever reads the report
            r.faults = ", ".join(f"{f.kind} {f.target} +{f.injected - started:.1f}s" for f in faults
                                 if overlaps(r, f, margin, run_end))
        by_class[r.klass] += 1
        by_what.setdefault(r.klass, Counter())[r.what] += 1
    bad = [r for r in log if r.klass in (CLASS_OTHER, CLASS_CORRUPT)]
    problems = [f"{len(bad)} failures outside the windows of their faults or corrupted"] if bad else []
    problems += [f"{f.kind} {f.target}: {f.problem}" for f in faults if f.problem]
    growth = watch.fd_growth()
    problems += [f"router pid {pid}: descriptors {a} -> {b} (more than +{fd_bound})" for pid, a, b in growth
                 if b - a > fd_bound]
    if not any(r.ok for r in log):
        problems.append("no request succeeded")
    final = watch.final()
    samples = [s for life in watch.lives.values() for s in life.samples]
    first, last = (final.samples[0], final.samples[-1]) if final and final.samples else (None, None)
    return Report(
        seconds=round(run_end - started, 1), requests=len(log), ok=sum(r.ok for r in log),
        streamed=sum(r.stream for r in log), failures=dict(by_class),
        failures_by_what={k: dict(v) for k, v in by_what.items()},
        faults=dict(Counter(f.kind for f in faults)),
        fault_list=[{**asdict(f), "injected": round(f.injected - started, 2),
                     "recovered": None if f.recovered is None else round(f.recovered - started, 2)} for f in faults],
        router_processes=len(watch.lives),
        final_router={"pid": final.pid if final else None,
                      "rss_mb": [round(s.rss / 2**20, 1) for s in (first, last) if s],
                      "fds": [s.fds for s in (first, last) if s]},
        peak_rss_mb=round(max((s.rss for s in samples), default=0) / 2**20, 1),
        peak_fds=max((s.fds for s in samples), default=0), fd_growth=growth,
        unexplained=[{**asdict(r), "start": round(r.start - started, 2), "end": round(r.end - started, 2)}
                     for r in bad[:50]],
        problems=problems, controller_gone_after=sorted(gone_after))


def table(rep: Report) -> str:
    rows: list[tuple[str, object]] = [
        ("seconds of load", rep.seconds), ("requests", rep.requests), ("  succeeded (answer checked)", rep.ok),
        ("  streamed", rep.streamed)]
    for klass in (CLASS_KILL, CLASS_DOWN, CLASS_OTHER, CLASS_CORRUPT):
        whats = ", ".join(f"{w} {n}" for w, n in sorted(rep.failures_by_what.get(klass, {}).items()))
        rows.append((f"failed: {klass}", f"{rep.failures.get(klass, 0)}" + (f"  ({whats})" if whats else "")))
    rows.append(("faults injected", sum(rep.faults.values())))
    rows += [(f"  {kind}", n) for kind, n in sorted(rep.faults.items())]
    rows += [("router processes seen", rep.router_processes),
             ("final router RSS MB start -> end", " -> ".join(map(str, rep.final_router["rss_mb"]))),
             ("final router descriptors start -> end", " -> ".join(map(str, rep.final_router["fds"]))),
             ("peak router RSS MB / descriptors", f"{rep.peak_rss_mb} / {rep.peak_fds}"),
             ("controller-gone 503s explained / latest after its kill",
              f"{len(rep.controller_gone_after)} / "
              f"{max(rep.controller_gone_after, default=0):.2f}s (at most {CONTROLLER_GONE_WITHIN:g}s)"),
             ("descriptors early -> late per process", ", ".join(f"{a}->{b}" for _, a, b in rep.fd_growth) or "-"),
             ("verdict", "PASS" if not rep.problems else "FAIL")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for f in rep.fault_list:
        back = "not healthy" if f["recovered"] is None else f"healthy {f['recovered'] - f['injected']:.1f}s later"
        lines.append(f"fault +{f['injected']}s {f['kind']} {f['target']} ({f['outcome']}): {back}, "
                     f"{f['failures']} failures explained")
    lines += [f"problem: {p}" for p in rep.problems]
    lines += [f"unexplained: +{r['start']}s..{r['end']}s client {r['client']} {r['model']} "
              f"{'stream' if r['stream'] else 'plain'} {r['what']} {r['detail'][:160]}"
              f" (during: {r['faults'] or 'no fault'})" for r in rep.unexplained[:15]]
    return "\n".join(lines)

