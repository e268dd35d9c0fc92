"""``python -m router.bench`` against the real router and simulated engines.

One router process and three simulated engines serve the whole module; each
test runs the benchmark in-process (or under tmux) for a second or two and
checks its figures against what the engines were told to do.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from aiohttp import web
from helpers import PY, Proc, distinct_ports, free_port, post_json, start_sim, wait_for, wait_http

from router.bench.cli import main, targets
from router.config import load_config

pytestmark = pytest.mark.timeout(90)

ALPHA, BETA, GAMMA = "org/alpha", "beta", "gamma"


class Stack:
    def __init__(self, tmp: Path):
        self.router_port, *engine_ports = distinct_ports(5)
        self.ports = dict(zip(("alpha", "alpha2", "beta", "gamma"), engine_ports))
        self.config = tmp / "bench.yaml"
        p = self.ports
        # gamma's streams stall after 2 chunks; the router gives up on them after 1 s. The router
        # wants an API key: the benchmark sends the config's own. alpha's engines name theirs.
        self.config.write_text(f"""
router: {{router_port: {self.router_port}, stream_idle_timeout_seconds: 1.0, access_log: true, api_keys: [bench-key]}}
instances:
  - {{name: alpha, model: {ALPHA}, engine: vllm, launch: false, engine_args: ["--port {p['alpha']} --served-model-name alpha-served --api-key engine-key"]}}
  - {{name: alpha2, model: {ALPHA}, engine: vllm, launch: false, engine_args: ["--port {p['alpha2']} --served-model-name alpha-served --api-key engine-key"]}}
  - {{name: beta, model: {BETA}, engine: sglang, launch: false, engine_args: ["--port={p['beta']}"]}}
  - {{name: gamma, model: {GAMMA}, engine: vllm, launch: false, engine_args: ["--port {p['gamma']}"]}}
""")
        self.procs: list[Proc] = [
            start_sim("vllm", ALPHA, p["alpha"], "--served-model-name", "alpha-served", "--itl-ms", "1", log=str(tmp / "alpha.log")),
            start_sim("vllm", ALPHA, p["alpha2"], "--served-model-name", "alpha-served", "--itl-ms", "1"),
            start_sim("sglang", BETA, p["beta"], "--itl-ms", "1"),
            start_sim("vllm", GAMMA, p["gamma"], "--stall-after", "2"),
            Proc([PY, "-m", "router.serve", "--config", str(self.config)], log=str(tmp / "router.log")),
        ]

    def sim_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("bench"))
    try:
        for name in st.ports:
            wait_http(st.sim_url(name) + "/health")
        wait_http(f"http://127.0.0.1:{st.router_port}/health")
        yield st
    finally:
        st.stop()


def bench(stack: Stack, tmp: Path, *args: str) -> tuple[int, dict]:
    out = tmp / "out.json"
    rc = main(["--config", str(stack.config), "--json", str(out), "--progress-interval", "0.2", *args])
    return rc, json.loads(out.read_text())


def generated_tokens(url: str) -> float:
    """The simulated engine's own count of generated tokens, from its /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:generation_tokens_total"))


