"""Security: API keys, admin access, the bind address, secrets kept out of every
output, hostile HTTP requests, and file/socket permissions of a real stack.

Everything runs for real over loopback (the router on uvicorn, the simulated
vLLM engine in-process; `python -m router.serve` and supervisord as
processes). Remote clients are real too: a request to this machine's own
non-loopback address arrives from that address, not from 127.0.0.1.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import orjson
import psutil
import pytest
from helpers import PY, Proc, distinct_ports, render, start_sim, wait_http
from router_support import LoopThread, RouterServer, Stack, config_from, instance, loop, stack  # noqa: F401
from supervised import Supervised

from router.config import ConfigError, load_config, parse_config
from router.server.proxy.auth import is_loopback
from router.sim import SimEngine, SimOptions

MODEL = "org/model"
BODY = orjson.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 2})
CLIENT_KEYS = ["sk-client-one-7f3a", "sk-client-two-9b1c"]
ADMIN_KEY = "adm-secret-5e2d"
#: A wrong key a client might send: it must not be echoed or logged either.
GUESS = "sk-guess-c4d8"


def call(port: int, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict[str, str]] = None,
         host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; the path is sent as given (no normalising of '..')."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Send `data` as is; (head, body) of the answer, read up to its Content-Length."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < _length(got):
            part = s.recv(65536)
            if not part:
                break
            got += part
    head, _, body = got.partition(b"\r\n\r\n")
    return head, body


def _length(got: bytes) -> int:
    for line in got.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def openai_error(status: int, body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == expected
    return err


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def external_address() -> Optional[str]:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


class Secured:
    """A simulated vLLM engine and routers in front of it, on the module's loop."""

    def __init__(self, loop: LoopThread, tmp: Path):
        self.loop = loop
        self.tmp = tmp
        self.engine = SimEngine(SimOptions(engine="vllm", model=MODEL, max_model_len=64))
        loop.run(self.engine.start())
        self.routers: list[RouterServer] = []

    def router(self, host: str = "127.0.0.1", **settings: Any) -> RouterServer:
        r = RouterServer(self.loop, config_from(self.tmp, [instance(MODEL, self.engine.port)], settings))
        r.server.config.host = host
        self.routers.append(r.start())
        return r

    def close(self) -> None:
        for r in self.routers:
            r.stop()
        self.loop.run(self.engine.stop())


@pytest.fixture
def secured(loop: LoopThread, tmp_path: Path) -> Iterator[Secured]:
    s = Secured(loop, tmp_path)
    yield s
    s.close()


# -- client API keys -----------------------------------------------------------

def test_v1_needs_one_of_the_keys(secured: Secured) -> None:
    r = secured.router(api_keys=CLIENT_KEYS)
    wrong = [{}, bearer(GUESS), {"Authorization": CLIENT_KEYS[0]}, {"Authorization": f"Basic {CLIENT_KEYS[0]}"},
             {"Authorization": "Bearer "}, bearer(CLIENT_KEYS[0][:-1]), bearer(CLIENT_KEYS[0] + "x"),
             bearer(ADMIN_KEY)]
    for headers in wrong:
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/no-such-route")):
            status, h, body = call(r.port, method, path, BODY, headers)
            err = openai_error(status, body, 401)
            assert err["type"] == "authentication_error" and h["www-authenticate"] == "Bearer"
            assert GUESS.encode() not in body and b"sk-client" not in body
    assert secured.engine.counters.requests == 0
    for key in CLIENT_KEYS:
        status, _, body = call(r.port, "POST", "/v1/completions", BODY, bearer(key))
        assert status == 200 and json.loads(body)["object"] == "text_completion"
    assert call(r.port, "POST", "/v1/completions", BODY, {"Authorization": f"bearer  {CLIENT_KEYS[1]} "})[0] == 200
    assert call(r.port, "GET", "/v1/models", None, bearer(CLIENT_KEYS[1]))[0] == 200
    # Probes and read-only operator endpoints stay open (documented in the README).
    for path in ("/health", "/health/all", "/metrics", "/get_server_info"):
        assert call(r.port, "GET", path)[0] == 200, path


