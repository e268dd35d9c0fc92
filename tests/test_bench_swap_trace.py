"""``python -m router.bench --pattern swap-trace``: both policies on one short trace, each over a stack of
simulated engines and a real router that the benchmark starts and stops itself."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.bench.cli import main
from router.bench.trace import TracePlan, make_trace

pytestmark = pytest.mark.timeout(180)


@pytest.mark.slow
def test_swap_trace_runs_both_policies_on_one_trace_and_reports_the_ratios_and_checks(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "trace.json"
    rc = main(["--pattern", "swap-trace", "--duration", "6", "--seed", "3", "--json", str(out)])
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    requests = len(make_trace(TracePlan(duration=6, seed=3)))
    assert doc["requests"] == requests > 0
    assert list(doc["runs"]) == ["fifo", "cost_aware"]
    for policy, run in doc["runs"].items():
        assert run["failures"] == 0 and run["completed"] == requests, (policy, run)
        assert run["switches"] >= 1 and run["switching_s"] > 0 and 0 < run["serving_fraction"] < 1, run
        assert run["latency_s"]["p50"] <= run["latency_s"]["p95"] <= run["latency_s"]["max"]
        assert run["oldest_wait_s"] == run["ttft_s"]["max"] and run["wait_bound_s"] > 30
        assert sum(run["switch_reasons"].values()) >= 1
    assert set(doc["runs"]["fifo"]["switch_reasons"]) == {"fifo"}
    assert "fifo" not in doc["runs"]["cost_aware"]["switch_reasons"]
    assert doc["ratios"]["switches"] == doc["runs"]["cost_aware"]["switches"] / doc["runs"]["fifo"]["switches"]
    assert [c["check"] for c in doc["checks"]][1] == "no failure" and doc["checks"][1]["passed"]
    assert rc == (0 if all(c["passed"] for c in doc["checks"]) else 1)
    for text in ("policy      switches", "cost_aware / fifo: switches", "[PASS] no failure"):
        assert text in printed


def test_swap_trace_refuses_the_options_of_a_deployed_stack(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--pattern", "swap-trace", "--url", "http://127.0.0.1:1"])
    assert e.value.code == 2 and "drop --url" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--pattern", "swap-trace", "--popularity", "1,2"])
    assert "--popularity: give 3 shares" in capsys.readouterr().err