def test_closed_loop_streams_through_the_router(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, doc = bench(stack, tmp_path, "--models", f"{ALPHA},{BETA}", "--concurrency", "4", "--requests", "12",
                    "--input-len", "4:8", "--output-len", "5")
    assert rc == 0
    assert doc["workload"]["mode"] == "closed loop x4" and "direct" not in doc
    for model in (ALPHA, BETA):
        s = doc["router"][model]
        assert (s["ok"], s["failed"], s["failed_by_status"]) == (12, 0, {})
        assert s["output_tokens"] == 60
        assert s["chunks"] >= 60  # one chunk per token, plus role/usage chunks
        assert 0 < s["ttft_ms"]["p50"] <= s["latency_ms"]["p50"]
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"]
        assert s["itl_ms"]["mean"] > 0.5  # the engines wait 1 ms per token
        assert s["req_per_s"] == pytest.approx(12 / s["elapsed_s"])
    out, err = capsys.readouterr()
    assert "LATENCY ms p50/p90/p99" in out and ALPHA in out and BETA in out
    assert f"{ALPHA}: 12 done" in err  # the progress lines (not a TTY here)


def test_open_loop_paces_arrivals_without_streaming(stack: Stack, tmp_path: Path) -> None:
    rc, doc = bench(stack, tmp_path, "--models", BETA, "--rate", "20", "--duration", "1", "--no-stream",
                    "--endpoint", "chat", "--output-len", "2:4", "--seed", "3")
    assert rc == 0
    s = doc["router"][BETA]
    assert doc["workload"]["mode"] == "open loop 20 req/s"
    # Poisson arrivals at 20/s for 1 s (a closed loop would send hundreds).
    assert 5 <= s["ok"] <= 45 and s["failed"] == 0
    assert 2 * s["ok"] <= s["output_tokens"] <= 4 * s["ok"]
    assert s["ttft_ms"] is None and s["chunks"] == 0


def test_direct_sends_served_names_to_every_replica(stack: Stack, tmp_path: Path) -> None:
    before = [generated_tokens(stack.sim_url(n)) for n in ("alpha", "alpha2")]
    rc, doc = bench(stack, tmp_path, "--direct", "--models", ALPHA, "--requests", "10", "--concurrency", "2",
                    "--output-len", "3", "--no-stream")
    assert rc == 0
    # vLLM answers 404 to a name it does not serve, so 10 ok means the served name was used.
    assert doc["direct"][ALPHA]["ok"] == 10 and "router" not in doc
    after = [generated_tokens(stack.sim_url(n)) for n in ("alpha", "alpha2")]
    assert [a - b for a, b in zip(after, before)] == [15, 15]
    # engines started with --api-key get their own key, never the router's
    direct = targets(load_config(stack.config), [ALPHA, BETA], True, "http://router", "bench-key")
    assert direct[ALPHA].headers == {"Authorization": "Bearer engine-key"} and direct[BETA].headers == {}
    assert direct[ALPHA].endpoints == ((stack.sim_url("alpha"), "alpha-served"), (stack.sim_url("alpha2"), "alpha-served"))


def test_compare_direct_reports_the_router_overhead(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, doc = bench(stack, tmp_path, "--compare-direct", "--rounds", "2", "--models", BETA, "--requests", "6",
                    "--concurrency", "2", "--output-len", "4")
    assert rc == 0
    assert doc["router"][BETA]["ok"] == doc["direct"][BETA]["ok"] == 12  # 2 rounds x 6 per phase
    c = doc["comparison"][BETA]
    assert c["throughput_ratio"] == pytest.approx(doc["router"][BETA]["req_per_s"] / doc["direct"][BETA]["req_per_s"])
    assert c["added_latency_ms"]["p50"] == pytest.approx(
        doc["router"][BETA]["latency_ms"]["p50"] - doc["direct"][BETA]["latency_ms"]["p50"])
    assert isinstance(c["added_ttft_ms"]["p99"], float)
    assert "router overhead" in capsys.readouterr().out


def test_a_stream_cut_by_the_router_is_a_failure(stack: Stack, tmp_path: Path) -> None:
    rc, doc = bench(stack, tmp_path, "--models", GAMMA, "--requests", "2", "--concurrency", "2", "--output-len", "6")
    assert rc == 1
    s = doc["router"][GAMMA]
    assert s["ok"] == 0 and s["failed_by_status"] == {"stream_error": 2}


@contextlib.contextmanager
def misbehaving_router() -> Iterator[str]:
    """Streams that end cleanly but without [DONE] (ALPHA), or carry an error event (BETA)."""
    async def generate(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":" hi"}]}\n\n')
        if model == BETA:
            await resp.write(b'data: {"error":{"message":"boom","type":"internal_error","param":null,"code":500}}\n\n'
                             b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", generate)
    runner = web.AppRunner(app, handle_signals=False)
    loop = asyncio.new_event_loop()
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_truncated_streams_and_error_events_are_failures(stack: Stack, tmp_path: Path) -> None:
    with misbehaving_router() as url:
        rc, doc = bench(stack, tmp_path, "--url", url, "--models", f"{ALPHA},{BETA}", "--requests", "3",
                        "--concurrency", "1")
    assert rc == 1
    assert doc["router"][ALPHA]["failed_by_status"] == {"truncated": 3}
    assert doc["router"][BETA]["failed_by_status"] == {"stream_error": 3}
    assert doc["router"][ALPHA]["ok"] == doc["router"][BETA]["ok"] == 0


def _tmux(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, timeout=10)


@pytest.mark.slow  # a benchmark run in tmux
def test_tmux_runs_one_client_per_model_in_its_own_session(stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    env["TMUX_TMPDIR"] = str(tmp_path)  # a private tmux server for this test
    results = tmp_path / "results"
    parent = subprocess.Popen([PY, "-m", "router.bench", "--config", str(stack.config), "--tmux", "--models",
                               f"{ALPHA},{BETA}", "--results-dir", str(results), "--json", str(tmp_path / "all.json"),
                               "--duration", "3",
                               "--concurrency", "1", "--output-len", "4", "--progress-interval", "0.2"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: dict[str, str] = {}

        def both_done() -> bool:
            for session in ("benchmark-alpha", "benchmark-beta"):
                pane = _tmux(env, "capture-pane", "-p", "-t", session).stdout
                if " done, " in pane and "req/s" in pane:
                    seen[session] = pane
            return len(seen) == 2
        wait_for(both_done, 20, "both tmux sessions to report their results", interval=0.2)
        assert ALPHA in seen["benchmark-alpha"] and BETA in seen["benchmark-beta"]
        out, err = parent.communicate(timeout=30)
        assert parent.returncode == 0, err
        assert "tmux attach -t benchmark-alpha" in out and "tmux attach -t benchmark-beta" in out
        for session, model in (("benchmark-alpha", ALPHA), ("benchmark-beta", BETA)):
            doc = json.loads((results / f"{session}.json").read_text())
            assert doc["router"][model]["ok"] > 0 and doc["router"][model]["failed"] == 0
            assert json.loads((tmp_path / "all.json").read_text())["sessions"][session] == doc
        # the sessions stay so the final table can be read
        assert "benchmark finished" in _tmux(env, "capture-pane", "-p", "-t", "benchmark-alpha").stdout
        again = subprocess.run([PY, "-m", "router.bench", "--config", str(stack.config), "--tmux", "--models", BETA,
                                "--results-dir", str(results)], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 2 and "benchmark-beta already exist" in again.stderr
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        _tmux(env, "kill-server")


@pytest.mark.parametrize("args, message", [
    (["--models", "nope"], "'nope' is not a model"),
    (["--input-len", "9:3"], "LO:HI"),
    (["--concurrency", "0"], "must be > 0"),
    (["--rate", "fast"], "not a number"),
    (["--concurrency", "2", "--rate", "3"], "not allowed with argument"),
    (["--endpoint", "embeddings"], "invalid choice"),
])
def test_bad_input_is_a_clear_error(stack: Stack, args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--config", str(stack.config), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_broken_config_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("instances:\n  - {model: m, engine: vllm}\n")
    r = subprocess.run([PY, "-m", "router.bench", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "instances[0].engine_args" in r.stderr and "Traceback" not in r.stderr


def test_the_readme_config_runs_and_refused_connections_are_failures(tmp_path: Path) -> None:
    """example-config.yaml names virtualenvs absent here; the benchmark launches no engine, so that is no error."""
    out = tmp_path / "out.json"
    closed = free_port()
    rc = main(["--config", str(Path(__file__).resolve().parents[1] / "example-config.yaml"), "--url",
               f"http://127.0.0.1:{closed}", "--requests", "2", "--concurrency", "1", "--json", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert {m: s["failed_by_status"] for m, s in doc["router"].items()} == {
        "meta-llama/Llama-3.2-1B": {"refused": 2}, "Qwen/Qwen3-0.6B": {"refused": 2}}


def test_compare_direct_refuses_ratios_for_a_model_whose_residency_changed(stack: Stack, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A model asleep when the run starts wakes in the first router phase: that phase then holds the
    wake, and a ratio to direct would measure it. Its comparison is refused, the other model's stands."""
    status, body = post_json(f"http://127.0.0.1:{stack.router_port}/action/sleep/{ALPHA.replace('/', '%2F')}", {})
    assert status == 200, body
    rc, doc = bench(stack, tmp_path, "--compare-direct", "--rounds", "1", "--models", f"{ALPHA},{BETA}",
                    "--requests", "4", "--concurrency", "2", "--output-len", "2")
    assert rc == 0
    assert doc["residency_changes"] == {ALPHA: {"wakes": 1}}
    assert set(doc["comparison"][ALPHA]) == {"refused"}
    assert doc["comparison"][ALPHA]["refused"].startswith("its residency changed during the run (woke 1x)")
    assert isinstance(doc["comparison"][BETA]["throughput_ratio"], float)
    out, err = capsys.readouterr()
    assert f"warning: {ALPHA}: no router/direct comparison: its residency changed during the run (woke 1x)" in err
    row = next(ln for ln in out.splitlines() if ln.startswith(ALPHA) and "no figures" in ln)
    assert "woke 1x" in row
