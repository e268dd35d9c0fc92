"""The simulated engine over real loopback HTTP: shapes against real vLLM 0.32
captures (tests/real_vllm/captured/), SGLang's documented shapes, errors, the
sleep APIs, start-up delay, disconnect detection and every fault knob.

Most tests run SimEngine in the test's own event loop (anyio plugin); the ones
about the process itself (argv, --die-after, --startup-s) run
``python -m router.sim``.
"""
from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import aiohttp
import orjson
import pytest
from helpers import PY, Proc, free_port, refused, wait_for_async, wait_http

from router.sim import SimEngine, SimOptions, parse_options, textgen
from router.sim import http as sim_http

pytestmark = pytest.mark.anyio
CAPTURED = Path(__file__).parent / "real_vllm" / "captured"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------- helpers
def captured(name: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one real vLLM exchange."""
    text = (CAPTURED / f"{name}.http").read_bytes()
    head, _, body = text.partition(b"\n\n")
    lines = [ln[2:].decode() for ln in head.splitlines() if ln.startswith(b"< ")]
    status = int(lines[0].split()[1])
    headers = dict(ln.split(": ", 1) for ln in lines[1:])
    return status, {k.lower(): v for k, v in headers.items()}, body.rstrip(b"\n") if not body.startswith(b"data:") else body


def sse_events(body: bytes) -> list[Any]:
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    return [e[6:].decode() if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in events]


def same_shape(sim: Any, real: Any, where: str = "") -> None:
    """Same keys in the same order, same JSON types, all the way down (values aside)."""
    if isinstance(real, dict):
        assert isinstance(sim, dict), where
        assert list(sim) == list(real), f"{where}: {list(sim)} != {list(real)}"
        for k in real:
            same_shape(sim[k], real[k], f"{where}.{k}")
    elif isinstance(real, list):
        assert isinstance(sim, list) and len(sim) == len(real), where
        for i, (a, b) in enumerate(zip(sim, real)):
            same_shape(a, b, f"{where}[{i}]")
    elif real is None:
        assert sim is None, f"{where}: {sim!r} should be null"
    else:
        assert type(sim) is type(real), f"{where}: {type(sim).__name__} vs {type(real).__name__}"


class Sim:
    """A SimEngine on this loop plus an aiohttp client for it."""

    def __init__(self, engine: SimEngine, http: aiohttp.ClientSession):
        self.engine = engine
        self.http = http

    @property
    def url(self) -> str:
        return self.engine.url

    async def post(self, path: str, body: Any = None, raw: Optional[bytes] = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else orjson.dumps(body)
        async with self.http.post(self.url + path, data=data, headers={"content-type": "application/json"}) as r:
            return r.status, dict(r.headers), await r.read()

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        async with self.http.get(self.url + path) as r:
            return r.status, dict(r.headers), await r.read()

    async def metric(self, name: str) -> float:
        _, _, body = await self.get("/metrics")
        m = re.search(rb"^" + re.escape(name.encode()) + rb"(?:\{[^}]*\})? (\S+)$", body, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


@pytest.fixture
async def make_sim() -> AsyncIterator[Any]:
    engines: list[SimEngine] = []
    http = aiohttp.ClientSession()

    async def make(engine: str = "vllm", model: str = "tiny", **kw: Any) -> Sim:
        e = SimEngine(SimOptions(engine=engine, model=model, port=0, **kw))
        await e.start()
        engines.append(e)
        return Sim(e, http)

    yield make
    await http.close()
    for e in engines:
        await e.stop()


COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


# ------------------------------------------------------------- vLLM shapes
async def test_completion_matches_real_vllm_field_by_field(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",), max_model_len=512)
    status, headers, body = await sim.post("/v1/completions", {**COMPLETION, "max_tokens": 8})
    real_status, real_headers, real_body = captured("completions")
    assert status == real_status == 200
    assert headers["Content-Type"] == real_headers["content-type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Server"] == real_headers["server"] and headers["Vary"] == "Origin"
    got, real = orjson.loads(body), orjson.loads(real_body)
    same_shape(got, real)
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", got["id"]) and re.fullmatch(r"cmpl-[0-9a-f]{16}", real["id"])
    assert got["object"] == "text_completion" and got["model"] == "tiny"
    assert got["system_fingerprint"].startswith("vllm-0.32.0-")
    assert got["choices"][0]["text"] == textgen.generate("Hello", 8) == " charlie delta echo foxtrot golf hotel india juliet"
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"] == {"prompt_tokens": 1, "total_tokens": 9, "completion_tokens": 8,
                            "prompt_tokens_details": None, "completion_tokens_details": None}


async def test_chat_matches_real_vllm_field_by_field(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    status, _, body = await sim.post("/v1/chat/completions", {**CHAT, "max_tokens": 8})
    got, real = orjson.loads(body), orjson.loads(captured("chat")[2])
    assert status == 200
    same_shape(got, real)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", got["id"]) and got["object"] == "chat.completion"
    assert got["choices"][0]["message"]["content"] == textgen.generate("user: hi", 8)
    assert got["usage"]["prompt_tokens"] == 2  # "user:" and "hi"


async def test_completion_stream_with_usage_matches_real_vllm(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    req = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, body = await sim.post("/v1/completions", req)
    _, real_headers, real_body = captured("completions_stream_usage")
    assert status == 200 and headers["Content-Type"] == real_headers["content-type"]
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    got, real = sse_events(body), sse_events(real_body)
    assert len(got) == len(real) == 6 and got[-1] == real[-1] == "[DONE]"
    for a, b in zip(got[:-1], real[:-1]):
        same_shape(a, b)
    assert "".join(e["choices"][0]["text"] for e in got[:4]) == textgen.generate("Hello", 4)
    assert [e["choices"][0]["finish_reason"] for e in got[:4]] == [None, None, None, "length"]
    assert got[4]["choices"] == [] and got[4]["usage"] == {"prompt_tokens": 1, "total_tokens": 5, "completion_tokens": 4}
    assert len({e["id"] for e in got[:-1]}) == 1


async def test_completion_stream_without_usage_has_no_usage_event(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    _, _, body = await sim.post("/v1/completions", {**COMPLETION, "stream": True})
    got, real = sse_events(body), sse_events(captured("completions_stream")[2])
    assert len(got) == len(real) == 5
    for a, b in zip(got[:-1], real[:-1]):
        same_shape(a, b)


async def test_chat_stream_with_usage_matches_real_vllm(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    _, _, body = await sim.post("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    got, real = sse_events(body), sse_events(captured("chat_stream_usage")[2])
    assert len(got) == len(real) == 7
    for a, b in zip(got[:-1], real[:-1]):
        same_shape(a, b)
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"]["content"] for e in got[1:5]) == textgen.generate("user: hi", 4)
    assert got[4]["choices"][0]["finish_reason"] == "length" and got[5]["choices"] == []


async def test_models_health_version_match_real_vllm(make_sim) -> None:
    sim = await make_sim(model="/models/tiny", served_model_names=("tiny",), max_model_len=512)
    status, _, body = await sim.get("/v1/models")
    got, real = orjson.loads(body), orjson.loads(captured("models")[2])
    assert status == 200
    same_shape(got, real)
    card = got["data"][0]
    assert (card["id"], card["root"], card["owned_by"], card["max_model_len"]) == ("tiny", "/models/tiny", "vllm", 512)
    status, headers, body = await sim.get("/health")
    assert status == 200 and body == b"" and "Content-Type" not in headers
    assert captured("health")[2] == b""
    status, _, body = await sim.get("/version")
    assert body == captured("version")[2]


async def test_errors_match_real_vllm(make_sim) -> None:
    sim = await make_sim(model="/models/tiny", served_model_names=("tiny",), max_model_len=512)
    cases = [
        ("error_unknown_model", {"model": "nope", "prompt": "Hello", "max_tokens": 4}, None),
        ("error_unknown_model_stream", {"model": "nope", "prompt": "Hello", "max_tokens": 4, "stream": True}, None),
        ("error_max_tokens_too_large", {"model": "tiny", "prompt": "Hello", "max_tokens": 100000}, None),
        ("error_invalid_json", None, b'{"model": "tiny", '),
        ("error_body_not_object", None, b"[1, 2]"),
        ("error_bad_type", {"model": "tiny", "prompt": "Hello", "max_tokens": "many"}, None),
    ]
    for name, body, raw in cases:
        status, headers, got = await sim.post("/v1/completions", body, raw)
        real_status, _, real = captured(name)
        assert status == real_status, name
        g, r = orjson.loads(got)["error"], orjson.loads(real)["error"]
        assert (g["type"], g["param"], g["code"]) == (r["type"], r["param"], r["code"]), name
        assert headers["Content-Type"] == "application/json"
        if name != "error_invalid_json":  # the JSON decoder's own words differ
            assert g["message"] == r["message"], name
    # A stream that fails validation is a JSON error, never a 200 stream.
    status, _, got = await sim.post("/v1/chat/completions", {**CHAT, "max_tokens": 100000, "stream": True})
    assert status == 400 and got == captured("error_max_tokens_too_large_stream")[2]
    status, _, got = await sim.get("/v1/nothing")
    assert status == 404 and got == captured("error_unknown_route")[2]
    status, headers, got = await sim.get("/v1/completions")
    assert status == 405 and got == captured("error_wrong_method")[2] and headers["Allow"] == "POST"
    # Prompt plus output beyond the context (each alone fits) is a 400 too.
    status, _, got = await sim.post("/v1/completions", {"prompt": "a b c", "max_tokens": 511})
    assert status == 400 and orjson.loads(got)["error"]["type"] == "BadRequestError"


async def test_no_model_field_uses_the_served_model(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    status, _, body = await sim.post("/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and orjson.loads(body)["model"] == "tiny"
    same_shape(orjson.loads(body), orjson.loads(captured("no_model_field")[2]))


async def test_served_model_names_and_generation_options(make_sim) -> None:
    sim = await make_sim(model="org/m", served_model_names=("a", "b"))
    _, _, body = await sim.get("/v1/models")
    assert [c["id"] for c in orjson.loads(body)["data"]] == ["a", "b"]
    for name in ("a", "b"):
        status, _, body = await sim.post("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1})
        assert status == 200 and orjson.loads(body)["model"] == name
    status, _, body = await sim.post("/v1/completions", {"model": "org/m", "prompt": "x", "max_tokens": 1})
    assert status == 404 and "Valid aliases: a, b." in orjson.loads(body)["error"]["message"]
    # n, stop, echo, a list of prompts
    status, _, body = await sim.post("/v1/completions", {"model": "a", "prompt": ["p q", "r"], "n": 2, "max_tokens": 3})
    got = orjson.loads(body)
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in got["choices"]] == [textgen.generate("p q", 3, 0), textgen.generate("p q", 3, 1),
                                                   textgen.generate("r", 3, 0), textgen.generate("r", 3, 1)]
    assert got["usage"] == {**got["usage"], "prompt_tokens": 3, "completion_tokens": 12}
    full = textgen.generate("Hello", 6)  # " charlie delta echo foxtrot golf hotel"
    status, _, body = await sim.post("/v1/completions", {"model": "a", "prompt": "Hello", "max_tokens": 6, "stop": ["fox", "zzz"]})
    c = orjson.loads(body)["choices"][0]
    assert (c["text"], c["finish_reason"], c["stop_reason"]) == (full[:full.index("fox")], "stop", "fox")
    status, _, body = await sim.post("/v1/completions", {"model": "a", "prompt": "Hello", "max_tokens": 2, "echo": True})
    assert orjson.loads(body)["choices"][0]["text"] == "Hello" + textgen.generate("Hello", 2)
    status, _, body = await sim.post("/v1/completions", {"model": "a", "prompt": "Hello"})
    assert orjson.loads(body)["usage"]["completion_tokens"] == 4096 - 1  # default: the context left
    status, _, body = await sim.post("/v1/completions", {"model": "a", "prompt": "Hello", "stream_options": {"include_usage": True}})
    assert status == 400 and orjson.loads(body)["error"]["param"] == "stream_options"


# ---------------------------------------------------------------- SGLang
async def test_sglang_shapes_and_native_endpoints(make_sim) -> None:
    sim = await make_sim("sglang", model="org/qwen", served_model_names=("qwen",), max_model_len=1024)
    _, _, body = await sim.get("/v1/models")
    card = orjson.loads(body)["data"][0]
    assert (card["id"], card["owned_by"], card["root"], card["max_model_len"]) == ("qwen", "sglang", "org/qwen", 1024)
    # SGLang serves whatever `model` a request names.
    status, _, body = await sim.post("/v1/completions", {"model": "anything", "prompt": "Hello", "max_tokens": 2, "stop": "delta"})
    got = orjson.loads(body)
    assert status == 200 and list(got) == ["id", "object", "created", "model", "choices", "usage"]
    assert got["choices"][0] == {"index": 0, "text": " charlie ", "logprobs": None, "finish_reason": "stop", "matched_stop": "delta"}
    status, _, body = await sim.post("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[0]["usage"] is None
    assert [e["choices"][0]["matched_stop"] for e in events[1:5]] == [None] * 4
    assert events[4]["choices"][0]["finish_reason"] == "length" and events[5]["choices"] == [] and events[6] == "[DONE]"
    status, _, body = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 5000})
    assert status == 400 and orjson.loads(body)["error"]["type"] == "BadRequestError"
    _, _, body = await sim.get("/get_server_info")
    info = orjson.loads(body)
    assert info["model_path"] == "org/qwen" and info["served_model_name"] == "qwen" and info["context_length"] == 1024
    status, _, _ = await sim.get("/health_generate")
    assert status == 200
    for path in ("/sleep", "/wake_up", "/is_sleeping"):
        status, _, _ = await sim.post(path, {})
        assert status in (404, 405), path


async def test_sglang_release_and_resume(make_sim) -> None:
    sim = await make_sim("sglang", model="m", itl_ms=30)
    status, _, body = await sim.post("/release_memory_occupation", raw=b"not json")
    assert status == 400
    # Refused while a request runs (SGLang requires an idle server).
    stream = asyncio.ensure_future(sim.post("/v1/completions", {"prompt": "x", "max_tokens": 10}))
    await wait_for_async(lambda: _running(sim))
    status, _, body = await sim.post("/release_memory_occupation", {})
    assert status == 400 and "idle" in orjson.loads(body)["error"]["message"]
    assert (await stream)[0] == 200
    status, _, body = await sim.post("/release_memory_occupation", {"tags": ["weights", "kv_cache"]})
    assert status == 200 and body == b"null"
    status, _, body = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 500 and "resume_memory_occupation" in orjson.loads(body)["error"]["message"]
    assert (await sim.get("/health"))[0] == 200 and (await sim.get("/health_generate"))[0] == 503
    status, _, body = await sim.post("/resume_memory_occupation", {})
    assert status == 200 and body == b"null"
    assert (await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] == 200
    assert await sim.metric("sim_sleep_calls_total") == 2 and await sim.metric("sim_wake_calls_total") == 1


async def _running(sim: Sim) -> bool:
    return sim.engine.counters.running == 1


async def under_way(sim: Sim) -> None:
    """Until the one running stream has sent a token."""
    before = sim.engine.counters.generation_tokens
    await wait_for_async(lambda: sim.engine.counters.running == 1 and sim.engine.counters.generation_tokens > before,
                         what="a token of the running stream")


# ------------------------------------------------------------- vLLM sleep
async def test_vllm_sleep_holds_requests_until_wake(make_sim) -> None:
    sim = await make_sim(served_model_names=("tiny",))
    assert (await sim.get("/is_sleeping"))[2] == b'{"is_sleeping":false}'
    status, _, body = await sim.post("/sleep?level=1", raw=b"")
    assert status == 200 and body == captured("sleep")[2]
    assert (await sim.get("/is_sleeping"))[2] == captured("is_sleeping_asleep")[2]
    assert (await sim.get("/health"))[0] == 200 and (await sim.get("/v1/models"))[0] == 200
    assert await sim.metric('vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="weights_offloaded"}') == 1
    held = asyncio.ensure_future(sim.post("/v1/completions", COMPLETION))
    await asyncio.sleep(0.3)
    assert not held.done()
    # Like real vLLM: a held request is neither running nor waiting.
    assert await sim.metric("vllm:num_requests_waiting") == 0 and await sim.metric("vllm:num_requests_running") == 0
    status, _, body = await sim.post("/wake_up", raw=b"")
    assert status == 200 and body == captured("wake_up")[2]
    status, _, body = await asyncio.wait_for(held, 2)
    assert status == 200 and orjson.loads(body)["choices"][0]["text"] == textgen.generate("Hello", 4)
    assert await sim.metric("sim_sleep_calls_total") == 1 and await sim.metric("sim_wake_calls_total") == 1
    status, _, body = await sim.post("/sleep?level=2&mode=abort", raw=b"")
    assert body == captured("sleep_level2_mode_abort")[2]
    # Waking only the weights leaves the engine asleep; the KV cache then wakes it.
    assert (await sim.post("/wake_up?tags=weights", raw=b""))[2] == b'{"status":"sleeping","tags":["weights"]}'
    assert (await sim.get("/is_sleeping"))[2] == b'{"is_sleeping":true}'
    assert (await sim.post("/wake_up?tags=kv_cache", raw=b""))[2] == b'{"status":"awake","tags":["kv_cache"]}'
    assert (await sim.get("/is_sleeping"))[2] == b'{"is_sleeping":false}'
    for query, case in (("level=3", "sleep_bad_level"), ("mode=bogus", "sleep_bad_mode")):
        status, _, body = await sim.post(f"/sleep?{query}", raw=b"")
        assert status == 400 and body == captured(case)[2]


async def test_sleep_modes_abort_wait_keep(make_sim) -> None:
    sim = await make_sim(itl_ms=20)
    req = {"prompt": "Hello", "max_tokens": 15, "stream": True}
    # abort (default): running streams end at once with finish_reason "abort", then [DONE].
    stream = asyncio.ensure_future(sim.post("/v1/completions", req))
    await under_way(sim)
    await sim.post("/sleep", raw=b"")
    events = sse_events((await asyncio.wait_for(stream, 2))[2])
    assert events[-1] == "[DONE]" and events[-2]["choices"][0] == {**events[-2]["choices"][0], "text": "", "finish_reason": "abort"}
    assert len(events) < 15
    await sim.post("/wake_up", raw=b"")
    # abort cuts a non-streaming request too: the tokens made so far, finish_reason "abort".
    plain = asyncio.ensure_future(sim.post("/v1/completions", {**req, "stream": False}))
    await wait_for_async(lambda: _running(sim))
    await asyncio.sleep(0.15)  # a non-streamed answer shows no progress: let a few tokens' time pass
    await sim.post("/sleep", raw=b"")
    choice = orjson.loads((await asyncio.wait_for(plain, 2))[2])["choices"][0]
    assert choice["finish_reason"] == "abort" and 2 <= len(choice["text"].split()) < 15
    assert textgen.generate("Hello", 15).startswith(choice["text"])
    await sim.post("/wake_up", raw=b"")
    # wait: /sleep answers only after the running stream finished normally.
    stream = asyncio.ensure_future(sim.post("/v1/completions", req))
    await under_way(sim)
    t0 = time.monotonic()
    await sim.post("/sleep?mode=wait", raw=b"")
    assert stream.done() and time.monotonic() - t0 > 0.1
    events = sse_events(stream.result()[2])
    assert len(events) == 16 and events[-2]["choices"][0]["finish_reason"] == "length"
    await sim.post("/wake_up", raw=b"")
    # keep: the stream pauses while asleep and resumes on wake.
    stream = asyncio.ensure_future(sim.post("/v1/completions", req))
    await under_way(sim)
    await sim.post("/sleep?mode=keep", raw=b"")
    await asyncio.sleep(0.4)
    assert not stream.done()
    await sim.post("/wake_up", raw=b"")
    events = sse_events((await asyncio.wait_for(stream, 2))[2])
    assert len(events) == 16 and events[-2]["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------ disconnects, queue
async def _read_some_then_close(url: str, body: dict[str, Any], chunks: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as r:
            for _ in range(chunks):
                await r.content.readline()


async def test_disconnect_mid_stream_stops_generation(make_sim) -> None:
    sim = await make_sim(itl_ms=30)
    await _read_some_then_close(sim.url + "/v1/completions", {"prompt": "x", "max_tokens": 100, "stream": True}, 4)
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 1))
    tokens = await sim.metric("vllm:generation_tokens_total")
    await asyncio.sleep(0.2)
    assert tokens < 10 and await sim.metric("vllm:generation_tokens_total") == tokens
    assert await sim.metric("vllm:num_requests_running") == 0


async def _metric_is(sim: Sim, name: str, value: float) -> bool:
    return await sim.metric(name) == value


async def test_disconnects_while_queued_held_or_non_streaming_are_counted(make_sim) -> None:
    sim = await make_sim(itl_ms=50, max_concurrency=1)
    body = {"prompt": "x", "max_tokens": 20}
    running = asyncio.ensure_future(sim.post("/v1/completions", body))
    await wait_for_async(lambda: _running(sim))
    queued = asyncio.ensure_future(sim.post("/v1/completions", body))
    await wait_for_async(lambda: _metric_is(sim, "vllm:num_requests_waiting", 1))
    queued.cancel()
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 1))
    assert await sim.metric("vllm:num_requests_waiting") == 0
    running.cancel()  # a non-streaming request abandoned mid-generation
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 2))
    await sim.post("/sleep", raw=b"")
    held = asyncio.ensure_future(sim.post("/v1/completions", body))
    await wait_for_async(lambda: _metric_is(sim, "sim_requests_total", 3), what="the held request to arrive")
    held.cancel()
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 3))
    assert await sim.metric("sim_requests_total") == 3


async def test_max_concurrency_queues_beyond_the_limit(make_sim) -> None:
    sim = await make_sim(ttft_ms=200, max_concurrency=2)
    t0 = time.monotonic()
    results = await asyncio.gather(*(sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1}) for _ in range(4)))
    assert all(r[0] == 200 for r in results)
    assert time.monotonic() - t0 >= 0.39  # two rounds of 200 ms


# ------------------------------------------------------------ HTTP framing
async def test_keep_alive_pipelining_and_chunked_framing(make_sim) -> None:
    sim = await make_sim()
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.engine.port)
    one = orjson.dumps({"prompt": "a", "max_tokens": 2})
    two = orjson.dumps({"prompt": "b", "max_tokens": 2, "stream": True})
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
                 b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(one), one, len(two), two))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" not in head
    length = int(re.search(rb"content-length: (\d+)", head).group(1))
    assert orjson.loads(await reader.readexactly(length))["choices"][0]["text"] == textgen.generate("a", 2)
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            break
        body += data[:-2]
    assert sse_events(body)[-1] == "[DONE]"
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # the connection is still usable
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(one))
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(one)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(re.search(rb"content-length: (\d+)", head).group(1)))
    writer.write(b"BOGUS\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()


async def test_a_body_over_the_limit_gets_one_413_and_never_reaches_the_engine(make_sim, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_http, "MAX_BODY", 10)
    sim = await make_sim()
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.engine.port)
    body = orjson.dumps({"prompt": "a long enough prompt", "max_tokens": 2})
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1") == 1
    await asyncio.sleep(0.1)
    assert sim.engine.counters.requests == 0  # the truncated body was not handled as a request


# ------------------------------------------------------------------ faults
async def test_fail_rate(make_sim) -> None:
    sim = await make_sim(fail_rate=1.0)
    status, _, body = await sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "stream": True})
    assert status == 500 and orjson.loads(body)["error"]["type"] == "InternalServerError"
    assert (await sim.get("/health"))[0] == 200
    half = await make_sim(fail_rate=0.5, seed=7)
    statuses = [(await half.post("/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] for _ in range(40)]
    assert set(statuses) == {200, 500} and 8 <= statuses.count(500) <= 32
    again = await make_sim(fail_rate=0.5, seed=7)
    assert statuses == [(await again.post("/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] for _ in range(40)]


async def test_stall_after(make_sim) -> None:
    sim = await make_sim(stall_after=3)
    async with aiohttp.ClientSession() as http:
        async with http.post(sim.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = [await r.content.readline() for _ in range(6)]  # 3 events, each followed by a blank line
            assert [ln.startswith(b"data: {") for ln in lines[::2]] == [True] * 3
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.content.readline(), 0.4)
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 1))


async def test_hang(make_sim) -> None:
    sim = await make_sim(hang=True)
    request = asyncio.ensure_future(sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1}))
    await asyncio.sleep(0.4)
    assert not request.done()
    assert (await sim.get("/health"))[0] == 200  # the server still answers everything else
    request.cancel()
    await wait_for_async(lambda: _metric_is(sim, "sim_client_disconnects_total", 1))


# --------------------------------------------------------- the CLI process
def test_options_take_engine_flags_and_ignore_the_rest() -> None:
    o = parse_options(["--engine", "vllm", "--model", "org/m", "--port=1234", "--gpu-memory-utilization", "0.5",
                       "--served-model-name", "a", "b", "--trust-remote-code", "--max-model-len=512",
                       "--max-num-seqs", "8", "--itl-ms", "3"])
    assert (o.engine, o.model, o.port, o.served_model_names, o.max_model_len, o.max_concurrency, o.itl_ms) == \
        ("vllm", "org/m", 1234, ("a", "b"), 512, 8, 3.0)
    assert o.ignored_args == ("--gpu-memory-utilization", "0.5", "--trust-remote-code")
    o = parse_options(["--engine", "SGL", "--model-path", "q", "--context-length", "2048", "--mem-fraction-static", "0.4"])
    assert (o.engine, o.model, o.max_model_len, o.port) == ("sglang", "q", 2048, 30000)
    o = parse_options(["--engine", "vllm", "--model", "m", "--max-num-seqs", "8", "--max-concurrency", "0"])
    assert o.max_concurrency == 0


@pytest.mark.parametrize("text, length", [("512", 512), ("32k", 32000), ("25.6k", 25600), ("32K", 32768),
                                          ("1m", 1000000), ("auto", 4096), ("-1", 4096)])
def test_max_model_len_is_read_as_vllm_reads_it(text: str, length: int) -> None:
    assert parse_options(["--engine", "vllm", "--model", "m", "--max-model-len", text]).max_model_len == length


def test_vllm_takes_its_key_from_vllm_api_key_when_no_flag_gives_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "k-env")
    assert parse_options(["--engine", "vllm", "--model", "m"]).api_key == "k-env"
    assert parse_options(["--engine", "vllm", "--model", "m", "--api-key", "k-flag"]).api_key == "k-flag"
    assert parse_options(["--engine", "sglang", "--model", "m"]).api_key == ""


def test_bad_cli_values_exit_2_with_a_message() -> None:
    for args, words in ((["--engine", "tgi", "--model", "m"], "--engine"),
                        (["--engine", "vllm", "--model", "m", "--fail-rate", "2"], "--fail-rate"),
                        (["--engine", "vllm"], "--model"),
                        (["--engine", "vllm", "--model", "m", "--max-model-len", "1.5K"], "--max-model-len")):
        r = subprocess.run([PY, "-m", "router.sim", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_process_startup_delay_unknown_args_and_die_after(procs: list[Proc], tmp_path: Path) -> None:
    port = free_port()
    log = str(tmp_path / "sim.log")
    proc = Proc([PY, "-m", "router.sim", "--engine", "vllm", "--model", "m", "--port", str(port),
                 "--startup-s", "1.0", "--die-after", "2", "--itl-ms", "20", "--dtype", "half",
                 "--gpu-memory-utilization", "0.5"], log=log)
    procs.append(proc)
    t0 = time.monotonic()
    time.sleep(0.5)
    assert refused(port)  # still "loading the model": nothing listens yet
    wait_http(f"http://127.0.0.1:{port}/health", timeout=10)
    assert time.monotonic() - t0 >= 1.0
    assert "ignoring engine arguments the simulator does not model: --dtype half --gpu-memory-utilization 0.5" in open(log).read()

    def stream() -> tuple[bytes, Optional[BaseException]]:
        got, err = b"", None
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            body = orjson.dumps({"prompt": "x", "max_tokens": 20, "stream": True})
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            while chunk := s.recv(65536):
                got += chunk
                if got.endswith(b"0\r\n\r\n"):
                    break
        except OSError as e:
            err = e
        return got, err

    first, err = stream()
    assert err is None and first.count(b"data: ") == 21  # request 1 completes
    second, _ = stream()
    assert second.count(b"data: {") == 1 and b"[DONE]" not in second  # request 2: cut after one token
    assert proc.p.wait(5) == 1


# ------------------------------------------------- any OpenAI server (openai)
async def test_openai_dialect_serves_the_plain_openai_api(make_sim) -> None:
    sim = await make_sim(engine="openai")
    status, _, body = await sim.get("/v1/models")
    assert status == 200
    assert orjson.loads(body)["data"] == [{"id": "tiny", "object": "model", "created": sim.engine.created, "owned_by": "system"}]
    status, _, body = await sim.post("/v1/chat/completions", CHAT)
    chat = orjson.loads(body)
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == textgen.generate(textgen.chat_prompt(CHAT["messages"]), 4)
    status, _, body = await sim.post("/v1/completions", {**COMPLETION, "stream": True})
    events = sse_events(body)
    assert status == 200 and events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == \
        textgen.generate("Hello", 4)
    status, _, _ = await sim.post("/v1/completions", {**COMPLETION, "model": "other"})
    assert status == 404
    for path in ("/sleep", "/wake_up", "/release_memory_occupation"):
        assert (await sim.post(path, {}))[0] == 404  # no sleep API
    _, _, metrics = await sim.get("/metrics")
    assert b"sim:num_requests_running" in metrics and b"vllm:" not in metrics


async def test_openai_embeddings_are_unit_vectors_of_the_input(make_sim) -> None:
    sim = await make_sim(engine="openai")
    status, _, body = await sim.post("/v1/embeddings", {"model": "tiny", "input": ["a b", "c"]})
    answer = orjson.loads(body)
    assert status == 200 and list(answer) == ["object", "model", "data", "usage"]
    assert [d["index"] for d in answer["data"]] == [0, 1] and answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    first = answer["data"][0]["embedding"]
    assert first == pytest.approx(textgen.embedding("a b")) and len(first) == textgen.EMBEDDING_DIMS
    assert sum(x * x for x in first) == pytest.approx(1.0)
    _, _, body = await sim.post("/v1/embeddings", {"input": "a", "dimensions": 4})
    assert len(orjson.loads(body)["data"][0]["embedding"]) == 4
    status, _, body = await sim.post("/v1/embeddings", {"input": {"no": "text"}})
    assert status == 400 and orjson.loads(body)["error"]["param"] == "input"
    vllm = await make_sim(engine="vllm")
    assert (await vllm.post("/v1/embeddings", {"input": "a"}))[0] == 404  # served by the openai dialect only


async def test_health_path_moves_the_health_check_but_never_hides_a_route(make_sim) -> None:
    sim = await make_sim(engine="openai", health_path="/ready")
    assert (await sim.get("/ready"))[0] == 200 and (await sim.get("/health"))[0] == 404
    sim = await make_sim(engine="openai", health_path="/v1/models")
    status, _, body = await sim.get("/v1/models")
    assert status == 200 and orjson.loads(body)["data"][0]["id"] == "tiny"


def test_openai_options_need_a_port_and_take_a_health_path() -> None:
    o = parse_options(["--engine", "openai", "--model", "m", "--port", "5", "--health-path", "/ready"])
    assert (o.engine, o.port, o.health_path) == ("openai", 5, "/ready")
    assert parse_options(["--engine", "vllm", "--model", "m"]).health_path == "/health"
    for args, words in ((["--engine", "openai", "--model", "m"], "--port is required"),
                        (["--engine", "openai", "--model", "m", "--port", "5", "--health-path", "ready"], "--health-path")):
        r = subprocess.run([PY, "-m", "router.sim", *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
