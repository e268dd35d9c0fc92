"""Streaming relay: incremental delivery, disconnects, engine death and stalls."""
from __future__ import annotations

import http.client
import json
import socket
import time

import openai
from helpers import wait_for
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_proxy import client


def sse_events(url: str, body: dict, timeout: float = 10.0) -> tuple[int, dict[str, str], list[tuple[float, str]]]:
    """(status, headers, [(arrival time, data line)]) of one streamed request."""
    out = []
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        for raw in iter(r.readline, b""):
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                out.append((time.monotonic(), line[6:]))
        return r.status, {k.lower(): v for k, v in r.getheaders()}, out
    finally:
        conn.close()


def test_stream_is_incremental_and_carries_no_buffer_headers(stack: Stack) -> None:
    e = stack.engine(chunks=5, interval=0.2)
    r = stack.router([instance("m", e.port)])
    start = time.monotonic()
    status, headers, events = sse_events(r.url, {"model": "m", "prompt": "x", "stream": True})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert [d for _, d in events][-1] == "[DONE]" and len(events) == 6
    # The first chunk arrives long before the last one is even produced (0.8 s later).
    assert events[0][0] - start < 0.4
    assert e.chunk_times[-1] - events[0][0] > 0.6
    # Each chunk reaches the client within a short time of being produced.
    for produced, (arrived, _) in zip(e.chunk_times, events):
        assert arrived - produced < 0.15


def test_engine_request_id_is_relayed_on_streams_and_whole_answers(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    status, headers, events = sse_events(r.url, {"model": "m", "prompt": "x", "stream": True})
    assert status == 200 and events[-1][1] == "[DONE]"
    assert headers["x-request-id"] == "req-1"
    whole = client(r.url).completions.with_raw_response.create(model="m", prompt="x")
    assert whole.headers["x-request-id"] == "req-2"


def test_client_disconnect_cancels_upstream(stack: Stack) -> None:
    e = stack.engine(chunks=100, interval=0.1)
    r = stack.router([instance("m", e.port)])
    body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while b"data: " not in got:
            got += s.recv(65536)
    # The engine sees its client (the router) go away well before the 10 s generation ends.
    wait_for(lambda: e.disconnects == 1, 2.0)
    assert len(e.chunk_times) < 30
    model = r.app.state.table.get("m")
    wait_for(lambda: model.lifecycle.in_flight == 0 and model.replicas[0].outstanding == 0)
    assert r.app.state.traffic is not None


def test_client_disconnect_while_waiting_for_first_byte(stack: Stack) -> None:
    e = stack.engine(behaviour="hang")
    r = stack.router([instance("m", e.port)])
    body = json.dumps({"model": "m", "prompt": "x"}).encode()
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: len(e.bodies) == 1)
    backend = r.app.state.table.get("m").replicas[0]
    wait_for(lambda: backend.outstanding == 0, 2.0)


def test_engine_death_mid_stream_ends_with_error_event(stack: Stack) -> None:
    e = stack.engine(behaviour="die", chunks=10)
    # eject_seconds 0: the broken stream opens the replica's breaker for no time, so the second request goes too.
    r = stack.router([instance("m", e.port)], eject_seconds=0)
    start = time.monotonic()
    status, _, events = sse_events(r.url, {"model": "m", "prompt": "x", "stream": True})
    assert time.monotonic() - start < 2
    assert status == 200
    last = json.loads(events[-1][1])
    assert set(last["error"]) == {"message", "type", "param", "code"} and last["error"]["code"] == 502
    assert "closed the connection" in last["error"]["message"]
    # The SDK turns the error event into an exception rather than a silent end.
    c = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
    try:
        list(c.completions.create(model="m", prompt="x", stream=True))
        raise AssertionError("the SDK should raise on the error event")
    except openai.APIError as err:
        assert "closed the connection" in str(err)


def test_stalled_stream_hits_idle_timeout(stack: Stack) -> None:
    e = stack.engine(behaviour="stall", chunks=10)
    r = stack.router([instance("m", e.port)], stream_idle_timeout_seconds=0.5)
    start = time.monotonic()
    status, _, events = sse_events(r.url, {"model": "m", "prompt": "x", "stream": True})
    assert 0.4 < time.monotonic() - start < 3
    err = json.loads(events[-1][1])["error"]
    assert err["code"] == 504 and "0.5s" in err["message"]
    model = r.app.state.table.get("m")
    wait_for(lambda: model.replicas[0].outstanding == 0 and model.lifecycle.in_flight == 0)


def test_non_stream_timeout_is_504(stack: Stack) -> None:
    e = stack.engine(behaviour="hang")
    r = stack.router([instance("m", e.port)], request_timeout_seconds=0.5)
    c = openai.OpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
    try:
        c.completions.create(model="m", prompt="x")
        raise AssertionError("expected a 504")
    except openai.APIStatusError as err:
        assert err.status_code == 504
        assert err.body["type"] == "timeout"
