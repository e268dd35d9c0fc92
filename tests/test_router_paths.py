"""The whole client API surface through the router, against the simulated engines.

Every client path each engine's module lists is sent through the router and
straight to the engine, and must come back alike (status, content type, the
answer's fields). Then what only the router does: stored responses pinned to
the replica that made them, Anthropic-shaped router errors and x-api-key, the
model field of a multipart audio upload rewritten to the served name, the
404s naming who serves a path, and /upstream.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import anthropic
import openai
import pytest
import yaml
from helpers import free_port
from router_support import LoopThread, RouterServer, loop  # noqa: F401  (fixture)

from router.config import load_config
from router.engines import ENGINES
from router.sim import SimEngine, SimOptions

MESSAGES = [{"role": "user", "content": "hello there"}]


def body_for(path: str, model: str) -> dict[str, Any]:
    """A small valid request for `path`, as a client of that API would send it."""
    if path.endswith("/messages") or path.endswith("/count_tokens"):
        return {"model": model, "max_tokens": 8, "messages": MESSAGES}
    if path.endswith("/batch"):
        return {"model": model, "max_tokens": 4, "messages": [MESSAGES, MESSAGES]}
    if "chat" in path or path == "/invocations":
        return {"model": model, "max_tokens": 4, "messages": MESSAGES}
    if path.endswith("/responses"):
        return {"model": model, "input": "hello there", "max_output_tokens": 4}
    if path.endswith("/detokenize"):
        return {"model": model, "tokens": [1, 2, 3]}
    if path.endswith("/tokenize") or path.endswith("/completions"):
        return {"model": model, "prompt": "hello there", "max_tokens": 4}
    if "score" in path:
        return {"model": model, "text_1": "a", "text_2": "b"}
    if "rerank" in path:
        return {"model": model, "query": "a", "documents": ["b", "c"]}
    return {"model": model, "input": "hello there"}


def form(model: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("model", model)
    data.add_field("file", b"RIFF....WAVEfmt fake audio bytes", filename="a.wav", content_type="audio/wav")
    return data


class Surface:
    """Simulated engines of each kind and a router over them, on one loop."""

    def __init__(self, loop: LoopThread, tmp: Path, router: Optional[dict[str, Any]] = None):
        self.loop = loop
        self.engines = {
            "v1": SimEngine(SimOptions(engine="vllm", model="org/vllm-model", port=0)),
            "v2": SimEngine(SimOptions(engine="vllm", model="org/vllm-model", port=0)),
            "sg": SimEngine(SimOptions(engine="sglang", model="org/sglang-model", port=0)),
            "oa": SimEngine(SimOptions(engine="openai", model="org/openai-model", port=free_port())),
        }
        for e in self.engines.values():
            loop.run(e.start())
        instances = [
            {"name": "v1", "model": "org/vllm-model", "engine": "vllm", "aliases": ["vl"]},
            {"name": "v2", "model": "org/vllm-model", "engine": "vllm"},
            {"name": "sg", "model": "org/sglang-model", "engine": "sglang", "aliases": ["sg"]},
            {"name": "oa", "model": "org/openai-model", "engine": "openai"},
        ]
        for inst in instances:
            key = "command" if inst["engine"] == "openai" else "engine_args"
            args = [f"--port={self.engines[inst['name']].port}"]
            inst.update({"launch": False, key: ["server", *args] if key == "command" else args})
        doc = {"router": {"router_port": free_port(), "access_log": False, **(router or {})}, "instances": instances}
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.router = RouterServer(loop, load_config(path, sim=True)).start()
        self.url = self.router.url

    def close(self) -> None:
        self.router.stop()
        for e in self.engines.values():
            self.loop.run(e.stop())

    def call(self, url: str, path: str, body: Any = None, method: str = "POST",
             headers: Optional[dict[str, str]] = None) -> tuple[int, str, Any]:
        async def go() -> tuple[int, str, Any]:
            async with aiohttp.ClientSession() as s:
                kw: dict[str, Any] = {"data": body} if isinstance(body, aiohttp.FormData) else {"json": body}
                async with s.request(method, url + path, headers=headers, **kw) as r:
                    raw = await r.read()
                    kind = r.content_type
                    if kind == "application/json":
                        return r.status, kind, json.loads(raw)
                    return r.status, kind, raw.decode()
        return self.loop.run(go())


@pytest.fixture
def surface(loop: LoopThread, tmp_path: Path) -> Iterator[Surface]:
    s = Surface(loop, tmp_path)
    yield s
    s.close()


def shape(value: Any) -> Any:
    """Field names and types, not values: ids, times and text differ between two calls."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def sse_kinds(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("event:")]


