"""The swap trace's arrivals and how a run's state changes are read (router/bench/trace.py), and the
checks that decide the scheduler (router/bench/swap_trace.py), without a stack."""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Optional

import pytest

from router.bench.swap_trace import against_cooldown, plans, policy_of, verdicts
from router.bench.trace import Change, Timeline, TracePlan, make_trace, quantiles


def test_the_trace_is_seeded_skewed_bursty_and_within_its_duration() -> None:
    plan = TracePlan(duration=300.0)
    trace = make_trace(plan)
    assert trace == make_trace(plan) and trace != make_trace(TracePlan(duration=300.0, seed=1))
    assert [a.at for a in trace] == sorted(a.at for a in trace) and 0 <= trace[0].at and trace[-1].at < 300
    shares = Counter(a.model for a in trace)
    assert shares[0] > shares[1] > shares[2] > 0  # 0.6 / 0.3 / 0.1 of the bursts
    gaps = [b.at - a.at for a, b in zip(trace, trace[1:])]
    assert sum(1 for g in gaps if g < 0.5) > len(gaps) / 2  # bursts: most requests come close together


def changes(*rows: tuple[float, str, str]) -> list[Change]:
    return [Change(t, m, s) for t, m, s in rows]


def test_a_timeline_counts_switches_and_the_time_nobody_is_served() -> None:
    tl = Timeline(changes(
        (5.0, "b", "waking"), (6.0, "b", "awake"),  # before the window: not counted
        (10.0, "a", "draining"), (10.5, "a", "falling_asleep"), (10.8, "a", "sleeping"),
        (10.8, "b", "waking"), (11.8, "b", "awake"),
        (19.0, "b", "draining"), (19.2, "b", "falling_asleep"), (19.5, "b", "sleeping"),
        (19.5, "c", "waking"), (25.0, "c", "awake"),  # still waking at the window's end (20)
    ), start=8.0, end=20.0)
    assert tl.switches() == 2
    assert tl.switching_seconds() == pytest.approx(0.3 + 1.0 + 0.3 + 0.5)
    # draining at 10 -> b awake at 11.8; b draining at 19 -> c awake at 25 (after the window's end: unseen)
    assert tl.longest_switch() == pytest.approx(1.8)


def run(switches: int, failures: int, p95: float, oldest: float) -> dict:
    return {"switches": switches, "failures": failures, "latency_s": {"p95": p95}, "oldest_wait_s": oldest,
            "max_wait_s": 30.0, "longest_switch_s": 2.0, "wait_bound_s": 32.0}


def test_the_checks_pass_only_when_every_done_when_holds() -> None:
    base = run(20, 0, 6.0, 9.0)
    assert all(ok for _, ok, _ in verdicts(base, run(12, 0, 6.0, 31.9)))
    failed = {name for name, ok, _ in verdicts(base, run(13, 1, 6.1, 32.1)) if not ok}
    assert failed == {">= 40% fewer switches", "no failure", "p95 latency no worse",
                      "no wait past max_wait_seconds + one switch"}


def test_quantiles_are_p50_p95_and_max() -> None:
    assert quantiles([]) is None
    assert quantiles([float(i) for i in range(101)]) == {"p50": 50.0, "p95": 95.0, "max": 100.0}


def test_a_fifo_run_may_carry_a_cooldown_and_nothing_else_may() -> None:
    assert policy_of("fifo") == ("fifo", 0.0) and policy_of("fifo:2.5") == ("fifo", 2.5)
    assert policy_of("cost_aware") == ("cost_aware", 0.0)

    def options(policies: str, seeds: Optional[str] = None) -> argparse.Namespace:
        return argparse.Namespace(popularity="0.6,0.3,0.1", policies=policies, duration=None, burst_gap=0.75,
                                  burst_max=6, seed=0, seeds=seeds, wake_s=1.0, sleep_s=0.3, tokens=32)

    assert plans(options("fifo,fifo:1,cost_aware"))[2] == ["fifo", "fifo:1", "cost_aware"]
    assert [t.seed for t in plans(options("fifo"))[0]] == [0]
    assert [t.seed for t in plans(options("fifo", seeds="3,1"))[0]] == [3, 1]  # --seeds replaces --seed
    with pytest.raises(ValueError, match="--seeds"):
        plans(options("fifo", seeds="1,x"))
    for wrong in ("fifo:x", "fifo:-1", "cost_aware:2", "lru"):
        with pytest.raises(ValueError, match="--policies"):
            plans(options(wrong))


def test_cost_aware_is_better_than_a_cooldown_only_with_no_more_switches_and_no_worse_p95() -> None:
    cooled = {**run(15, 0, 8.0, 9.0), "policy": "fifo:2"}
    assert against_cooldown(run(15, 0, 8.0, 9.0), cooled)["better_on_both"]
    assert not against_cooldown(run(16, 0, 5.0, 9.0), cooled)["better_on_both"]
    assert not against_cooldown(run(10, 0, 8.1, 9.0), cooled)["better_on_both"]
