"""Request shaping and fallbacks through the real app over loopback: recording engines see the
shaped bodies (and the unshaped bytes), and a model whose engine is gone is answered by its fallback."""
from __future__ import annotations

import threading
import urllib.request
from typing import Any, Optional

import openai
import orjson
import pytest
from helpers import free_port, metric_value, post_json, start_sim, wait_for, wait_http
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_reload import rewrite
from test_router_proxy import post

from router.server.proxy.relay import MODEL_HEADER

HEADER = MODEL_HEADER.decode()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20)


def fallbacks_counted(url: str, origin: str, to: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return metric_value(text, "router_fallbacks_total", **{"from": origin, "to": to})


def test_the_engine_gets_the_defaults_the_overrides_and_not_the_stripped_fields(stack: Stack) -> None:
    shaped, plain = stack.engine(), stack.engine()
    r = stack.router([
        instance("org/shaped", shaped.port, "--served-model-name", "shaped",
                 request_defaults={"temperature": 0.2, "top_p": 0.5, "stop": ["\n"]},
                 request_overrides={"max_tokens": 7, "chat_template_kwargs": {"enable_thinking": False}},
                 request_strip=["seed", "logit_bias"]),
        instance("plain", plain.port)])
    c = client(r.url)
    chat = c.chat.completions.create(model="org/shaped", messages=[{"role": "user", "content": "hi"}],
                                     temperature=0.9, max_tokens=100, seed=3, logit_bias={"1": 5})
    assert chat.choices[0].message.content == "hello world"
    assert orjson.loads(shaped.bodies[-1]) == {
        "model": "shaped", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.9, "top_p": 0.5,
        "stop": ["\n"], "max_tokens": 7, "chat_template_kwargs": {"enable_thinking": False}}
    # Completions too, streamed; a null is the client giving no value.
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="shaped", prompt="x", stream=True, top_p=None, extra_body={"seed": 1}))
    assert text == "t0 t1 t2 t3 t4 "
    assert orjson.loads(shaped.bodies[-1]) == {
        "model": "shaped", "prompt": "x", "stream": True, "top_p": 0.5, "temperature": 0.2, "stop": ["\n"],
        "max_tokens": 7, "chat_template_kwargs": {"enable_thinking": False},
        "stream_options": {"include_usage": True}}  # the router's question for the stream's usage (docs/usage.md)
    # Embeddings are not shaped: the client's bytes.
    raw = b'{"model": "shaped",  "input": "x", "seed": 9}'
    assert post(r.url + "/v1/embeddings", raw)[0] == 200 and shaped.bodies[-1] == raw
    # A model without shaping forwards the client's bytes, byte for byte.
    raw = b'{ "model" : "plain", "messages": [{"role": "user", "content": "x"}],  "seed": 3, "temperature": 1.50 }'
    status, headers, _ = post(r.url + "/v1/chat/completions", raw)
    assert status == 200 and plain.bodies[-1] == raw
    assert headers[HEADER] == "plain"  # every engine answer names the model that gave it


