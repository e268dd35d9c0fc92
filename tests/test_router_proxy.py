"""The proxy routes through the real app on uvicorn, with the OpenAI SDK as client."""
from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import openai
import orjson
import pytest
from helpers import free_port, wait_for
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10)


def post(url: str, body: bytes, headers: Optional[dict[str, str]] = None, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def assert_error(status: int, body: bytes, expected: int, *words: str) -> dict[str, Any]:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"]
    return err


def test_completions_and_chat_with_the_sdk(stack: Stack) -> None:
    e = stack.engine(chunks=4)
    r = stack.router([instance("org/m1", e.port)])
    c = client(r.url)
    assert c.completions.create(model="org/m1", prompt="hi", max_tokens=3).choices[0].text == "hello world"
    chat = c.chat.completions.create(model="org/m1", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "hello world"
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="org/m1", prompt="hi", stream=True))
    assert text == "t0 t1 t2 t3 "
    deltas = [ch.choices[0].delta.content for ch in
              c.chat.completions.create(model="org/m1", messages=[{"role": "user", "content": "x"}], stream=True)]
    assert "".join(deltas) == "t0 t1 t2 t3 "
    emb = c.embeddings.create(model="org/m1", input="x")
    assert emb.data[0].embedding == [0.5, 0.25]


def test_body_untouched_when_served_and_rewritten_when_not(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("org/m1", e.port, "--served-model-name", "m1", "m1b", aliases=["alias1"])])
    raw = b'{ "model" : "m1b",  "prompt": "x", "extra_field": [1, 2.50] }'
    status, _, _ = post(r.url + "/v1/completions?foo=bar", raw, {"X-Custom": "kept"})
    assert status == 200
    assert e.bodies[-1] == raw  # byte for byte
    assert e.headers[-1]["X-Custom"] == "kept"
    for name in ("alias1", "org/m1"):
        status, _, body = post(r.url + "/v1/completions", orjson.dumps({"model": name, "prompt": "x", "n": 1}))
        assert status == 200
        assert orjson.loads(e.bodies[-1]) == {"model": "m1", "prompt": "x", "n": 1}


def test_engine_error_is_relayed_as_is(stack: Stack) -> None:
    e = stack.engine(behaviour="error400")
    r = stack.router([instance("m", e.port)])
    with pytest.raises(openai.BadRequestError) as info:
        client(r.url).completions.create(model="m", prompt="x", max_tokens=10**6)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "BadRequestError"  # the engine's own body, not ours
    with pytest.raises(openai.BadRequestError):
        client(r.url).completions.create(model="m", prompt="x", stream=True)


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["JSON object"]),
    (b'{"model": 3}', ["'model' is a int"]),
    (b'{"model": "m", "stream": "yes"}', ["'stream'"]),
    (b"[" * 100000 + b"]" * 100000, ["not valid JSON"]),
])
def test_bad_bodies_get_400(stack: Stack, body: bytes, words: list[str]) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    status, _, data = post(r.url + "/v1/chat/completions", body)
    assert_error(status, data, 400, *words)
    assert e.bodies == []


def test_a_body_without_model_goes_to_the_default_model(stack: Stack) -> None:
    """One model: it is the default. Several: router.default_model, else 400."""
    e1, e2 = stack.engine(), stack.engine()
    one = stack.router([instance("m", e1.port)])
    status, _, _ = post(one.url + "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert status == 200 and json.loads(e1.bodies[-1])["model"] == "m"  # the engine is told which model
    two = stack.router([instance("m", e1.port), instance("n", e2.port)])
    status, _, data = post(two.url + "/v1/chat/completions", b'{"prompt": "x"}')
    assert_error(status, data, 400, "'model' is missing", "router.default_model")
    chosen = stack.router([instance("m", e1.port), instance("n", e2.port)], default_model="n")
    status, _, _ = post(chosen.url + "/v1/completions", b'{"prompt": "x"}')
    assert status == 200 and json.loads(e2.bodies[-1])["model"] == "n"


def test_unknown_model_404_lists_known(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("org/m1", e.port, aliases=["a1"])])
    with pytest.raises(openai.NotFoundError) as info:
        client(r.url).completions.create(model="nope", prompt="x")
    msg = info.value.body["message"]
    assert "'nope'" in msg and "org/m1" in msg and "a1" in msg


