"""``router.bench --pattern swap``: bursts across more models than fit, to measure what residency costs.

A steady load keeps every model awake, so it never shows the price of
residency: the request that finds its model stopped waits for a load, the
one that finds it asleep waits for a wake. This pattern visits one model at
a time (``--order``: a fresh shuffle of the models each round, never the same
model twice in a row, or the config's order), sends ``--repeat`` bursts of
``--burst`` requests at once with ``--gap`` seconds between bursts, and moves
on, so with more models than the budgets hold the router keeps swapping.

Right before each burst, ``GET /residency`` says the model's state; the
burst's first request is filed under it: cold (stopped: an engine start),
wake (asleep: a wake) or warm (awake). Its TTFT is the figure (the whole
latency without ``--stream``), since every later request of the burst only
queued behind the same start or wake. Starts, stops, sleeps and wakes per
model and evictions by reason are the difference of the router's
``/metrics`` counters over the run; evictions per model (slept or stopped to
make room) come from the ``evictions`` list of ``/residency``, read before
every burst so its bounded length loses nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.bench.loadgen import Recorder, Target, Workload, new_session, send_burst
from router.bench.report import distribution_ms, summarize, swap_table, workload_line
from router.util.states import AWAKE, DRAINING, FAILED, FALLING_ASLEEP, SLEEPING, STARTING, STOPPED, STOPPING, WAKING

#: What the first request of a burst will wait for, by the model's state when the burst starts.
KINDS = {STOPPED: "cold", STARTING: "cold", STOPPING: "cold", FAILED: "cold",
         SLEEPING: "wake", FALLING_ASLEEP: "wake", DRAINING: "wake", WAKING: "wake", AWAKE: "warm"}
ORDERS = ("shuffle", "round-robin")
#: Per-model counters read from /metrics (sample name -> figure name).
COUNTERS = {"router_model_starts_total": "starts", "router_model_stops_total": "stops",
            "router_model_sleeps_total": "sleeps", "router_model_wakes_total": "wakes"}


@dataclass(frozen=True)
class SwapPlan:
    """The bursts to send: `burst` requests at once, `repeat` bursts per visit, `gap` seconds apart."""

    burst: int = 8
    gap: float = 1.0
    repeat: int = 2
    order: str = "shuffle"
    duration: float = 30.0

    def describe(self) -> str:
        return (f"swap: {self.order} visits of {self.repeat} burst(s) x{self.burst}, "
                f"{self.gap:g} s apart, for {self.duration:g} s")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return v


def add_options(p: argparse.ArgumentParser, positive_int: Callable[[str], float]) -> None:
    """The swap pattern's own options (the request shape, --duration and --seed are shared)."""
    g = p.add_argument_group("--pattern swap", "bursts to one model at a time, cycling through more models than fit")
    g.add_argument("--burst", type=positive_int, default=SwapPlan.burst, help="requests sent at once per burst")
    g.add_argument("--gap", type=_seconds, default=SwapPlan.gap, help="seconds between bursts")
    g.add_argument("--repeat", type=positive_int, default=SwapPlan.repeat,
                   help="bursts per visit to a model (the first finds it as the last visit left it, the others warm)")
    g.add_argument("--order", choices=ORDERS, default=SwapPlan.order,
                   help="models per round: a fresh shuffle (never the same twice in a row), or the config's order")


def visits(models: Sequence[str], order: str, rng: random.Random) -> Iterator[str]:
    """Models to visit, round after round, without end."""
    last: Optional[str] = None
    while True:
        round_ = list(models)
        if order == "shuffle":
            rng.shuffle(round_)
            if len(round_) > 1 and round_[0] == last:
                round_.append(round_.pop(0))
        yield from round_
        last = round_[-1]


def read_counters(text: str) -> dict[str, Counter[str]]:
    """Per-model start/stop/sleep/wake counters and evictions by reason from the Prometheus text."""
    out: dict[str, Counter[str]] = {name: Counter() for name in (*COUNTERS.values(), "evictions")}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in COUNTERS:
                out[COUNTERS[sample.name]][sample.labels["model"]] += int(sample.value)  # counters of whole events
            elif sample.name == "router_model_evictions_total":
                out["evictions"][sample.labels["reason"]] += int(sample.value)
    return out


class RouterView:
    """The router's own account of residency, asked over HTTP; remembers every eviction it has seen."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url
        self._seen: set[tuple] = set()
        self.evicted: dict[str, Counter[str]] = {}

    async def _get(self, path: str) -> aiohttp.ClientResponse:
        resp = await self.session.get(self.url + path)
        if resp.status != 200:
            body = (await resp.text())[:200]
            raise SwapError(f"GET {self.url}{path} answered {resp.status}: {body} (the swap pattern needs a router "
                            "with residency)")
        return resp

    async def states(self, count_evictions: bool = True) -> dict[str, str]:
        """Each model's state now; new evictions are counted unless this is the baseline read."""
        async with await self._get("/residency") as resp:
            doc = await resp.json()
        for e in doc.get("evictions", ()):
            key = (e["time"], e["model"], e["action"], e["reason"])
            if key not in self._seen:
                self._seen.add(key)
                if count_evictions:
                    self.evicted.setdefault(e["model"], Counter())[e["action"]] += 1
        return {name: m["state"] for name, m in doc["models"].items()}

    async def counters(self) -> dict[str, Counter[str]]:
        async with await self._get("/metrics") as resp:
            return read_counters(await resp.text())