def test_a_request_without_a_key_is_refused_before_its_body_is_read(secured: Secured) -> None:
    """The 401 comes at once although the announced body never arrives: it was not waited for."""
    r = secured.router(api_keys=CLIENT_KEYS)
    started = time.monotonic()
    head, body = raw(r.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n" + BODY[:10])
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert time.monotonic() - started < 3  # raw() would wait 5 s for an answer held back for the body
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert secured.engine.counters.requests == 0


def test_client_key_is_not_forwarded_to_the_engine(stack: Stack) -> None:
    e = stack.engine()
    keyed = stack.router([instance("m", e.port)], api_keys=CLIENT_KEYS)
    assert call(keyed.port, "POST", "/v1/completions", b'{"model": "m"}', bearer(CLIENT_KEYS[0]))[0] == 200
    assert "Authorization" not in e.headers[-1]
    # Without router keys the header is the client's business with the engine (an engine's own --api-key).
    open_router = stack.router([instance("m", e.port)])
    assert call(open_router.port, "POST", "/v1/completions", b'{"model": "m"}', bearer("engine-key"))[0] == 200
    assert e.headers[-1]["Authorization"] == "Bearer engine-key"


def test_keys_from_an_env_var_and_a_file(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVR_TEST_KEYS", f" {CLIENT_KEYS[0]} ,{CLIENT_KEYS[1]},")
    (secured.tmp / "admin.key").write_text(f"\n{ADMIN_KEY}\n")
    r = secured.router(api_keys={"env": "KVR_TEST_KEYS"}, admin_api_key={"file": "admin.key"})
    assert call(r.port, "POST", "/v1/completions", BODY, bearer(CLIENT_KEYS[1]))[0] == 200
    assert call(r.port, "POST", "/v1/completions", BODY, bearer(GUESS))[0] == 401
    assert call(r.port, "POST", f"/action/wakeup/{MODEL}", None, bearer(ADMIN_KEY))[0] == 200
    assert call(r.port, "POST", f"/action/wakeup/{MODEL}", None, bearer(CLIENT_KEYS[1]))[0] == 401


# -- admin endpoints -----------------------------------------------------------

def test_admin_key_guards_state_changes(secured: Secured) -> None:
    r = secured.router(api_keys=CLIENT_KEYS, admin_api_key=ADMIN_KEY)
    for headers in ({}, bearer(CLIENT_KEYS[0]), bearer(GUESS), {"Authorization": ADMIN_KEY}):
        for method, path in (("POST", f"/action/sleep/{MODEL}"), ("POST", f"/action/wakeup/{MODEL}"),
                             ("GET", f"/action/sleep/{MODEL}"), ("POST", "/health"), ("DELETE", "/metrics")):
            status, h, body = call(r.port, method, path, None, headers)
            openai_error(status, body, 401)
            assert h["www-authenticate"] == "Bearer" and ADMIN_KEY.encode() not in body
    assert secured.engine.counters.sleep_calls == 0 and not secured.engine.asleep
    status, _, body = call(r.port, "POST", f"/action/sleep/{MODEL}", None, bearer(ADMIN_KEY))
    assert status == 200 and json.loads(body)["state"] == "sleeping" and secured.engine.asleep
    assert call(r.port, "POST", f"/action/wakeup/{MODEL}", None, bearer(ADMIN_KEY))[0] == 200
    assert not secured.engine.asleep
    # Reading state is not administration.
    assert call(r.port, "GET", "/sleep/status")[0] == 200


def test_without_admin_key_state_changes_are_for_loopback_only(secured: Secured) -> None:
    address = external_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to be a remote client from")
    r = secured.router(host="0.0.0.0")
    for method, path in (("POST", f"/action/sleep/{MODEL}"), ("POST", f"/action/wakeup/{MODEL}"),
                         ("PUT", "/metrics"), ("POST", "/no/such/route")):
        status, _, body = call(r.port, method, path, None, host=address)
        err = openai_error(status, body, 403)
        assert err["type"] == "permission_error" and "router.admin_api_key" in err["message"]
    assert secured.engine.counters.sleep_calls == 0 and not secured.engine.asleep
    # The same remote client may use the models and read state.
    assert call(r.port, "POST", "/v1/completions", BODY, host=address)[0] == 200
    assert call(r.port, "GET", "/sleep/status", host=address)[0] == 200
    # A loopback client may administer.
    assert call(r.port, "POST", f"/action/sleep/{MODEL}")[0] == 200 and secured.engine.asleep
    assert call(r.port, "POST", f"/action/wakeup/{MODEL}")[0] == 200


@pytest.mark.parametrize("client, loopback", [
    (("127.0.0.1", 1), True), (("127.8.9.10", 1), True), (("::1", 1), True), (("::ffff:127.0.0.1", 1), True),
    (("192.0.2.7", 1), False), (("::ffff:192.0.2.7", 1), False), (("fd00::2", 1), False), (("0.0.0.0", 1), False),
    (("localhost", 1), False), (("", 1), False), (None, False),
])
def test_loopback_is_judged_by_the_peer_address(client: Optional[tuple[str, int]], loopback: bool) -> None:
    assert is_loopback(client) is loopback


# -- bind address and secrets ------------------------------------------------------

def test_serve_binds_loopback_by_default_and_never_shows_a_key(tmp_path: Path, procs: list[Proc]) -> None:
    """`python -m router.serve` at trace level: keys appear in no log line, answer or repr."""
    router_port, engine_port = distinct_ports(2)
    (tmp_path / "keys").write_text("\n".join(CLIENT_KEYS) + "\n")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(json.dumps({
        "router": {"router_port": router_port, "api_keys": {"file": "keys"}, "admin_api_key": ADMIN_KEY,
                   "log_level": "trace", "access_log": True, "health_check_interval_seconds": 0.5},
        "instances": [{"model": MODEL, "engine": "vllm", "launch": False, "engine_args": [f"--port={engine_port}"]}],
    }))
    procs.append(start_sim("vllm", MODEL, engine_port))
    log = tmp_path / "router.log"
    router = Proc([PY, "-m", "router.serve", "--config", str(cfg_path)], log=str(log))
    procs.append(router)
    wait_http(f"http://127.0.0.1:{router_port}/health", timeout=20)
    wait_http(f"http://127.0.0.1:{engine_port}/health", timeout=20)

    listening = {c.laddr for c in psutil.Process(router.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", router_port)}
    address = external_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, router_port), timeout=2).close()

    answers = [
        call(router_port, "POST", "/v1/completions", BODY, bearer(CLIENT_KEYS[0])),
        call(router_port, "POST", "/v1/chat/completions", orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 2,
             "messages": [{"role": "user", "content": "hi"}]}), bearer(CLIENT_KEYS[1])),
        call(router_port, "POST", "/v1/completions", BODY, bearer(GUESS)),
        call(router_port, "POST", "/v1/completions", b"{bad json " + CLIENT_KEYS[0].encode(), bearer(CLIENT_KEYS[0])),
        call(router_port, "POST", f"/action/wakeup/{MODEL}", None, bearer(ADMIN_KEY)),
        call(router_port, "POST", f"/action/wakeup/{MODEL}", None, bearer(GUESS)),
        call(router_port, "GET", "/get_server_info"),
        call(router_port, "GET", "/metrics"),
        call(router_port, "GET", "/health/all"),
    ]
    assert [a[0] for a in answers] == [200, 200, 401, 400, 200, 401, 200, 200, 200]
    info = json.loads(answers[6][2])["router"]
    assert info["api_keys_configured"] == 2 and info["admin_api_key_configured"] is True
    router.stop()
    text = log.read_text()
    # The most verbose level (uvicorn's ASGI message trace) really logged the requests.
    assert f"{MODEL} single -> " in text and "'path': '/v1/completions'" in text
    config = load_config(cfg_path, sim=True)
    for secret in (*CLIENT_KEYS, ADMIN_KEY, GUESS):
        for where, what in (("the log", text), ("repr(config)", repr(config)), ("str(config)", str(config))):
            assert secret not in what, f"{secret} in {where}"
        assert all(secret.encode() not in body for _, _, body in answers), secret


