"""The router in front of the project's simulated vLLM/SGLang engines, and as
`python -m router.serve` in its own process (graceful shutdown on SIGTERM)."""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml
from helpers import PY, Proc, free_port, refused, start_sim, wait_for, wait_http
from router_support import Stack, instance, loop, stack, write_config  # noqa: F401  (fixtures)


def sim_metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in sim metrics"
    return float(m.group(1))



def test_sdk_through_router_to_simulated_engines(stack: Stack, sims) -> None:
    vport = sims("vllm", "org/llama", "--served-model-name", "llama")
    sport = sims("sglang", "org/qwen")
    r = stack.router([instance("org/llama", vport, "--served-model-name", "llama"),
                      instance("org/qwen", sport, engine="sglang", aliases=["qwen"])])
    c = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0, timeout=20)
    # vLLM answers only to its served name: asking by the config's model works through the rewrite.
    for name in ("org/llama", "llama", "qwen"):
        done = c.completions.create(model=name, prompt="hello", max_tokens=5)
        assert done.choices[0].text and done.usage.completion_tokens == 5
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.choices[0].message.content
        chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
        text = "".join(ch.choices[0].text for ch in c.completions.create(model=name, prompt="hello", max_tokens=5,
                                                                         stream=True))
        assert text == done.choices[0].text  # the sim's text is deterministic
    # The engine's own 400 (max_tokens beyond max_model_len) is relayed, not masked.
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="llama", prompt="x", max_tokens=10**7)
    assert info.value.body["type"] == "BadRequestError"


def test_disconnect_reaches_simulated_engine(stack: Stack, sims) -> None:
    port = sims("vllm", "m", "--itl-ms", "50")
    r = stack.router([instance("m", port)])
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 200, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 2:
            got += s.recv(65536)
    wait_for(lambda: sim_metric(port, "sim_client_disconnects_total") == 1, 3)


def test_engine_killed_mid_stream(stack: Stack, sims) -> None:
    port = sims("vllm", "m", "--die-after", "1", "--itl-ms", "20")
    r = stack.router([instance("m", port)])
    c = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0, timeout=10)
    start = time.monotonic()
    with pytest.raises(openai.APIError):
        list(c.completions.create(model="m", prompt="x", max_tokens=100, stream=True))
    assert time.monotonic() - start < 5


def test_graceful_shutdown_finishes_streams_and_refuses_new(tmp_path: Path, sims, procs: list[Proc]) -> None:
    port = sims("vllm", "m", "--itl-ms", "100")
    cfg = write_config(tmp_path, [instance("m", port)], {"shutdown_grace_seconds": 10})
    rport = yaml.safe_load(cfg.read_text())["router"]["router_port"]
    router = Proc([PY, "-m", "router.serve", "--config", str(cfg)], log=str(tmp_path / "router.log"))
    procs.append(router)
    wait_http(f"http://127.0.0.1:{rport}/health", timeout=20)

    result: dict = {}
    started = threading.Event()

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", rport, timeout=20)
        conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 20,
                                                            "stream": True}))
        resp = conn.getresponse()
        started.set()
        result["status"] = resp.status
        result["body"] = resp.read()
        result["end"] = time.monotonic()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(10), "the stream did not start"  # under way: 2 s in all
    router.p.send_signal(signal.SIGTERM)
    wait_for(lambda: refused(rport), 3, "new connections to be refused")
    assert "end" not in result, "new connections were refused only once the stream had ended"
    t.join(15)
    assert "end" in result, "the stream did not end"
    assert result["status"] == 200
    body = result["body"].decode()
    assert body.rstrip().endswith("data: [DONE]") and body.count("data: ") == 21
    # uvicorn re-raises the SIGTERM it caught once shutdown is complete.
    assert router.p.wait(10) in (0, -signal.SIGTERM)
    log = (tmp_path / "router.log").read_text()
    assert "Traceback" not in log and "Application shutdown complete" in log


def test_serve_rejects_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("router:\n  router_port: 0\ninstances:\n  - model: m\n    engine: nope\n")
    done = subprocess.run([PY, "-m", "router.serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{bad}: router.router_port" in done.stderr and "instances[0].engine" in done.stderr


def test_engines_with_their_own_api_key(stack: Stack, sims) -> None:
    """The router holds each engine's --api-key: clients use the router's keys, never the engines'."""
    vport = sims("vllm", "v", "--api-key", "engine-v")
    sport = sims("sglang", "s", "--api-key", "engine-s")
    req = urllib.request.Request(f"http://127.0.0.1:{vport}/v1/completions", method="POST",
                                 data=b'{"model":"v","prompt":"x"}', headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 401  # the engine really guards itself
    r = stack.router([instance("v", vport, "--api-key", "engine-v"),
                      instance("s", sport, "--api-key=engine-s", engine="sglang")], api_keys=["client-key"])
    c = openai.OpenAI(base_url=r.url + "/v1", api_key="client-key", max_retries=0, timeout=20)
    for name in ("v", "s"):
        assert c.completions.create(model=name, prompt="hello", max_tokens=3).usage.completion_tokens == 3
        chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=r.url + "/v1", api_key="engine-v", max_retries=0).completions.create(
            model="v", prompt="x", max_tokens=1)
    # Health probes and SGLang's key-guarded sleep calls carry the engine's key too.
    health = json.loads(urllib.request.urlopen(r.url + "/health/all", timeout=10).read())
    assert {m["status"] for m in health["models"].values()} == {"healthy"}
    for action in ("sleep", "wakeup"):
        ok = urllib.request.urlopen(urllib.request.Request(f"{r.url}/action/{action}/s", method="POST"), timeout=10)
        assert ok.status == 200
    assert sim_metric(sport, "sim_sleep_calls_total") == 1 and sim_metric(sport, "sim_wake_calls_total") == 1


@pytest.mark.slow  # idles 6.5 s on purpose, past the common client pools' keep-alive
def test_idle_client_connection_outlives_common_client_pools(tmp_path: Path, sims, procs: list[Proc]) -> None:
    """A pooled client connection left idle longer than uvicorn's default keep-alive (5 s) still
    serves the next request: the router keeps idle connections longer than clients pool them,
    so it never closes one under a request being sent."""
    port = sims("vllm", "m")
    cfg = write_config(tmp_path, [instance("m", port)])
    rport = yaml.safe_load(cfg.read_text())["router"]["router_port"]
    procs.append(Proc([PY, "-m", "router.serve", "--config", str(cfg)], log=str(tmp_path / "router.log")))
    wait_http(f"http://127.0.0.1:{rport}/health", timeout=20)
    conn = http.client.HTTPConnection("127.0.0.1", rport, timeout=10)
    body = json.dumps({"model": "m", "prompt": "x", "max_tokens": 2})
    for _ in range(2):
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("connection") != "close"
        resp.read()
        sock = conn.sock
        time.sleep(6.5)
        assert conn.sock is sock  # the same connection is reused, not silently reopened
    conn.close()