@pytest.mark.parametrize("engine, model", [("vllm", "org/vllm-model"), ("sglang", "org/sglang-model"),
                                           ("openai", "org/openai-model")])
def test_every_client_path_answers_as_the_engine_does(surface: Surface, engine: str, model: str) -> None:
    direct = surface.engines["v1" if engine == "vllm" else "sg" if engine == "sglang" else "oa"].url
    for path in ENGINES[engine].client_paths:
        body: Any = form(model) if "/audio/" in path else body_for(path, model)
        via = surface.call(surface.url, path, body)
        body = form(model) if "/audio/" in path else body
        same = surface.call(direct, path, body)
        assert via[0] == same[0] and via[1] == same[1], (path, via, same)
        if via[1] == "application/json":
            assert shape(via[2]) == shape(same[2]), path
        elif via[1] == "text/event-stream":
            assert sse_kinds(via[2]) == sse_kinds(same[2]), path


def test_streams_on_every_streaming_path(surface: Surface) -> None:
    for path, body in (("/v1/responses", body_for("/v1/responses", "vl")),
                       ("/v1/messages", body_for("/v1/messages", "vl")),
                       ("/v1/chat/completions", body_for("/v1/chat/completions", "vl"))):
        status, kind, text = surface.call(surface.url, path, {**body, "stream": True})
        assert status == 200 and kind == "text/event-stream", (path, text)
        assert "data:" in text and ("[DONE]" in text or "message_stop" in text or "response.completed" in text)


def test_an_alias_is_rewritten_on_every_path_kind(surface: Surface) -> None:
    status, _, tokens = surface.call(surface.url, "/tokenize", {"model": "vl", "prompt": "hello there"})
    assert status == 200 and tokens["tokens"]
    status, _, text = surface.call(surface.url, "/v1/audio/transcriptions", form("vl"))
    direct = surface.call(surface.engines["v1"].url, "/v1/audio/transcriptions", form("org/vllm-model"))
    assert status == 200 == direct[0] and text["text"] == direct[2]["text"]


def test_paths_a_model_or_every_engine_does_not_serve_are_404s_that_say_so(surface: Surface) -> None:
    status, _, err = surface.call(surface.url, "/tokenize", {"model": "org/openai-model", "prompt": "x"})
    message = err["error"]["message"]
    assert status == 404 and "does not serve /tokenize" in message and "org/vllm-model" in message
    assert "org/sglang-model" in message and "org/openai-model, " not in message


