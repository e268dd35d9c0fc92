"""The swap trace on a virtual clock: the scheduler's decision replayed in a model of one exclusive place.

`python -m router.bench --pattern swap-trace` runs real routers and simulated
engines and takes minutes per trace; this model takes a fraction of a second,
so a rule can be tried over many seeds before it is run for real. It replays
the same seeded traces (router/bench/trace.py) through the router's own
decision (router/server/fleet/contention.py: `decide`, `next_in_line`) with
one place held by one of three models: a request for the awake model goes in
at once and takes the answer's time (no batch limit, as the simulated
engines); a switch drains the resident (its requests in flight end, its new
ones wait), sleeps it and wakes the next model, whose waiting requests then
go in. Decisions are asked every `Times.tick` seconds. A guide, not a
substitute for the real run: on seed 0 it makes 20 switches with a p95
latency of 5.25 s where a real run made 20 and 5.35 s (and under the rule
before the pause, 21 and 6.25 s where real runs made 19-20 and 5.71-5.73 s).

    python benchmarks/swap_model.py --seeds 16
    python benchmarks/swap_model.py --seeds 16 --window 1.0 --pause 0    # the rule before the pause

It prints, per policy, the mean over the seeds of the switches and of the
p50 and p95 latency, and for cost_aware the mean ratios to fifo (0 s
cooldown) and on how many seeds both of issue 23's checks hold.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from router.bench.trace import TracePlan, make_trace, quantiles
from router.server.fleet import contention
from router.server.fleet.contention import Waits


@dataclass(frozen=True)
class Times:
    """The simulated engines' times, as the swap-trace benchmark's defaults."""

    answer: float = 0.05 + 32 * 0.02
    sleep: float = 0.3
    wake: float = 1.0
    tick: float = 0.02


@dataclass
class Model:
    waiting: list[float] = field(default_factory=list)  # when each began to wait
    ends: list[float] = field(default_factory=list)  # when each request in flight ends
    asked: Optional[float] = None
    last_end: float = 0.0


def replay(policy: str, plan: TracePlan, times: Times, cooldown: float = 0.0, max_wait: float = 30.0) -> dict:
    """One trace under `policy` (fifo with `cooldown` s of min_sleep_duration): switches and latencies."""
    arrivals = make_trace(plan)
    models = [Model() for _ in plan.popularity]
    resident, state, since, target = 0, "awake", 0.0, 0
    last_wake = -1e9
    latencies: list[float] = []
    switches, i, now = 0, 0, 0.0
    switch_s = times.sleep + times.wake
    while i < len(arrivals) or state != "awake" or any(m.waiting or m.ends for m in models):
        for m in models:
            done = [e for e in m.ends if e <= now]
            if done:
                m.ends = [e for e in m.ends if e > now]
                m.last_end = max(done)
        while i < len(arrivals) and arrivals[i].at <= now:
            a = arrivals[i]
            i += 1
            m = models[a.model]
            if a.model == resident and state == "awake":
                m.ends.append(a.at + times.answer)
                latencies.append(times.answer)
            else:
                m.waiting.append(a.at)
                m.asked = a.at if m.asked is None else m.asked
        r = models[resident]
        if state == "draining" and not r.ends:
            state, since = "sleeping", now
        if state == "sleeping" and now - since >= times.sleep - 1e-9:
            state, since, switches = "waking", now, switches + 1
        if state == "waking" and now - since >= times.wake - 1e-9:
            resident, state, last_wake = target, "awake", now
            m = models[resident]
            m.ends += [now + times.answer] * len(m.waiting)
            latencies += [now + times.answer - w for w in m.waiting]
            m.waiting, m.asked = [], None
        elif state == "awake":
            others = {n: Waits.since(0, m.waiting, now) for n, m in enumerate(models) if n != resident and m.waiting}
            if others:
                named = {str(n): w for n, w in others.items()}
                first = contention.next_in_line(policy, named, max_wait)
                chosen = int(first) if first is not None else min(others, key=lambda n: models[n].asked or 0.0)
                idle = 0.0 if r.ends else now - max(r.last_end, last_wake)
                verdict = contention.decide(policy, Waits(len(r.ends), (), idle), others[chosen], switch_s, max_wait,
                                            now - last_wake, cooldown)
                if verdict.switch:
                    target, state = chosen, "draining"
        now = round(now + times.tick, 6)
    q = quantiles(latencies) or {"p50": 0.0, "p95": 0.0}
    return {"switches": switches, "p50": q["p50"], "p95": q["p95"], "requests": len(latencies)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=16, help="seeds 0..N-1 of the default swap trace")
    p.add_argument("--window", type=float, default=contention.SERVING_WINDOW, help="cost_aware's serving window")
    p.add_argument("--pause", type=float, default=contention.PAUSE, help="cost_aware's pause before an idle switch")
    args = p.parse_args(argv)
    contention.SERVING_WINDOW, contention.PAUSE = args.window, args.pause
    times, seeds = Times(), range(args.seeds)
    runs = {name: [replay(policy, TracePlan(seed=s), times, cooldown) for s in seeds]
            for name, policy, cooldown in (("fifo", "fifo", 0.0), ("fifo:1", "fifo", 1.0), ("fifo:2", "fifo", 2.0),
                                           ("cost_aware", "cost_aware", 0.0))}
    n = len(seeds)
    print(f"swap model: {n} seeds of the default trace; cost_aware window {args.window:g}, pause {args.pause:g} "
          "(x the switch)")
    for name, rs in runs.items():
        print(f"{name:11s} switches {sum(r['switches'] for r in rs) / n:5.1f}  p50 {sum(r['p50'] for r in rs) / n:.2f}s"
              f"  p95 {sum(r['p95'] for r in rs) / n:.2f}s")
    pairs = list(zip(runs["fifo"], runs["cost_aware"]))
    fewer = [1 - c["switches"] / f["switches"] for f, c in pairs]
    p95 = [c["p95"] / f["p95"] for f, c in pairs]
    both = sum(1 for x, y in zip(fewer, p95) if x >= 0.40 and y <= 1.0)
    print(f"cost_aware vs fifo: {sum(fewer) / n:.0%} fewer switches (least {min(fewer):.0%}), p95 {sum(p95) / n:.2f}x "
          f"(most {max(p95):.2f}x); both checks on {both} of {n} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
