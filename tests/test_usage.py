"""Token accounting end to end: simulated vLLM and SGLang engines behind the real router (one process,
and a controller with two proxy workers), driven by the official `openai` and `anthropic` SDKs.

The engines' own counters (``vllm:prompt_tokens_total``...) are the sum of the usage they reported;
``router_tokens_total``, ``GET /usage`` and the activity log must say the same. A client stream
that did not ask for usage must be the stream the engine sends to a direct request, byte for byte
apart from ids and timestamps (the router asked for the usage chunk, and took it out).
"""
from __future__ import annotations

import http.client
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import yaml
from helpers import Proc, free_port, get_json, in_both_modes, metric_value, post_json, start_sim, wait_for, wait_http
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)

PROMPT = "the quick brown fox jumps over the lazy dog"
#: Two client keys, by name (router.api_keys records): the names are counted, the keys never shown.
KEYS = {"chat-ui": "sk-chat-do-not-log-me", "batch": "sk-batch-do-not-log-me"}
SECRET = KEYS["chat-ui"]
ENGINES = {"llama": ("vllm", "vllm"), "qwen": ("sglang", "sglang")}


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def engines(procs: list[Proc]) -> dict[str, int]:
    ports = {}
    for model, (engine, _) in ENGINES.items():
        ports[model] = free_port()
        procs.append(start_sim(engine, model, ports[model]))
    for port in ports.values():
        wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
    return ports


