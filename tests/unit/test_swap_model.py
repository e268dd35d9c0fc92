"""benchmarks/swap_model.py: the swap trace replayed through the scheduler's decision on a virtual clock."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from swap_model import Times, replay  # noqa: E402

from router.bench.trace import TracePlan, make_trace  # noqa: E402


def test_every_request_is_answered_and_cost_aware_switches_less_than_fifo() -> None:
    plan = TracePlan(duration=20.0, seed=4)
    fifo, cost_aware = (replay(policy, plan, Times()) for policy in ("fifo", "cost_aware"))
    assert fifo["requests"] == cost_aware["requests"] == len(make_trace(plan))
    assert 0 < cost_aware["switches"] < fifo["switches"]
    assert Times().answer <= fifo["p50"] <= fifo["p95"]


def test_a_cooldown_makes_fifo_switch_less() -> None:
    plan = TracePlan(duration=20.0, seed=4)
    assert replay("fifo", plan, Times(), cooldown=2.0)["switches"] < replay("fifo", plan, Times())["switches"]


def test_one_model_alone_never_switches_and_waits_for_nothing() -> None:
    plan = TracePlan(duration=10.0, popularity=(1.0, 1e-9, 1e-9), seed=1)
    run = replay("cost_aware", plan, Times())
    assert run["switches"] == 0 and run["p95"] == Times().answer
