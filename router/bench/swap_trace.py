"""``router.bench --pattern swap-trace``: the contention scheduler against the FIFO baseline, on seeded traces.

Three simulated vLLM engines (``python -m router.sim``, level-1 wake
``--wake-s``, sleep ``--sleep-s``) in one exclusive group, so one is awake
at a time, behind a real router (``python -m router.serve``) whose
``residency.policy`` is each of ``--policies`` in turn. Each policy gets a
fresh stack, the same warm-up (every model slept and woken once, so the
router has measured its switch costs, as one running for a while has) and
the same seeded trace (router/bench/trace.py; with ``--seeds``, several in
turn, since one trace can flatter a rule): bursts of streamed requests for
models of skewed popularity, overlapping, sent on an absolute schedule (open
loop: a slow router does not slow the arrivals). ``fifo:S`` runs fifo with
``min_sleep_duration`` S, a cooldown: the simple way to switch less, which
cost_aware is compared with on both switches and p95 latency.

Per policy: switches and seconds switching (from the router's ``/events``),
the fraction of time serving, completed requests per minute, latency and
TTFT (p50, p95, max), failures, and the longest wait (the largest TTFT)
against ``max_wait_seconds`` plus the longest switch. Then cost_aware
against fifo as ratios, and the checks that decide the scheduler (issue 23):
at least 40% fewer switches, no failure, p95 latency no worse, no wait past
``max_wait_seconds`` plus one switch.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Optional, TextIO

import aiohttp
import orjson
import yaml

from router.bench.loadgen import Recorder, Span, Target, Workload, new_session, send_burst
from router.bench.trace import Change, Timeline, TracePlan, make_trace, quantiles
from router.engines import ENGINES, SIM_MODULE
from router.util.answering import answers_200

POLICIES = ("fifo", "cost_aware")
MODELS = ("trace/a", "trace/b", "trace/c")
#: The simulated engine kind: the first (most common) whose sleep state the router can ask (vLLM).
ENGINE = next(s.name for s in ENGINES.values() if s.has_sleep_api and s.is_sleeping_path)
#: The checks' thresholds (issue 23's "done when").
FEWER_SWITCHES = 0.40


@dataclass(frozen=True)
class EnginePlan:
    """The simulated engines' times."""

    wake_s: float = 1.0
    sleep_s: float = 0.3
    ttft_ms: float = 50.0
    itl_ms: float = 20.0
    tokens: int = 32


def add_options(p: argparse.ArgumentParser, positive_int: Callable[[str], float],
                positive: Callable[[str], float]) -> None:
    g = p.add_argument_group("--pattern swap-trace", "fifo vs cost_aware on one seeded trace over simulated "
                                                     "engines (starts its own stacks; --duration is per policy)")
    g.add_argument("--policies", default=",".join(POLICIES),
                   help="residency.policy values to run, in order; fifo:S is fifo with min_sleep_duration S "
                        "(a cooldown: the other way to switch less)")
    g.add_argument("--seeds", default=None,
                   help="several traces (comma-separated seeds, instead of --seed) replayed one after another on "
                        "each policy's stack; the figures and checks are over all of them")
    g.add_argument("--max-wait", type=positive, default=30.0, help="residency.max_wait_seconds")
    g.add_argument("--wake-s", type=positive, default=EnginePlan.wake_s, help="the engines' level-1 wake time")
    g.add_argument("--sleep-s", type=positive, default=EnginePlan.sleep_s, help="the engines' level-1 sleep time")
    g.add_argument("--burst-gap", type=positive, default=TracePlan.burst_gap, help="mean seconds between bursts")
    g.add_argument("--burst-max", type=positive_int, default=TracePlan.burst_max, help="most requests in a burst")
    g.add_argument("--popularity", default=",".join(f"{p:g}" for p in TracePlan.popularity),
                   help="the three models' shares of the bursts")
    g.add_argument("--tokens", type=positive_int, default=EnginePlan.tokens, help="tokens per answer")