def test_a_path_no_configured_engine_serves(loop: LoopThread, tmp_path: Path) -> None:
    oa = SimEngine(SimOptions(engine="openai", model="m", port=free_port()))
    loop.run(oa.start())
    doc = {"router": {"router_port": free_port(), "access_log": False},
           "instances": [{"model": "m", "engine": "openai", "launch": False, "port": oa.port}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    r = RouterServer(loop, load_config(tmp_path / "c.yaml", sim=True)).start()
    try:
        s = Surface.__new__(Surface)
        s.loop = loop
        status, _, err = s.call(r.url, "/tokenize", {"model": "m", "prompt": "x"})
        assert status == 404 and "No configured engine serves /tokenize" in err["error"]["message"]
        status, _, err = s.call(r.url, "/v1/messages", body_for("/v1/messages", "m"))
        assert status == 404 and err["type"] == "error" and err["error"]["type"] == "not_found_error"
    finally:
        r.stop()
        loop.run(oa.stop())


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_stored_responses_go_back_to_the_replica_that_made_them(loop: LoopThread, tmp_path: Path,
                                                                 workers: int) -> None:
    surface = Surface(loop, tmp_path, router={"workers": workers})
    try:
        stored_responses_go_back_to_the_replica_that_made_them(surface)
    finally:
        surface.close()


def stored_responses_go_back_to_the_replica_that_made_them(surface: Surface) -> None:
    # A new connection for each request: with proxy workers the kernel spreads them over both, so a
    # follow-up often reaches a worker other than the one that relayed the response it names.
    client = openai.OpenAI(base_url=surface.url + "/v1", api_key="x", max_retries=0,
                           default_headers={"connection": "close"})
    first = client.responses.create(model="org/vllm-model", input="hello", max_output_tokens=4)
    maker = [n for n in ("v1", "v2") if surface.engines[n].counters.requests == 1]
    assert len(maker) == 1
    # Ten follow-ups and retrievals, all on the replica that holds the response (the other would 404).
    for _ in range(5):
        follow = client.responses.create(model="org/vllm-model", input="and then", max_output_tokens=4,
                                         previous_response_id=first.id)
        assert client.responses.retrieve(follow.id).id == follow.id
        assert client.responses.retrieve(first.id).id == first.id
    other = "v2" if maker == ["v1"] else "v1"
    assert surface.engines[other].counters.requests == 0
    streamed = client.responses.create(model="org/vllm-model", input="hi", max_output_tokens=4, stream=True)
    created = next(e for e in streamed if e.type == "response.created")
    for _ in streamed:
        pass
    assert client.responses.retrieve(created.response.id).id == created.response.id
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve("resp_unknown")
    assert "not known to this router" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="org/vllm-model", input="x", previous_response_id="resp_unknown")


def test_anthropic_sdk_with_router_keys_and_anthropic_shaped_errors(loop: LoopThread, tmp_path: Path) -> None:
    s = Surface(loop, tmp_path, router={"api_keys": ["client-key"]})
    try:
        client = anthropic.Anthropic(base_url=s.url, api_key="client-key", max_retries=0)
        msg = client.messages.create(model="vl", max_tokens=8, messages=MESSAGES)
        assert msg.type == "message" and msg.content[0].text
        with client.messages.stream(model="vl", max_tokens=8, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
        assert text
        assert client.messages.count_tokens(model="vl", messages=MESSAGES).input_tokens > 0
        wrong = anthropic.Anthropic(base_url=s.url, api_key="wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.create(model="vl", max_tokens=8, messages=MESSAGES)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.NotFoundError) as nf:
            client.messages.create(model="no-such", max_tokens=8, messages=MESSAGES)
        assert nf.value.body["error"]["type"] == "not_found_error" and "no-such" in nf.value.body["error"]["message"]
        # The OpenAI paths keep the OpenAI shape and do not take x-api-key.
        status, _, err = s.call(s.url, "/v1/completions", body_for("/v1/completions", "vl"),
                                headers={"x-api-key": "client-key"})
        assert status == 401 and "error" in err and "type" not in err
    finally:
        s.close()


def test_upstream_reaches_one_replica_raw_and_is_admin_only(loop: LoopThread, tmp_path: Path) -> None:
    s = Surface(loop, tmp_path)
    try:
        status, _, answer = s.call(s.url, "/upstream/org/vllm-model/is_sleeping", method="GET")
        assert status == 200 and answer == {"is_sleeping": False}
        for name in ("org/sglang-model", "sg"):  # a model name with a slash, or an alias
            status, _, answer = s.call(s.url, f"/upstream/{name}/get_server_info", method="GET")
            assert status == 200 and "internal_states" in answer
        status, _, err = s.call(s.url, "/upstream/nope/x", method="GET")
        assert status == 404 and "No model is named" in err["error"]["message"]
    finally:
        s.close()
    keyed = Surface(loop, tmp_path, router={"admin_api_key": "admin"})
    try:
        assert keyed.call(keyed.url, "/upstream/org/vllm-model/is_sleeping", method="GET")[0] == 401
        assert keyed.call(keyed.url, "/upstream/org/vllm-model/is_sleeping", method="GET",
                          headers={"Authorization": "Bearer admin"})[0] == 200
    finally:
        keyed.close()


def test_an_openai_engine_is_health_checked_on_its_own_health_path(loop: LoopThread, tmp_path: Path) -> None:
    oa = SimEngine(SimOptions(engine="openai", model="m", port=free_port(), health_path="/ready"))
    on = SimEngine(SimOptions(engine="openai", model="n", port=free_port(), health_path="/ready"))
    loop.run(oa.start())
    loop.run(on.start())
    doc = {"router": {"router_port": free_port(), "access_log": False},
           "instances": [{"name": "good", "model": "m", "engine": "openai", "launch": False, "port": oa.port,
                          "health_path": "/ready"},
                         {"name": "wrong", "model": "n", "engine": "openai", "launch": False, "port": on.port,
                          "health_path": "/health"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    r = RouterServer(loop, load_config(tmp_path / "c.yaml", sim=True)).start()
    try:
        s = Surface.__new__(Surface)
        s.loop = loop
        _, _, health = s.call(r.url, "/health/all", method="GET")
        assert health["models"]["m"]["status"] == "healthy"
        assert health["models"]["n"]["status"] == "unhealthy"  # the sim answers its health on /ready only
        assert s.call(r.url, "/v1/chat/completions", body_for("/v1/chat/completions", "m"))[0] == 200
    finally:
        r.stop()
        loop.run(oa.stop())
        loop.run(on.stop())
