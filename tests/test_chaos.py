"""The chaos soak, one minute of it: ``python benchmarks/chaos.py --minutes 1`` as a user runs it.

Seed 6 with faults every 1.5-3 s draws each of the nine fault kinds within
its first nine faults (the kinds and pauses come from the seed alone, so the
sequence is fixed), so one short run meets every fault at least once. The
soak's own verdict is the test: any failure outside the window of a kill that
explains it, any corrupted answer, a fault the stack did not recover from, or
a router process whose descriptors grew fails it; the assertions below only
say which of those it was. Nothing is tolerated for a router bug.

The soak found one: a request that arrived while the on-demand model was
being stopped by idle_stop_seconds, after an earlier POST /action/stop of it,
made the router spin at full CPU and answer nothing (Lifecycle._admit_slow
awaited the old, finished stop task in a loop that never yielded; fixed in
46fe09c). The second test is its deterministic reproduction.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos_stack import FAULT_KINDS  # noqa: E402
from chaos_verdict import CLASS_CORRUPT, CLASS_OTHER  # noqa: E402
from helpers import distinct_ports, get_json, http_status, post_json, render, wait_for  # noqa: E402
from supervised import Supervised  # noqa: E402

pytestmark = pytest.mark.timeout(240)


@pytest.mark.slow
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


@pytest.mark.slow  # the chaos soak's reproduction: start, stop, start, then an idle stop
def test_a_request_during_an_idle_stop_after_a_manual_stop_is_served() -> None:
    """What the soak met, made deterministic: start, manual stop, start again, then a request sent while
    idle_stop_seconds is stopping the model must wait for the stop and start it again (as it does when no
    manual stop came first), and the router must keep answering meanwhile."""
    tmp = Path(tempfile.mkdtemp(prefix="kvr", dir="/tmp"))  # short: unix socket paths
    router_port, engine_port = distinct_ports(2)
    doc = {"router": {"router_port": router_port, "health_check_interval_seconds": 0.5, "shutdown_grace_seconds": 1},
           "sleep_manager": {"check_interval_seconds": 0.3},
           "instances": [{"name": "od", "model": "m/od", "engine": "vllm", "engine_args": [f"--port={engine_port}"],
                          "engine_env": ["VLLM_SERVER_DEV_MODE=1"], "sim_args": ["--startup-s 0.5"],
                          "on_demand": True, "idle_stop_seconds": 1}]}
    sup = Supervised(render(tmp, doc, "--sim"), tmp / "tmux")
    url = f"http://127.0.0.1:{router_port}"

    def ask() -> tuple[int, object]:
        return post_json(f"{url}/v1/completions", {"model": "m/od", "prompt": "hi", "max_tokens": 2})

    def state() -> str:
        return get_json(f"{url}/residency")[1]["models"]["m/od"]["state"]
    try:
        sup.start()
        wait_for(lambda: sup.status().get("router") == "RUNNING" and http_status(f"{url}/health") == 200, 30,
                 "the router")
        assert ask()[0] == 200
        assert post_json(f"{url}/action/stop/m/od", {})[0] == 200
        assert ask()[0] == 200
        wait_for(lambda: state() == "stopping", 20, "the idle stop to begin", interval=0.01)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask)
            time.sleep(1.0)
            assert http_status(f"{url}/health", timeout=3) == 200, "the router stopped answering"
            assert answer.result(timeout=15)[0] == 200
    finally:
        sup.close()
        shutil.rmtree(tmp, ignore_errors=True)