def plans(args: argparse.Namespace) -> tuple[list[TracePlan], EnginePlan, list[str]]:
    """The trace, engine and policy plans from the options; ValueError naming the option when one is wrong."""
    try:
        popularity = tuple(float(x) for x in args.popularity.split(","))
    except ValueError:
        raise ValueError(f"--popularity: {args.popularity!r} is not a comma-separated list of numbers") from None
    if len(popularity) != len(MODELS) or min(popularity) <= 0:
        raise ValueError(f"--popularity: give {len(MODELS)} shares > 0, e.g. 0.6,0.3,0.1")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or not all(_valid(p) for p in policies):
        raise ValueError(f"--policies: {args.policies!r}; use some of {', '.join(POLICIES)}, or fifo:S "
                         "(S seconds of min_sleep_duration)")
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        raise ValueError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    traces = [TracePlan(duration=args.duration or TracePlan.duration, popularity=popularity,
                        burst_gap=args.burst_gap, burst_max=int(args.burst_max), seed=seed) for seed in seeds]
    engine = EnginePlan(wake_s=args.wake_s, sleep_s=args.sleep_s, tokens=int(args.tokens))
    return traces, engine, policies


def policy_of(run: str) -> tuple[str, float]:
    """A run's ``residency.policy`` and ``min_sleep_duration``: ``fifo:2`` is fifo with 2 s (a plain name, 0)."""
    name, _, cooldown = run.partition(":")
    return name, float(cooldown or 0.0)