def engine_tokens(port: int, prefix: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return (sum(float(v) for v in re.findall(rf"^{prefix}:prompt_tokens_total(?:{{[^}}]*}})? (\S+)$", text, re.M)),
            sum(float(v) for v in re.findall(rf"^{prefix}:generation_tokens_total(?:{{[^}}]*}})? (\S+)$", text, re.M)))


def raw_post(port: int, path: str, body: dict[str, Any], chunked: bool = False) -> bytes:
    """The answer's body; `chunked` sends the request chunked, which the router serves through its
    ASGI path (chunk by chunk) rather than the fast server's piped one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode()
        conn.request("POST", path, iter([data]) if chunked else data,
                     {"content-type": "application/json", "authorization": f"Bearer {SECRET}"}, encode_chunked=chunked)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return resp.read()
    finally:
        conn.close()


def normalized(stream: bytes) -> bytes:
    """A stream without what differs between two runs of one request: ids and timestamps."""
    stream = re.sub(rb'"(\w*_)?id":"[^"]*"', rb'"\1id":"-"', stream)
    return re.sub(rb'"(created|created_at|completed_at)":\d+(\.\d+)?', rb'"\1":0', stream)


def drive(url: str, model: str, key: str) -> None:
    """Every shape of answer, streamed and not, with and without include_usage."""
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": PROMPT}]
    c.chat.completions.create(model=model, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    c.completions.create(model=model, prompt=PROMPT, max_tokens=4)
    for options in (None, {"include_usage": True}, {"include_usage": False}):
        extra = {} if options is None else {"stream_options": options}
        chunks = list(c.chat.completions.create(model=model, messages=messages, max_tokens=6,  # type: ignore[arg-type]
                                                stream=True, **extra))  # type: ignore[call-overload]
        # Only a client that asked sees a usage chunk.
        assert (chunks[-1].usage is not None) == (options == {"include_usage": True})
        list(c.completions.create(model=model, prompt=PROMPT, max_tokens=3, stream=True, **extra))  # type: ignore[call-overload]
    c.responses.create(model=model, input=PROMPT, max_output_tokens=4)
    list(c.responses.create(model=model, input=PROMPT, max_output_tokens=5, stream=True))
    if ENGINES[model][0] == "vllm":
        a = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=30)
        a.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
        with a.messages.stream(model=model, max_tokens=7, messages=[{"role": "user", "content": PROMPT}]) as s:
            s.until_done()


@in_both_modes("workers")
def test_tokens_counted_once_per_answer_and_streams_unchanged(stack: Stack, engines: dict[str, int], workers: int,
                                                              tmp_path: Path) -> None:
    activity = tmp_path / "logs" / "activity.jsonl"
    r = stack.router([instance(m, p, engine=ENGINES[m][0]) for m, p in engines.items()], workers=workers,
                     activity_log=str(activity), api_keys=[{"name": n, "key": k} for n, k in KEYS.items()])
    # chat-ui on both models, then batch on llama: each phase's tokens are the engines' counters' growth.
    want: dict[tuple[str, str], tuple[float, float]] = {}
    for key, models in (("chat-ui", list(engines)), ("batch", ["llama"])):
        before = {m: engine_tokens(p, ENGINES[m][1]) for m, p in engines.items()}
        for model in models:
            drive(r.url, model, KEYS[key])
        for m, p in engines.items():
            prompt, completion = engine_tokens(p, ENGINES[m][1])
            if m in models:
                want[(m, key)] = prompt - before[m][0], completion - before[m][1]
                assert want[(m, key)][0] > 0 and want[(m, key)][1] > 0
            else:
                assert (prompt, completion) == before[m]

    def counted() -> str:
        """/metrics once the last answer is accounted (its last byte reaches the client just before)."""
        text = urllib.request.urlopen(r.url + "/metrics", timeout=5).read().decode()
        return text if all(metric_value(text, "router_tokens_total", model=m, key=k, kind="prompt") == p
                           for (m, k), (p, _) in want.items()) else ""
    metrics = wait_for(counted, 5, "the router to account the last answer")
    _, by_model = get_json(r.url + "/usage?by=model&window=3600")
    _, by_key = get_json(r.url + "/usage?by=key")
    for (model, key), (prompt, completion) in want.items():
        assert metric_value(metrics, "router_tokens_total", model=model, key=key, kind="prompt") == prompt
        assert metric_value(metrics, "router_tokens_total", model=model, key=key, kind="completion") == completion
    assert metric_value(metrics, "router_tokens_total", key="anonymous") == 0
    for name, group in ((0, by_model), (1, by_key)):
        for label in {pair[name] for pair in want}:
            row = group["usage"][label]
            assert row["prompt_tokens"] == sum(p for pair, (p, _) in want.items() if pair[name] == label)
            assert row["completion_tokens"] == sum(c for pair, (_, c) in want.items() if pair[name] == label)
            assert row["errors"] == row["rate_limited"] == 0
        assert set(group["usage"]) == {pair[name] for pair in want}
    for model, row in by_model["usage"].items():
        assert metric_value(metrics, "router_requests_total", model=model, status="200") == row["requests"]
    want_total = {"prompt_tokens": sum(p for p, _ in want.values()),
                  "completion_tokens": sum(c for _, c in want.values())}
    assert {k: by_key["total"][k] for k in want_total} == want_total

    # The activity log: one line per request, the same totals, and neither the key nor any text.
    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in activity.read_text().splitlines()] if activity.exists() else []
    requests = by_key["total"]["requests"]
    wait_for(lambda: len(lines()) >= requests, 5, "the activity log's lines")
    logged = lines()
    assert len(logged) == requests
    text = activity.read_text()
    assert not any(k in text for k in KEYS.values()) and "quick brown" not in text
    assert sum(line["prompt_tokens"] or 0 for line in logged) == want_total["prompt_tokens"]
    assert sum(line["completion_tokens"] or 0 for line in logged) == want_total["completion_tokens"]
    assert {line["key"] for line in logged} == set(KEYS) and {line["status"] for line in logged} == {200}
    for key in KEYS:
        assert sum(line["completion_tokens"] or 0 for line in logged if line["key"] == key) == \
            by_key["usage"][key]["completion_tokens"]
    assert set(logged[0]) == {"time", "key", "model", "instance", "status", "prompt_tokens", "completion_tokens",
                              "latency_ms", "ttft_ms", "retries"}

    # Every stream is the engine's own: one that did not ask for usage comes without a usage chunk
    # (the router asked, and took it out), one that asked keeps it.
    for model, port in engines.items():
        cases: list[tuple[str, dict[str, Any]]] = [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6}),
            ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6})]
        cases += [(path, {**body, "stream_options": {"include_usage": True}}) for path, body in cases]
        cases.append(("/v1/responses", {"input": PROMPT, "max_output_tokens": 6}))
        if ENGINES[model][0] == "vllm":
            cases.append(("/v1/messages", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6}))
        for path, body in cases:
            request = {"model": model, "stream": True, **body}
            direct = raw_post(port, path, request)
            for chunked in (False, True):
                routed = raw_post(r.port, path, request, chunked)
                if path in ("/v1/chat/completions", "/v1/completions"):
                    assert (b'"usage":{' in routed) == ("stream_options" in body), (model, path)
                assert normalized(routed) == normalized(direct), (model, path, body, chunked)


def test_usage_refuses_a_bad_query(stack: Stack, engines: dict[str, int]) -> None:
    r = stack.router([instance("llama", engines["llama"])])
    for query, param in (("by=team", "by"), ("window=0", "window"), ("window=7200", "window"), ("window=x", "window")):
        status, body = get_json(f"{r.url}/usage?{query}")
        assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


def test_usage_is_an_admin_endpoint(stack: Stack, engines: dict[str, int]) -> None:
    r = stack.router([instance("llama", engines["llama"])], admin_api_key="usage-admin")
    assert get_json(f"{r.url}/usage")[0] == 401
    status, body = get_json(f"{r.url}/usage", {"Authorization": "Bearer usage-admin"})
    assert status == 200 and body["by"] == "key" and body["window_seconds"] == 3600


def test_a_reload_moves_the_activity_log(stack: Stack, engines: dict[str, int], tmp_path: Path) -> None:
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    r = stack.router([instance("llama", engines["llama"])], activity_log=str(first))
    c = openai.OpenAI(base_url=r.url + "/v1", api_key=SECRET, max_retries=0, timeout=30)
    c.completions.create(model="llama", prompt=PROMPT, max_tokens=2)
    config = Path(r.config.path)
    doc = yaml.safe_load(config.read_text())
    doc["router"]["activity_log"] = "second.jsonl"  # relative: from the config file's folder
    config.write_text(yaml.safe_dump(doc))
    assert post_json(r.url + "/action/reload", {})[0] == 200
    c.completions.create(model="llama", prompt=PROMPT, max_tokens=3)
    wait_for(lambda: second.exists() and second.read_text().count("\n") == 1, 5, "the line in the new log")
    assert [json.loads(line)["completion_tokens"] for line in first.read_text().splitlines()] == [2]
    assert json.loads(second.read_text())["completion_tokens"] == 3
