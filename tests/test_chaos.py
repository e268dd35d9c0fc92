"""The chaos soak, one minute of it: ``python benchmarks/chaos.py --minutes 1`` as a user runs it.

Seed 6 with faults every 1.5-3 s draws each of the nine fault kinds within
its first nine faults (the kinds and pauses come from the seed alone, so the
sequence is fixed), so one short run meets every fault at least once. The
soak's own verdict is the test: any failure outside the window of a kill that
explains it, any corrupted answer, a fault the stack did not recover from, or
a router process whose descriptors grew fails it; the assertions below only
say which of those it was.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos import CLASS_CORRUPT, CLASS_OTHER, FAULT_KINDS  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def test_one_minute_of_chaos_costs_only_what_the_kills_reach(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--minutes", "1", "--seed", "6",
                           "--interval", "1.5:3", "--json", str(report)],
                          capture_output=True, text=True, timeout=220, cwd=ROOT)
    print(done.stdout, done.stderr[-3000:], sep="\n")
    assert report.exists(), f"no report (exit {done.returncode}): {done.stderr[-3000:]}"
    rep = json.loads(report.read_text())
    assert rep["failures"].get(CLASS_CORRUPT, 0) == 0, rep["unexplained"]
    assert rep["failures"].get(CLASS_OTHER, 0) == 0, rep["unexplained"]
    assert not rep["problems"], rep["problems"]
    assert done.returncode == 0, done.stdout
    assert set(rep["faults"]) == set(FAULT_KINDS), rep["faults"]
    assert rep["ok"] > 300, rep  # the load really ran, and most of it through the faults
    assert rep["router_processes"] >= 3  # the two router kills really restarted it
