"""``python -m router.bench --pattern swap`` against a supervised --sim stack with residency.

Three on-demand engines that load in 0.5 s share a GPU budget for two, so
visiting them one at a time makes the router start, sleep and wake them;
the benchmark must see every kind of wait and count what the router did.
The stack is test_residency's (one fixture, not a copy).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from test_residency import engine, make_stack  # noqa: F401  (make_stack is a fixture)

from router.bench.cli import main
from router.bench.swap import visits

pytestmark = pytest.mark.timeout(120)

NAMES = ["a", "b", "c"]


@pytest.mark.slow
def test_swap_reports_cold_wake_and_warm_waits_and_the_swaps(make_stack, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    stack = make_stack(lambda ports: [engine(n, ports[n], on_demand=True, gpu_memory_gb=10, host_memory_gb=4,
                                             sim="--startup-s 0.5") for n in NAMES],
                       NAMES, residency={"gpu_memory_gb": 20, "host_memory_gb": 100})
    config = stack.sup.out.parent / "config.yaml"
    out = tmp_path / "swap.json"
    started = time.monotonic()
    rc = main(["--config", str(config), "--pattern", "swap", "--duration", "7", "--burst", "4", "--gap", "0.1",
               "--input-len", "4", "--output-len", "4", "--json", str(out)])
    took = time.monotonic() - started
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert 7 <= took < 20, took  # no burst starts after the duration, and none is cut short
    figures = doc["swap"]
    assert set(figures) == {f"m/{n}" for n in NAMES}
    for model, s in figures.items():
        assert s["failed"] == 0, (model, s["failed_by_status"])
        for kind in ("cold", "wake", "warm"):
            assert s["bursts"][kind] >= 1 and s[f"{kind}_ttft_ms"], (model, kind, s["bursts"])
        # A cold start waited for the 0.5 s load; a wake (simulated: instant) and a warm request did not.
        assert s["cold_ttft_ms"]["p50"] >= 500 > s["warm_ttft_ms"]["p50"], (model, s)
        assert s["ok"] == 4 * sum(s["bursts"].values())
    assert sum(s["starts"] for s in figures.values()) >= 3
    assert sum(s["wakes"] for s in figures.values()) >= 1
    evicted = sum(s["evicted"]["sleep"] + s["evicted"]["stop"] for s in figures.values())
    assert evicted >= 1 and doc["evictions_by_reason"].get("gpu_budget") == evicted
    assert [b["kind"] for b in doc["bursts"][:3]] == ["cold", "warm", "cold"]  # visit 1: a start, then warm
    for header in ("BURSTS cold/wake/warm", "COLD TTFT ms p50/p90/p99", "WAKE TTFT", "WARM TTFT", "EVICTED sleep/stop"):
        assert header in printed
    assert "evictions by reason: gpu_budget" in printed


def test_shuffled_visits_cover_every_model_each_round_and_never_repeat_one() -> None:
    models = ["a", "b", "c"]
    seq = visits(models, "shuffle", random.Random(1))
    order = [next(seq) for _ in range(30)]
    assert all(sorted(order[i:i + 3]) == models for i in range(0, 30, 3))
    assert all(x != y for x, y in zip(order, order[1:]))
    rr = visits(models, "round-robin", random.Random(1))
    assert [next(rr) for _ in range(6)] == models * 2


@pytest.mark.parametrize("flag", [["--direct"], ["--rate", "2"], ["--tmux"], ["--requests", "5"]])
def test_swap_refuses_the_steady_options(flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("instances:\n  - {name: a, model: m/a, engine: vllm, launch: false, engine_args: ['--port 9']}\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(config), "--pattern", "swap", *flag])
    assert e.value.code == 2 and f"drop {flag[0]}" in capsys.readouterr().err