def test_body_over_limit_413(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)], max_request_bytes=1000)
    status, _, data = post(r.url + "/v1/completions", orjson.dumps({"model": "m", "prompt": "x" * 2000}))
    assert_error(status, data, 413, "1000")
    assert e.bodies == []


def test_paths_and_methods(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    status, headers, data = post(r.url + "/v1/completions", None, method="GET")  # type: ignore[arg-type]
    assert_error(status, data, 405, "POST")
    assert headers["allow"] == "POST"
    status, _, data = post(r.url + "/nope/../x", b"{}")
    assert_error(status, data, 404)
    status, _, data = post(r.url + "/v1/models", b"{}")
    assert_error(status, data, 405)


def test_chunked_body_over_limit_is_cut_off_with_413(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)], max_request_bytes=10_000)
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b'{"model": "m", "prompt": "' + b"x" * 4000
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        for _ in range(3):  # 12 KB sent, the rest (megabytes) never is
            s.sendall(b"%x\r\n%s\r\n" % (4000, b"x" * 4000))
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b"10000 bytes" in head
    assert e.bodies == []


def test_model_name_cannot_inject_headers(stack: Stack) -> None:
    r = stack.router([instance("m", free_port())])
    status, headers, data = post(r.url + "/v1/completions", orjson.dumps({"model": "x\r\nSet-Cookie: a=b"}))
    err = assert_error(status, data, 404)
    assert "Set-Cookie: a=b" in err["message"] and "set-cookie" not in {k.lower() for k in headers}


def test_access_log_line_per_request(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)], access_log=True)
    assert post(r.url + "/v1/completions", b'{"model": "m"}')[0] == 200
    err: list[str] = []

    def logged() -> list[str]:  # lines are written in batches every 0.2 s
        err.append(capsys.readouterr().err)
        return [ln for ln in "".join(err).splitlines() if "router.access" in ln]
    lines = wait_for(logged, 3, "the access log line")
    assert len(lines) == 1 and " m single -> m 200 " in lines[0] and "ttfb=" in lines[0]


def test_upstream_connections_are_reused_and_survive_keepalive_expiry(stack: Stack) -> None:
    e = stack.engine(keepalive=0.3)
    r = stack.router([instance("m", e.port)])
    for _ in range(5):
        assert post(r.url + "/v1/completions", b'{"model": "m"}')[0] == 200
    assert len(e.peers) == 1  # one keep-alive connection served all five
    time.sleep(0.6)  # the engine closes the idle connection; the router must not reuse it
    assert post(r.url + "/v1/completions", b'{"model": "m"}')[0] == 200
    assert len(e.peers) == 2


def test_large_answer_relayed_whole(stack: Stack) -> None:
    e = stack.engine(behaviour="big")
    r = stack.router([instance("m", e.port)])
    status, headers, data = post(r.url + "/v1/completions", b'{"model": "m"}')
    assert status == 200 and int(headers["content-length"]) == len(data) > 2_000_000
    assert json.loads(data)["padding"] == "x" * 2_000_000


def test_reused_connection_closed_before_answering_is_retried(stack: Stack) -> None:
    """The keep-alive race: the engine closes an idle connection as the router reuses it."""
    port = free_port()
    seen = {"connections": 0, "answered": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            if not head.startswith(b"POST"):  # a health probe
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                continue
            if served:  # a later request on this connection: close it unanswered
                writer.close()
                return
            seen["connections"] += 1
            length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.startswith(b"content-length"))
            await reader.readexactly(length)
            body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))
            seen["answered"] += 1
            served += 1

    server = stack.loop.run(asyncio.start_server(handle, "127.0.0.1", port))
    try:
        r = stack.router([instance("m", port)])
        for _i in range(3):
            status, _, data = post(r.url + "/v1/completions", b'{"model": "m"}')
            assert (status, data) == (200, b'{"ok": true}')
        assert seen == {"connections": 3, "answered": 3}
    finally:
        server.close()
