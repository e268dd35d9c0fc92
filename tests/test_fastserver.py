"""router/server/http/fastserver.py: the proxied POSTs served without ASGI, on raw connections.

The other router tests go through it as well (router_support runs the app on
`FastHttpProtocol`); these check what only a raw socket shows: framing on a
kept-alive connection, pipelining, the requests it leaves to uvicorn's ASGI
cycle, HTTP/1.0, a failing proxy, and backpressure on a piped stream.
"""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)

BODY = json.dumps({"model": "m", "prompt": "x"}).encode()
STREAM = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()


def post(path: bytes, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, version, len(body), extra, body))


def test_whole_and_streamed_answers_share_one_kept_alive_connection(stack: Stack) -> None:
    e = stack.engine(chunks=3)
    r = stack.router([instance("m", e.port)])
    proxy = r.app.state.proxy
    served = []
    real = proxy.serve

    def serve(*args: object) -> object:  # the entry only the fast protocol uses
        served.append(args[0]["path"])
        return real(*args)
    proxy.serve = serve
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
    try:
        for body in (BODY, STREAM, BODY, STREAM):
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200
            if body is STREAM:
                assert resp.getheader("transfer-encoding") == "chunked"
                events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
                assert len(events) == 4 and events[-1] == "[DONE]"
            else:
                assert int(resp.getheader("content-length")) == len(data)
                assert json.loads(data)["choices"][0]["text"] == "hello world"
            assert resp.getheader("x-request-id") and resp.getheader("date") and resp.getheader("server")
    finally:
        conn.close()
    assert len(e.bodies) == 4
    assert served == ["/v1/completions"] * 4


def read_answers(sock: socket.socket, n: int) -> list[bytes]:
    """`n` whole answers with a content-length from `sock`, as (head + body) bytes."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            got = sock.recv(65536)
            assert got, f"closed after {len(out)} answers: {buf!r}"
            buf += got
        head, rest = buf.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        out.append(head + b"\r\n\r\n" + rest[:length])
        buf = rest[length:]
    return out


def dechunk(data: bytes) -> bytes:
    """A chunked body's content."""
    out = []
    while True:
        size, data = data.split(b"\r\n", 1)
        n = int(size, 16)
        if not n:
            return b"".join(out)
        out.append(data[:n])
        assert data[n:n + 2] == b"\r\n"
        data = data[n + 2:]


def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        bodies = [json.dumps({"model": "m", "prompt": f"p{i}"}).encode() for i in range(3)]
        sock.sendall(b"".join(post(b"/v1/completions", b) for b in bodies) + post(b"/v1/nothing", BODY))
        answers = read_answers(sock, 4)
    assert [a.split(b" ", 2)[1] for a in answers] == [b"200", b"200", b"200", b"404"]
    assert [json.loads(b)["prompt"] for b in e.bodies] == ["p0", "p1", "p2"]


def test_chunked_uploads_and_expect_continue_go_through_asgi_and_still_work(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        half = len(BODY) // 2
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                     % (half, BODY[:half], len(BODY) - half, BODY[half:]))
        [answer] = read_answers(sock, 1)
        assert answer.startswith(b"HTTP/1.1 200 ")
        sock.sendall(post(b"/v1/completions", b"", b"Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(BODY)))
        got = b""
        while b"100 Continue" not in got:
            got += sock.recv(100)
        sock.sendall(BODY)
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"200"
    assert e.bodies == [BODY, BODY]


def test_a_refused_key_and_an_oversized_body_are_answered_as_before(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)], api_keys=["k1"], max_request_bytes=200)
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(post(b"/v1/messages", BODY))
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"401"
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["type"] == "error"  # the Anthropic shape
        sock.sendall(post(b"/v1/completions", b"x" * 300, b"Authorization: Bearer k1\r\n"))
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"413"
        sock.sendall(post(b"/v1/completions", BODY, b"Authorization: Bearer k1\r\n"))
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"200"
    assert e.bodies == [BODY]


def test_http_1_0_gets_its_answer_then_the_connection_closes(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(post(b"/v1/completions", BODY, version=b"1.0"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert json.loads(body)["model"] == "m"


def test_a_proxy_failure_is_a_500_and_the_next_request_is_served(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    proxy = r.app.state.proxy
    real = proxy.route
    calls = []

    def broken(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(*args)
    proxy.route = broken
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        sock.sendall(post(b"/v1/completions", BODY))
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"500"
        sock.sendall(post(b"/v1/completions", BODY))
        [answer] = read_answers(sock, 1)
        assert answer.split(b" ", 2)[1] == b"200"


@pytest.mark.slow  # 30 MB through a stalled reader; the guarantee's own test (test_faults) stays in the fast suite
def test_a_slow_reader_pauses_the_engine_and_gets_the_whole_stream(stack: Stack) -> None:
    chunks = 150_000  # about 30 MB of SSE, more than the sockets' buffers hold
    e = stack.engine(chunks=chunks)
    # An idle timeout far shorter than the reader's pause: waiting on the client is not engine silence.
    r = stack.router([instance("m", e.port)], stream_idle_timeout_seconds=2.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", r.port))
    try:
        sock.sendall(post(b"/v1/completions", STREAM))
        # While the client reads nothing, the engine stops getting its chunks out: the router stopped
        # reading them (without backpressure it would take them all into its memory).
        counts = [0]
        while not (counts[-1] == len(e.chunk_times) and 0 < counts[-1] < chunks):
            assert len(counts) < 60, f"the engine never stalled: {counts}"
            counts.append(len(e.chunk_times))
            time.sleep(0.5)
        time.sleep(4.5)  # two idle timeouts: the stream must not end for it
        assert len(e.chunk_times) == counts[-1]
        data = bytearray()
        while not data.endswith(b"0\r\n\r\n"):
            got = sock.recv(1 << 20)
            assert got
            data += got
    finally:
        sock.close()
    body = dechunk(bytes(data).split(b"\r\n\r\n", 1)[1])
    assert body.count(b"data: ") == chunks + 1 and body.endswith(b"data: [DONE]\n\n") and b"error" not in body
    assert len(e.chunk_times) == chunks


def test_an_idle_connection_closes_after_the_keep_alive_time_counted_from_its_last_answer(stack: Stack) -> None:
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    r.server.config.timeout_keep_alive = 0.6  # each new connection's protocol reads it
    with socket.create_connection(("127.0.0.1", r.port), timeout=10) as sock:
        for _ in range(3):  # answers 0.4 s apart: the first answer's timer must not close the connection
            sock.sendall(post(b"/v1/completions", BODY))
            [answer] = read_answers(sock, 1)
            assert answer.split(b" ", 2)[1] == b"200"
            time.sleep(0.4)
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the router
        assert time.monotonic() - start < 1.5