class SwapError(Exception):
    """The router cannot be benchmarked this way (no /residency, or it does not serve a model)."""


@dataclass
class ModelFigures:
    """One model's requests, and its bursts' first-request waits by kind."""

    rec: Recorder = field(default_factory=Recorder)
    first: dict[str, array] = field(default_factory=lambda: {k: array("d") for k in ("cold", "wake", "warm")})
    bursts: Counter[str] = field(default_factory=Counter)


def first_wait(rec: Recorder, stream: bool) -> Optional[float]:
    """The lead request's TTFT (its latency without streaming); None when it failed."""
    if stream:
        return rec.ttft[0] if rec.ttft else None
    return rec.latency[0] if rec.latency else None


async def _burst(session: aiohttp.ClientSession, view: RouterView, target: Target, work: Workload, plan: SwapPlan,
                 rng: random.Random, fig: ModelFigures) -> dict:
    """One burst: ask the model's state, send, file the lead request's wait under what the state promised."""
    state = (await view.states()).get(target.model)
    if state is None:
        raise SwapError(f"the router at {view.url} does not report model {target.model!r} in /residency")
    kind = KINDS.get(state, "warm")
    lead, rest = Recorder(), Recorder()
    t0 = time.perf_counter()
    await send_burst(session, target, work, rng, plan.burst, lead, rest)
    lead.elapsed = time.perf_counter() - t0
    fig.rec.merge(lead)
    fig.rec.merge(rest)
    fig.bursts[kind] += 1
    wait = first_wait(lead, work.stream)
    if wait is not None:
        fig.first[kind].append(wait)
    return {"model": target.model, "state": state, "kind": kind, "ok": lead.ok + rest.ok,
            "failed": sum(lead.failed.values()) + sum(rest.failed.values()),
            "first_ms": None if wait is None else wait * 1e3}


async def run(args: argparse.Namespace, work: Workload, url: str, headers: dict[str, str], models: list[str],
              stop: asyncio.Event, log: TextIO = sys.stderr) -> dict:
    """Visit the models until the duration is up (a burst is never cut short) or `stop` is set."""
    plan = SwapPlan(burst=args.burst, gap=args.gap, repeat=args.repeat, order=args.order,
                    duration=work.duration or SwapPlan.duration)
    rng = random.Random(f"{work.seed}:swap")
    figs = {m: ModelFigures() for m in models}
    bursts: list[dict] = []
    async with new_session(work.timeout) as session:
        view = RouterView(session, url)
        await view.states(count_evictions=False)
        before = await view.counters()
        t0 = time.perf_counter()
        for model in visits(models, plan.order, rng):
            for _ in range(plan.repeat):
                if stop.is_set() or time.perf_counter() - t0 >= plan.duration:
                    break
                t_s = time.perf_counter() - t0
                b = await _burst(session, view, Target(model, ((url, model),), headers), work, plan, rng, figs[model])
                b["t_s"] = t_s
                bursts.append(b)
                first = "-" if b["first_ms"] is None else f"{b['first_ms']:.0f} ms"
                log.write(f"[swap {b['t_s']:6.1f}s] {model}: {b['kind']} ({b['state']}), "
                          f"{b['ok']} ok, {b['failed']} failed, first TTFT {first}\n")
                log.flush()
                if plan.gap > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), plan.gap)
                    except asyncio.TimeoutError:
                        pass
            else:
                continue
            break
        await view.states()
        after = await view.counters()
    return {"pattern": "swap", "plan": plan, "bursts": bursts,
            "swap": {m: _summary(figs[m], m, before, after, view.evicted.get(m, Counter())) for m in models},
            "evictions_by_reason": {r: after["evictions"][r] - before["evictions"][r]
                                    for r in sorted(after["evictions"]) if after["evictions"][r] > before["evictions"][r]}}


def _summary(fig: ModelFigures, model: str, before: dict[str, Counter[str]], after: dict[str, Counter[str]],
             evicted: Counter[str]) -> dict:
    out = summarize(fig.rec)
    out["bursts"] = {k: fig.bursts[k] for k in ("cold", "wake", "warm")}
    for kind, waits in fig.first.items():
        out[f"{kind}_ttft_ms"] = distribution_ms(waits)
    for name in COUNTERS.values():
        out[name] = after[name][model] - before[name][model]
    out["evicted"] = {"sleep": evicted["sleep"], "stop": evicted["stop"]}
    return out


def report(doc: dict, out: TextIO) -> None:
    out.write(workload_line(doc["workload"]) + f"\nrouter ({doc['url']}):\n")
    out.write(swap_table(doc["swap"]) + "\n")
    reasons = doc["evictions_by_reason"]
    out.write("evictions by reason: " + (", ".join(f"{r} {n:g}" for r, n in reasons.items()) or "none") + "\n")