def _valid(run: str) -> bool:
    try:
        name, cooldown = policy_of(run)
    except ValueError:
        return False
    return name in POLICIES and cooldown >= 0 and (name == "fifo" or ":" not in run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """The engines and the router of one policy's run, as processes."""

    def __init__(self, root: Path, policy: str, max_wait: float, engine: EnginePlan):
        self.root = root
        self.ports = {m: _free_port() for m in MODELS}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = engine
        name, cooldown = policy_of(policy)
        doc = {"router": {"router_port": self.port, "access_log": False, "health_check_interval_seconds": 30},
               "sleep_manager": {"check_interval_seconds": 60, "min_sleep_duration": cooldown,
                                 "wake_timeout_seconds": 60, "drain_timeout_seconds": 120},
               "residency": {"policy": name, "max_wait_seconds": max_wait,
                             "groups": [{"name": "trace", "members": [self._name(m) for m in MODELS],
                                         "exclusive": True}]},
               "instances": [{"name": self._name(m), "model": m, "engine": ENGINE, "launch": False,
                              "engine_args": ["--host", "127.0.0.1", "--port", str(p)]} for m, p in self.ports.items()]}
        self.config = root / f"{policy.replace(':', '-')}.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def _name(model: str) -> str:
        return model.split("/")[1]

    def _spawn(self, argv: list[str], log: str) -> None:
        with open(self.root / log, "wb") as out:
            self.procs.append(subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1"}))

    async def start(self, session: aiohttp.ClientSession) -> None:
        e = self.engine
        for model, port in self.ports.items():
            self._spawn(["-m", SIM_MODULE, "--engine", ENGINE, "--model", model, "--host", "127.0.0.1",
                         "--port", str(port), "--wake-s", str(e.wake_s), "--sleep-s", str(e.sleep_s),
                         "--ttft-ms", str(e.ttft_ms), "--itl-ms", str(e.itl_ms)], f"{self._name(model)}.log")
        for port in self.ports.values():
            await _until_up(session, f"http://127.0.0.1:{port}/health", self.root)
        self._spawn(["-m", "router.serve", "--config", str(self.config)], f"{self.config.stem}.router.log")
        await _until_up(session, self.url + "/health", self.root)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _until_up(session: aiohttp.ClientSession, url: str, root: Path, timeout: float = 60.0) -> None:
    if await answers_200(session, url, timeout, 0.2):
        return
    raise SwapTraceError(f"{url} did not answer 200 within {timeout:g}s; see the logs in {root}")


class SwapTraceError(Exception):
    """A stack of the run did not come up or answer as expected."""


async def _post(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url) as resp:
        if resp.status != 200:
            raise SwapTraceError(f"POST {url} answered {resp.status}: {(await resp.text())[:200]}")


async def _follow(session: aiohttp.ClientSession, url: str, into: list[Change]) -> None:
    """Every model state change the router publishes on ``/events``, with its time."""
    async with session.get(url + "/events", timeout=aiohttp.ClientTimeout(total=None)) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                doc = orjson.loads(line[6:])
                if doc.get("kind") == "model" and doc.get("model"):
                    into.append(Change(float(doc["time"]), doc["model"], doc["state"], str(doc.get("why", ""))))


@asynccontextmanager
async def _following(session: aiohttp.ClientSession, url: str, into: list[Change]) -> AsyncIterator[None]:
    task = asyncio.ensure_future(_follow(session, url, into))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def warm_up(session: aiohttp.ClientSession, url: str) -> None:
    """Each model woken once with the others asleep: the router measures every sleep and wake (a
    router running for a while knows them; the first decisions would otherwise use the guesses)."""
    for model in MODELS[1:]:
        await _post(session, f"{url}/action/sleep/{model.replace('/', '%2F')}")
    for model in (*MODELS[1:], MODELS[0]):
        await _post(session, f"{url}/action/wakeup/{model.replace('/', '%2F')}")


async def replay(session: aiohttp.ClientSession, url: str, plan: TracePlan, engine: EnginePlan,
                 recs: dict[str, Recorder]) -> None:
    """Send every request of the trace at its time (streamed), each recorded under its model."""
    work = Workload(stream=True, input_len=Span(8, 8), output_len=Span(engine.tokens, engine.tokens),
                    concurrency=None, rate=None, duration=None, seed=plan.seed, timeout=600.0)
    rng = random.Random(plan.seed)
    t0 = time.perf_counter()
    tasks = []
    for arrival in make_trace(plan):
        delay = t0 + arrival.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        model = MODELS[arrival.model]
        rec = recs[model]
        tasks.append(asyncio.ensure_future(send_burst(session, Target(model, ((url, model),)), work, rng, 1, rec, rec)))
    await asyncio.gather(*tasks)


async def run_policy(policy: str, traces: list[TracePlan], engine: EnginePlan, max_wait: float, root: Path,
                     log: TextIO) -> dict:
    """One policy's stack and warm-up, then each trace in turn; its figures over all of them."""
    stack = Stack(root, policy, max_wait, engine)
    changes: list[Change] = []
    recs = {m: Recorder() for m in MODELS}
    windows: list[tuple[float, float]] = []
    async with new_session(600.0) as session:
        try:
            await stack.start(session)
            async with _following(session, stack.url, changes):
                await warm_up(session, stack.url)
                for plan in traces:
                    log.write(f"[swap-trace] {policy}: replaying {len(make_trace(plan))} requests over "
                              f"{plan.duration:g}s (seed {plan.seed})\n")
                    log.flush()
                    start = time.time()
                    await replay(session, stack.url, plan, engine, recs)
                    windows.append((start, time.time()))
                await asyncio.sleep(0.2)  # the last state changes' events, on their way
        finally:
            stack.stop()
    whys = [c.why for c in changes if c.state == "evicted" and any(a <= c.time <= b for a, b in windows)]
    doc = figures(policy, recs, [Timeline(changes, a, b) for a, b in windows], max_wait)
    doc["switch_reasons"] = dict(Counter(why_kind(why) for why in whys))
    # cost_aware's choice among several waiting models (router/server/fleet/contention.next_in_line).
    doc["switches_among_several"] = sum("waiting models:" in why for why in whys)
    doc["switches_out_of_order"] = sum("which asked first" in why for why in whys)
    doc["switch_whys"] = whys
    return doc


#: The scheduler's reasons (router/server/fleet/contention.py), by a phrase each contains.
WHY = (("no queued work", "resident idle"), ("max_wait_seconds", "max_wait"), ("request-seconds", "accumulated wait"),
       ("fifo", "fifo"))


def why_kind(why: str) -> str:
    return next((kind for phrase, kind in WHY if phrase in why), "other")


def figures(policy: str, recs: dict[str, Recorder], timelines: list[Timeline], max_wait: float) -> dict:
    """One policy's figures over its traces' windows (seconds; keys carry the unit)."""
    latency, ttft = array("d"), array("d")
    ok = failed = 0
    for rec in recs.values():
        latency.extend(rec.latency)
        ttft.extend(rec.ttft)
        ok += rec.ok
        failed += sum(rec.failed.values())
    switching = sum(t.switching_seconds() for t in timelines)
    longest = max((t.longest_switch() for t in timelines), default=0.0)
    wall = sum(t.end - t.start for t in timelines)
    oldest = max(ttft, default=0.0)
    return {"policy": policy, "switches": sum(t.switches() for t in timelines), "switching_s": switching,
            "serving_fraction": 1.0 - switching / wall if wall > 0 else None, "wall_s": wall,
            "completed": ok, "completed_per_min": ok / wall * 60.0 if wall > 0 else None, "failures": failed,
            "latency_s": quantiles(latency), "ttft_s": quantiles(ttft),
            "oldest_wait_s": oldest, "max_wait_s": max_wait, "longest_switch_s": longest,
            "wait_bound_s": max_wait + longest,
            "per_model": {m: {"ok": r.ok, "failed": sum(r.failed.values()), "ttft_s": quantiles(r.ttft)}
                          for m, r in recs.items()}}


def verdicts(base: dict, new: dict) -> list[tuple[str, bool, str]]:
    """Issue 23's checks of `new` (cost_aware) against `base` (fifo)."""
    fewer = 1.0 - new["switches"] / base["switches"] if base["switches"] else 0.0
    p95_new, p95_base = new["latency_s"]["p95"], base["latency_s"]["p95"]
    return [
        (f">= {FEWER_SWITCHES:.0%} fewer switches", fewer >= FEWER_SWITCHES,
         f"{new['switches']} vs {base['switches']}: {fewer:.0%} fewer"),
        ("no failure", new["failures"] == 0 and base["failures"] == 0,
         f"{new['failures']} and {base['failures']} failed"),
        ("p95 latency no worse", p95_new <= p95_base, f"{p95_new:.2f}s vs {p95_base:.2f}s"),
        ("no wait past max_wait_seconds + one switch", new["oldest_wait_s"] <= new["wait_bound_s"],
         f"longest {new['oldest_wait_s']:.2f}s vs {new['max_wait_s']:g}s + {new['longest_switch_s']:.2f}s"),
    ]


async def run(args: argparse.Namespace, log: TextIO = sys.stderr) -> dict:
    traces, engine, policies = plans(args)
    with tempfile.TemporaryDirectory(prefix="swap-trace-") as tmp:
        runs = {}
        for policy in policies:
            try:
                runs[policy] = await run_policy(policy, traces, engine, args.max_wait, Path(tmp), log)
            except SwapTraceError as e:
                logs = {p.name: p.read_text(errors="replace")[-2000:] for p in Path(tmp).glob("*.log")}
                raise SwapTraceError(f"{e}\n" + "\n".join(f"--- {n}\n{t}" for n, t in logs.items())) from None
    doc: dict = {"pattern": "swap-trace", "trace": asdict(traces[0]), "seeds": [t.seed for t in traces],
                 "engines": asdict(engine), "requests": sum(len(make_trace(t)) for t in traces), "runs": runs}
    if "fifo" in runs and "cost_aware" in runs:
        base, new = runs["fifo"], runs["cost_aware"]
        doc["ratios"] = {k: _ratio(new, base, k) for k in ("switches", "switching_s", "completed_per_min")}
        for k in ("latency_s", "ttft_s"):
            doc["ratios"].update({f"{k[:-2]}_{q}": _ratio(new[k], base[k], q) for q in ("p50", "p95", "max")})
        doc["checks"] = [{"check": c, "passed": ok, "detail": d} for c, ok, d in verdicts(base, new)]
    if "cost_aware" in runs:
        doc["cooldowns"] = [against_cooldown(runs["cost_aware"], r) for name, r in runs.items()
                            if policy_of(name)[0] == "fifo" and policy_of(name)[1] > 0]
    return doc


def against_cooldown(new: dict, cooled: dict) -> dict:
    """cost_aware against fifo with a cooldown (``min_sleep_duration``), the simple way to switch less:
    whether cost_aware makes no more switches with a p95 latency no worse (it is better on both)."""
    p95_new, p95_cooled = new["latency_s"]["p95"], cooled["latency_s"]["p95"]
    return {"against": cooled["policy"], "switches": [new["switches"], cooled["switches"]],
            "latency_p95_s": [p95_new, p95_cooled],
            "better_on_both": new["switches"] <= cooled["switches"] and p95_new <= p95_cooled}


def _ratio(new: dict, base: dict, key: str) -> Optional[float]:
    return new[key] / base[key] if new.get(key) is not None and base.get(key) else None


def report(doc: dict, out: TextIO) -> None:
    t, e = doc["trace"], doc["engines"]
    seeds = ",".join(str(x) for x in doc.get("seeds", [t["seed"]]))
    out.write(f"swap-trace: {doc['requests']} requests over {t['duration']:g}s per trace and policy (seed {seeds}), "
              f"3 models {t['popularity']}, bursts of {t['burst_min']}-{t['burst_max']} every ~{t['burst_gap']:g}s; "
              f"one exclusive group; engines wake {e['wake_s']:g}s, sleep {e['sleep_s']:g}s, "
              f"{e['tokens']} tokens at {e['itl_ms']:g} ms\n")
    rows = [("policy", "switches", "switching s", "serving", "done/min", "failed", "latency p50/p95/max s",
             "TTFT p50/p95/max s", "oldest wait vs bound s")]
    for r in doc["runs"].values():
        rows.append((r["policy"], str(r["switches"]), f"{r['switching_s']:.1f}", f"{r['serving_fraction']:.1%}",
                     f"{r['completed_per_min']:.1f}", str(r["failures"]), _q(r["latency_s"]), _q(r["ttft_s"]),
                     f"{r['oldest_wait_s']:.2f} / {r['wait_bound_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out.write("\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows) + "\n")
    out.write("switches by the scheduler's reason: " + "; ".join(
        f"{r['policy']} " + ", ".join(f"{k} {n}" for k, n in r["switch_reasons"].items())
        for r in doc["runs"].values()) + "\n")
    out.write("switches with several models waiting: " + "; ".join(
        f"{r['policy']} {r.get('switches_among_several', 0)} ({r.get('switches_out_of_order', 0)} not to the first "
        "that asked)" for r in doc["runs"].values()) + "\n")
    if "ratios" in doc:
        out.write("cost_aware / fifo: " + ", ".join(f"{k} {v:.2f}" for k, v in doc["ratios"].items()
                                                   if v is not None) + "\n")
        for c in doc["checks"]:
            out.write(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: {c['detail']}\n")
    for c in doc.get("cooldowns", ()):
        (sw_new, sw_old), (p_new, p_old) = c["switches"], c["latency_p95_s"]
        out.write(f"cost_aware vs {c['against']}: switches {sw_new} vs {sw_old}, p95 latency {p_new:.2f}s vs {p_old:.2f}s: "
                  f"{'better on both' if c['better_on_both'] else 'not better on both'}\n")


def _q(d: Optional[dict]) -> str:
    return "-" if d is None else f"{d['p50']:.2f}/{d['p95']:.2f}/{d['max']:.2f}"


def passed(doc: dict) -> bool:
    """The run's exit status: every check passed (or, with one policy, no failure)."""
    if "checks" in doc:
        return all(c["passed"] for c in doc["checks"])
    return all(r["failures"] == 0 for r in doc["runs"].values())