@pytest.mark.parametrize("workers", [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers", marks=pytest.mark.slow)])
def test_a_model_whose_engine_is_gone_is_answered_by_its_fallback(stack: Stack, procs: list[Any],
                                                                  workers: int) -> None:
    big_port, small_port = free_port(), free_port()
    big = start_sim("vllm", "org/big", big_port)
    procs += [big, start_sim("vllm", "org/small", small_port, "--served-model-name", "small")]
    for port in (big_port, small_port):
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    r = stack.router([instance("org/big", big_port, fallbacks=["small"], request_overrides={"max_tokens": 3}),
                      instance("org/small", small_port, "--served-model-name", "small",
                               request_overrides={"max_tokens": 2})], workers=workers)
    c = client(r.url)
    asked = c.chat.completions.with_raw_response.create(model="org/big", messages=[{"role": "user", "content": "hi"}])
    assert asked.headers[HEADER] == "org/big" and asked.parse().usage.completion_tokens == 3
    big.stop()  # the primary's only engine is gone
    got = c.chat.completions.with_raw_response.create(model="org/big", messages=[{"role": "user", "content": "hi"}])
    answer = got.parse()
    assert got.headers[HEADER] == "org/small"
    # The fallback's own served name and its own shaping (max_tokens 2), not the primary's.
    assert answer.model == "small" and answer.usage.completion_tokens == 2 and answer.choices[0].message.content
    streamed = c.completions.with_raw_response.create(model="org/big", prompt="hi", stream=True)
    assert streamed.headers[HEADER] == "org/small" and "".join(ch.choices[0].text for ch in streamed.parse())
    # The metric reaches /metrics (from a proxy worker too: within its report interval).
    wait_for(lambda: fallbacks_counted(r.url, "org/big", "org/small") == 2, 10, "two fallbacks counted")


def chat_stream(url: str, model: str) -> tuple[int, Optional[str], bytes]:
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=orjson.dumps({"model": model, "stream": True,
                                                    "messages": [{"role": "user", "content": "x"}]}))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers.get(HEADER), resp.read()


def test_a_stream_that_failed_after_its_first_byte_is_not_fallen_back(stack: Stack) -> None:
    dying, spare = stack.engine(behaviour="die"), stack.engine()
    r = stack.router([instance("m", dying.port, fallbacks=["spare"]), instance("spare", spare.port)])
    status, model, data = chat_stream(r.url, "m")
    assert status == 200 and model == "m"
    assert b"t0 " in data and b"t1 " in data and b'"error"' in data and b"t2 " not in data
    assert spare.bodies == [] and fallbacks_counted(r.url, "m", "spare") == 0


def test_an_engine_that_answers_503_is_fallen_back_from_and_a_cycle_ends(stack: Stack) -> None:
    busy, other = stack.engine(behaviour="error503"), stack.engine(behaviour="error503")
    # No breaker time (eject_seconds 0): each request finds both engines to ask.
    r = stack.router([instance("a", busy.port, fallbacks=["b"]), instance("b", other.port, fallbacks=["a"])],
                     eject_seconds=0)
    with pytest.raises(openai.InternalServerError) as info:
        client(r.url).completions.create(model="a", prompt="x")
    # a, then b, and not a again: each engine was asked once; b's own answer is the one relayed.
    assert info.value.status_code == 503 and len(busy.bodies) == len(other.bodies) == 1
    assert orjson.loads(other.bodies[0])["model"] == "b"
    assert fallbacks_counted(r.url, "a", "b") == 1 and fallbacks_counted(r.url, "b", "a") == 0
    other.behaviour = "ok"
    status, model, data = chat_stream(r.url, "a")
    assert status == 200 and model == "b" and data.endswith(b"data: [DONE]\n\n")
    assert len(busy.bodies) == 2 and fallbacks_counted(r.url, "a", "b") == 2


def test_a_model_with_no_room_within_its_wait_is_fallen_back_from(stack: Stack) -> None:
    held, spare = stack.engine(behaviour="hang"), stack.engine()
    r = stack.router([instance("m", held.port, fallbacks=["spare"], max_concurrency=1, max_queue=0),
                      instance("spare", spare.port)])

    def hold() -> None:
        try:
            post(r.url + "/v1/completions", b'{"model": "m", "prompt": "x"}')
        except OSError:  # cut when the test's router stops
            pass
    threading.Thread(target=hold, daemon=True).start()
    wait_for(lambda: held.bodies, 10, "the first request to hold m's only slot")
    status, headers, body = post(r.url + "/v1/completions", b'{"model": "m", "prompt": "y"}')
    assert status == 200 and headers[HEADER] == "spare" and orjson.loads(spare.bodies[0])["model"] == "spare"
    assert fallbacks_counted(r.url, "m", "spare") == 1


def test_a_reload_changes_shaping_and_fallbacks_on_the_live_replica(stack: Stack) -> None:
    a, b = stack.engine(), stack.engine()
    r = stack.router([instance("a", a.port), instance("b", b.port)])
    replica = r.app.state.table.get("a").replicas[0]
    raw = b'{"model": "a",  "prompt": "x", "seed": 1}'
    assert post(r.url + "/v1/completions", raw)[0] == 200 and a.bodies[-1] == raw
    rewrite(stack.tmp / "config.yaml", [instance("a", a.port, request_strip=["seed"], fallbacks=["b"]),
                                        instance("b", b.port)])
    status, change = post_json(f"{r.url}/action/reload", {})
    assert status == 200 and change["needs_restart"] == [], change
    assert post(r.url + "/v1/completions", raw)[0] == 200
    assert orjson.loads(a.bodies[-1]) == {"model": "a", "prompt": "x"}
    # The same replica (its health, breaker and connections kept) now falls back to b.
    assert r.app.state.table.get("a").replicas[0] is replica
    a.behaviour = "error503"
    status, headers, _ = post(r.url + "/v1/completions", raw)
    assert status == 200 and headers[HEADER] == "b"


def test_a_model_whose_wake_fails_is_answered_by_its_fallback(stack: Stack, procs: list[Any]) -> None:
    big_port, small_port = free_port(), free_port()
    big = start_sim("vllm", "big", big_port)
    procs += [big, start_sim("vllm", "small", small_port)]
    for port in (big_port, small_port):
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    r = stack.router([instance("big", big_port, "--enable-sleep-mode", fallbacks=["small"],
                               engine_env=["VLLM_SERVER_DEV_MODE=1"]),
                      instance("small", small_port)])
    assert post(r.url + "/action/sleep/big", b"")[0] == 200
    big.stop()  # asleep, and its engine gone: the wake a request needs fails (ModelUnavailable)
    got = client(r.url).completions.with_raw_response.create(model="big", prompt="hi", max_tokens=2)
    assert got.headers[HEADER] == "small" and got.parse().model == "small"
    assert fallbacks_counted(r.url, "big", "small") == 1