def test_key_files_must_be_private_regular_text_files(tmp_path: Path) -> None:
    def load(ref: str) -> tuple[str, ...]:
        doc = {"router": {"api_keys": {"file": ref}}, "instances": [
            {"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]}
        (tmp_path / "c.yaml").write_text(json.dumps(doc))
        cfg = load_config(tmp_path / "c.yaml")
        assert [k.key for k in cfg.router.api_keys] == [CLIENT_KEYS[0]]
        return cfg.warnings

    key = tmp_path / "keys"
    key.write_text(CLIENT_KEYS[0] + "\n")
    key.chmod(0o600)
    assert load("keys") == ()
    key.chmod(0o640)
    [warning] = load("keys")
    assert "router.api_keys" in warning and "open to other users (mode 640)" in warning and "chmod 600" in warning
    assert CLIENT_KEYS[0] not in warning
    os.mkfifo(tmp_path / "fifo")  # reading it would block the loader forever
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + CLIENT_KEYS[0].encode())
    for ref, problem in (("fifo", "is not a regular file"), ("binary", "is not UTF-8 text"), (".", "is not a regular file"),
                         ("missing", "cannot read key file")):
        with pytest.raises(ConfigError, match=problem) as info:
            load(ref)
        assert "router.api_keys" in str(info.value) and CLIENT_KEYS[0] not in str(info.value)


@pytest.mark.parametrize("text", [
    f'router:\n  api_keys: ["{CLIENT_KEYS[0]}"\n  router_port: 1\n',
    f"router:\n  admin_api_key: {ADMIN_KEY}: x\n",
    f'router:\n  api_keys: ["{CLIENT_KEYS[0]}", "\\q"]\n',
    f"router:\n  api_keys: [{CLIENT_KEYS[0]}, *{CLIENT_KEYS[1]}]\n",
])
def test_yaml_errors_name_the_line_without_quoting_it(text: str) -> None:
    """PyYAML quotes the offending line in its messages; ours give line and column only."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    message = str(info.value)
    assert message.startswith("c.yaml: not valid YAML: ") and "(line 2, column " in message
    assert not any(secret in message for secret in (*CLIENT_KEYS, ADMIN_KEY)), message


@pytest.mark.parametrize("host, keys, warned", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.0.2.2", None, True), ("gpu-node.example", None, True),
    ("0.0.0.0", ["k"], False), ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False),
])
def test_listening_beyond_loopback_without_keys_is_warned(host: str, keys: Optional[list[str]], warned: bool) -> None:
    router: dict[str, Any] = {"router_host": host, **({"api_keys": keys} if keys else {})}
    cfg = parse_config(json.dumps({"router": router, "instances": [
        {"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]}), "c.yaml")
    hits = [w for w in cfg.warnings if "router.router_host" in w]
    assert len(hits) == warned and all("set api_keys" in w and w.startswith("c.yaml: ") for w in hits)


# -- hostile HTTP ----------------------------------------------------------------

@pytest.fixture
def hostile(secured: Secured) -> RouterServer:
    return secured.router(max_request_bytes=64 * 1024)


def test_gigabyte_content_length_is_refused_before_the_body(hostile: RouterServer, secured: Secured) -> None:
    started = time.monotonic()
    head, body = raw(hostile.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 1000000000\r\n\r\n" + BODY[:10])
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert time.monotonic() - started < 3  # answered, not waiting for the 1 GB that never comes
    assert "65536" in json.loads(body)["error"]["message"]
    assert secured.engine.counters.requests == 0


@pytest.mark.parametrize("body, param", [
    (b"\xff\xfe{}", None),
    (b"", None),
    (b'"model"', None),
    (b"null", None),
    (b'{"model": null}', "model"),
    (b'{"model": ""}', "model"),
    (b'{"model": ["org/model"]}', "model"),
    (b'{"model": {"name": "org/model"}}', "model"),
    (b'{"model": true}', "model"),
    (b'{"model": 1e999}', None),
    (b'{"model": "org/model", "stream": 1}', "stream"),
    (b'{"model": "org/model", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
    (b'{"model": "org/model", "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", None),
])
def test_malformed_requests_get_400_and_never_reach_the_engine(hostile: RouterServer, secured: Secured,
                                                               body: bytes, param: Optional[str]) -> None:
    status, _, data = call(hostile.port, "POST", "/v1/chat/completions", body)
    err = openai_error(status, data, 400)
    assert err["param"] == param
    assert secured.engine.counters.requests == 0


def test_model_names_cannot_inject_headers_or_break_json(hostile: RouterServer) -> None:
    for name in ("x\r\nSet-Cookie: a=b", 'x"}, "injected": {"a": "', "x\u2028\u0000</script>"):
        body = orjson.dumps({"model": name})
        head, data = raw(hostile.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert head.startswith(b"HTTP/1.1 404 ")
        assert b"set-cookie" not in head.lower() and b"\r\n" not in data and b"\n" not in data
        err = json.loads(data)["error"]
        assert set(json.loads(data)) == {"error"} and name in err["message"]
    head, data = raw(hostile.port, b"GET /health/x%0D%0ASet-Cookie:%20a=b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and b"set-cookie" not in head.lower()
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("value", [b"a\x00b", b"a\rb", b"a\nX-Injected: 1", b"a\r\n folded", b"a\x7fb", b"a\x1bb"])
def test_header_values_with_control_characters_never_reach_the_engine(stack: Stack, value: bytes) -> None:
    """Client headers are forwarded as sent, so a value that could split the engine request is refused first."""
    e = stack.engine()
    r = stack.router([instance("m", e.port)])
    body = b'{"model": "m"}'
    head, _ = raw(r.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Test: " + value +
                  b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert head.startswith(b"HTTP/1.1 400 ")
    assert e.bodies == [] and e.headers == []


@pytest.mark.parametrize("request_line", [
    b"GET /health/..%2F..%2Fetc%2Fpasswd",
    b"GET /health/../../etc/passwd",
    b"GET /health/%2e%2e/%2e%2e/etc/passwd",
    b"GET /traffic/stats/..%2F..%2Fetc%2Fpasswd",
    b"GET /traffic/stats/../../../etc/passwd",
    b"POST /action/sleep/../../x",
    b"POST /action/sleep/..%2F..%2Fx",
    b"POST /action/wakeup/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"POST /action/sleep/org/model/../../../x",
    b"POST /v1/../action/sleep/org/model",
    b"POST /./action/sleep/org/model",
    b"GET /health/%00",
    b"GET /health/%ZZ%",
    b"GET /health/%FF%FE",
])
def test_path_traversal_gets_a_clean_404(hostile: RouterServer, secured: Secured, request_line: bytes) -> None:
    head, data = raw(hostile.port, request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
    assert b"root:" not in data
    assert secured.engine.counters.sleep_calls == 0 and not secured.engine.asleep


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("PUT", "/v1/embeddings", "POST"),
    ("DELETE", "/v1/models", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
    ("GET", f"/action/sleep/{MODEL}", "POST"),
    ("PATCH", "/traffic/stats", "GET, HEAD"),
])
def test_wrong_methods_get_405_with_allow(hostile: RouterServer, method: str, path: str, allow: str) -> None:
    status, headers, data = call(hostile.port, method, path, b"{}")
    openai_error(status, data, 405)
    assert set(headers["allow"].split(", ")) == set(allow.split(", "))


# -- permissions of a real stack ---------------------------------------------------

#: Run as another local user: try to read, list and connect to each path; print what worked.
PROBE = """
import json, os, socket, sys
got = []
for path in json.loads(sys.argv[1]):
    for what, attempt in (("read", lambda: open(path, "rb").close()), ("list", lambda: os.listdir(path)),
                          ("connect", lambda: socket.socket(socket.AF_UNIX).connect(path)), ("stat", lambda: os.stat(path))):
        try:
            attempt()
            got.append([what, path])
        except OSError:
            pass
print(json.dumps(got))
"""


def test_rendered_files_logs_and_socket_keep_other_users_out() -> None:
    """A real supervisord run: every file it and the renderer made is the owner's only."""
    tmp = Path(tempfile.mkdtemp(prefix="kvr", dir="/tmp"))
    tmp.chmod(0o755)  # only the output folder's own modes may keep others out
    router_port, engine_port = distinct_ports(2)
    stack = Supervised(render(tmp, {
        "router": {"router_port": router_port, "shutdown_grace_seconds": 1},
        "instances": [{"name": "a", "model": MODEL, "engine": "vllm", "engine_args": [f"--port={engine_port}"]}],
    }, "--sim"), tmp / "tmux")
    try:
        stack.start()
        stack.wait_running(["a", "router", "logs"])
        wait_http(f"http://127.0.0.1:{router_port}/health", timeout=20)
        out = stack.out
        paths = sorted(out.rglob("*"))
        names = {p.relative_to(out).as_posix() for p in paths}
        assert {"supervisor.sock", "supervisord.pid", "supervisord.conf", "engines/a.sh", "tmux-launch.sh",
                "logs/supervisord.log", "logs/a.log", "logs/router.log"} <= names
        # Folders and the socket are the owner's only. Files inside need no mode of their own: supervisord
        # creates its logs and pidfile with the umask it was started under (its `umask=077` applies only
        # when it daemonizes), and no other user can reach into these folders to open them.
        guards = [out, out / "logs", out / "engines", out / "supervisor.sock"]
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in guards} == {
            "out": "0o700", "logs": "0o700", "engines": "0o700", "supervisor.sock": "0o700"}
        assert all(p.lstat().st_uid == os.getuid() for p in paths)
        if os.getuid() != 0 or not os.path.exists("/usr/bin/python3"):
            pytest.skip("modes checked; trying them as another user needs root and /usr/bin/python3")
        targets = [str(out), *map(str, paths)]
        done = subprocess.run(["/usr/bin/python3", "-c", PROBE, json.dumps(targets)], user=65534, group=65534,
                              extra_groups=[], capture_output=True, text=True, timeout=30, cwd="/")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [["stat", str(out)]]  # another user sees the folder exists, nothing more
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
