"""Property tests (hypothesis) over hostile input: HTTP requests to a running
router, YAML to the config loader, and hostile values through the renderer.

- HTTP: any method, path and body get an answer below 500 (the simulated
  engine behind the router is up, so even a known model never needs a 5xx),
  router errors keep the OpenAI shape, and nothing is logged at ERROR.
- Auth: any Authorization value opens ``/v1/`` only if it is a configured
  bearer key, and is never echoed.
- Config: any text or YAML structure loads into a consistent Config or
  raises ConfigError, never another exception.
- Render: hostile model names, args, env values, aliases and config paths come
  out of supervisord.conf (read by supervisor's own parser), the launch
  scripts and tmux-launch.sh (run with stand-ins for python and tmux) as
  exactly the intended values, or are refused with a clear RenderError.
  tests/test_render.py proves the engine argv of non-sim scripts; this adds
  the INI side, the router's program line, --sim scripts and tmux-launch.sh.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import shlex
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml
from helpers import PY
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from router_support import LoopThread, RouterServer, config_from, instance
from supervisor.options import ServerOptions

from router import render
from router.config import (
    INSTANCE_KEYS,
    RESERVED_NAMES,
    SAFE_NAME,
    TOP_KEYS,
    Config,
    ConfigError,
    RouterSettings,
    SleepSettings,
    load_config,
    parse_config,
)
from router.config.keys import ApiKey
from router.config.kinds import Choice, Flag, Number
from router.config.schema import Kind, Section, keys_of
from router.engines import ENGINES
from router.server.http.app import create_app
from router.sim import SimEngine, SimOptions

MODEL = "org/fuzz-model"
ALIAS = "fuzzy"
PROXY_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
KNOWN_PATHS = (*PROXY_PATHS, "/v1/models", "/models", "/health", "/health/all", f"/health/{MODEL}", "/get_server_info",
               "/metrics", "/traffic/stats", f"/traffic/stats/{MODEL}", "/models/idle", "/models/active",
               "/sleep/status", "/sleep/candidates", f"/action/sleep/{MODEL}", f"/action/wakeup/{MODEL}")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")

#: Fuzzing runs hundreds of generated cases per test: outside the fast suite.
pytestmark = pytest.mark.slow


# -- HTTP --------------------------------------------------------------------------

def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """Valid seven times in eight, so whole documents load often enough to check what they load into."""
    return st.integers(0, 7).flatmap(lambda i: odd if i == 7 else valid)


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above, or carrying an exception, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


class Target:
    def __init__(self, router: RouterServer, errors: ErrorRecords):
        self.router = router
        self.errors = errors


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One router in front of one simulated vLLM engine (short context, so generations are quick)."""
    loop = LoopThread()
    engine = SimEngine(SimOptions(engine="vllm", model=MODEL, max_model_len=48))
    loop.run(engine.start())
    cfg = config_from(tmp_path_factory.mktemp("fuzz"), [instance(MODEL, engine.port, aliases=[ALIAS])],
                      {"max_request_bytes": 4096, "access_log": False})
    router = RouterServer(loop, cfg)  # configures uvicorn's loggers: watch them after it
    errors = ErrorRecords()
    watched = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error")]
    for logger in watched:
        logger.addHandler(errors)
    router.start()
    try:
        yield Target(router, errors)
    finally:
        router.stop()
        loop.run(engine.stop())
        loop.close()
        for logger in watched:
            logger.removeHandler(errors)


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
#: Any JSON value, including numbers beyond 64 bits, NaN and infinities (written as JSON extensions).
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
MODELS = mostly(st.sampled_from([MODEL, ALIAS]), st.sampled_from(["unknown/model", ""]) | JSON_VALUES)
MESSAGES = mostly(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                  "content": st.text(max_size=20)}), min_size=1, max_size=3),
                  st.lists(st.fixed_dictionaries({"role": JSON_VALUES, "content": JSON_VALUES}), max_size=2) | JSON_VALUES)
#: Request-like objects: the fields the router and engine read, mostly right, sometimes wrong, plus others.
REQUESTS = st.fixed_dictionaries({
    "model": MODELS, "prompt": mostly(st.text(max_size=20), JSON_VALUES), "messages": MESSAGES,
}, optional={
    "stream": mostly(st.booleans(), JSON_VALUES),
    "max_tokens": mostly(st.integers(1, 8), st.integers(-2, 0) | JSON_VALUES),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON_VALUES,
    "stop": mostly(st.text(max_size=3), JSON_VALUES),
}).flatmap(lambda base: st.dictionaries(st.text(min_size=2, max_size=6), JSON_VALUES, max_size=2)
           .map(lambda extra: {**extra, **base}))
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    REQUESTS.map(lambda v: json.dumps(v).encode()),
    REQUESTS.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
)
#: Path segments with anything a client can put in a request line: escapes (valid or not), dots, slashes.
SEGMENTS = st.text(max_size=10).map(lambda s: urllib.parse.quote(s, safe="")) | st.sampled_from(
    ["..", ".", "%2e%2e", "%2F", "%00", "%ZZ", "%", "%FF", "%0d%0aSet-Cookie:%20a", MODEL, "org", "fuzz-model"])
PATHS = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.builds(lambda base, tail: base + "/" + "/".join(tail), st.sampled_from(KNOWN_PATHS), st.lists(SEGMENTS, max_size=3)),
    st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs)),
)
QUERIES = st.none() | st.dictionaries(st.sampled_from(["window", "threshold", "level", "mode", "x"]),
                                      st.text(max_size=8), max_size=2).map(urllib.parse.urlencode)


def is_engine_answer(method: str, path: str, body: Optional[bytes]) -> bool:
    """Whether the router forwards this request, so its answer is the engine's own, not the router's."""
    if method != "POST" or path not in PROXY_PATHS or body is None:
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("model") in (MODEL, ALIAS)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(PROXY_PATHS), st.none(),  # generation requests
              mostly(REQUESTS.map(lambda v: json.dumps(v).encode()), BODIES)),
    st.tuples(st.sampled_from(METHODS), PATHS, QUERIES, BODIES),  # anything
))
def test_router_never_fails_on_client_input(target: Target,
                                            request: tuple[str, str, Optional[str], Optional[bytes]]) -> None:
    method, path, query, body = request
    before = len(target.errors.records)
    conn = http.client.HTTPConnection("127.0.0.1", target.router.port, timeout=30)
    try:
        conn.request(method, path + (f"?{query}" if query else ""), body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    event(f"{resp.status} {'from the engine' if is_engine_answer(method, path, body) else 'from the router'}")
    assert resp.status < 500, (resp.status, data[:500])
    if resp.status >= 400 and method != "HEAD" and not is_engine_answer(method, path, body):
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == resp.status
    logged = target.errors.records[before:]
    assert not logged, [r.getMessage() for r in logged]


KEYS = (b"sk-fuzz-key-one", b"sk-fuzz-key-two")
SCHEMES = st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b"", b"Bearer:", b"Token"])
SEPARATORS = st.sampled_from([b" ", b"  ", b"\t", b""])
TOKENS = st.sampled_from([*KEYS, KEYS[0][:-1], KEYS[0] + b"x", KEYS[0].upper(), b"", b"sk-fuzz-key-"])
TAILS = st.sampled_from([b"", b" ", b"\t", b"x", b" x"])


def joined(*parts: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(*parts).map(b"".join)


def accepted(value: bytes) -> bool:
    """RFC 6750: ``Bearer`` (any case), one or more spaces, the token; whitespace around it is not part of it."""
    scheme, _, token = value.strip().partition(b" ")
    return scheme.lower() == b"bearer" and token.strip() in KEYS


async def asgi_get(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """One GET straight through the ASGI app (no server): (status, body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture(scope="module")
def keyed_app() -> Any:
    cfg = parse_config(json.dumps({"router": {"api_keys": [k.decode() for k in KEYS], "access_log": False},
                                   "instances": [{"model": MODEL, "engine": "vllm", "engine_args": ["--port=9001"]}]}))
    return create_app(cfg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(
    joined(st.sampled_from([b"Bearer", b"bearer", b"BEARER"]), st.sampled_from([b" ", b"  "]), st.sampled_from(KEYS),
           st.sampled_from([b"", b" ", b"\t"])),  # the accepted forms
    joined(SCHEMES, SEPARATORS, TOKENS, TAILS),  # near misses among them
    st.binary(max_size=40),
),
       before=st.lists(st.tuples(st.sampled_from([b"x-api-key", b"cookie", b"proxy-authorization"]),
                                 st.sampled_from(KEYS)), max_size=2))
def test_only_a_configured_bearer_key_opens_v1(keyed_app: Any, value: bytes, before: list) -> None:
    """Whatever Authorization value (or other header carrying a key) a client sends: 200 only for a real key."""
    status, body = asyncio.run(asgi_get(keyed_app, "/v1/models", [*before, (b"authorization", value)]))
    event("accepted" if status == 200 else "refused")
    assert status == (200 if accepted(value) else 401)
    if status == 401:
        assert json.loads(body)["error"]["type"] == "authentication_error"
        assert b"sk-fuzz" not in body


# -- config loading -------------------------------------------------------------------

def check_loaded(text: str | bytes) -> None:
    """`text` loads into a consistent Config, or fails with ConfigError whose every line names the file."""
    try:
        cfg = parse_config(text, "<fuzz>", sim=True)
    except ConfigError as e:
        event("ConfigError")
        assert e.problems and e.path == "<fuzz>"
        assert all(line.startswith("<fuzz>: ") and line.isprintable() for line in str(e).split("\n"))
        return
    event("loaded")
    assert isinstance(cfg, Config) and cfg.instances
    assert all(w.startswith("<fuzz>: ") and w.isprintable() for w in cfg.warnings)
    names = [i.name for i in cfg.instances]
    assert len(set(names)) == len(names)
    for inst in cfg.instances:
        assert SAFE_NAME.match(inst.name) and inst.name.lower() not in RESERVED_NAMES
        assert inst.engine in ENGINES and 1 <= inst.port <= 65535 and isinstance(inst.model, str) and inst.model
        assert all(isinstance(a, str) and "\0" not in a for a in inst.engine_args)
        assert all(isinstance(v, str) and "\0" not in v for _, v in inst.env)
    assert set(cfg.routes.values()) == set(cfg.models)
    assert 1 <= cfg.router.port <= 65535 and isinstance(cfg.router.api_keys, tuple)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_any_text_loads_or_raises_config_error(text: str | bytes) -> None:
    check_loaded(text)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.text(max_size=8) | st.integers() | st.booleans(), inner, max_size=4), max_leaves=15)


@settings(max_examples=200, deadline=None)
@given(doc=YAML_VALUES)
def test_any_yaml_structure_loads_or_raises_config_error(doc: Any) -> None:
    check_loaded(yaml.safe_dump(doc))


#: Keys read from elsewhere: environment variables and files that may or may not exist, or be odd files.
KEY_SOURCES = st.dictionaries(st.sampled_from(["env", "file"]), st.sampled_from(["PATH", "HOME", "NOPE_KVR", ".", "/",
                              "/dev/null", "setup.cfg", "missing.keys", ""]) | YAML_VALUES, min_size=1, max_size=2)
#: Valid values of the kinds a settings block declares, where the kind alone does not say what one is.
TEXT_VALUES = {
    "Text": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "localhost", "m", "org/model", "alias", "no-such-model"]),
    # router.api_keys: keys, key sources and records (router/config/keys.py), mixed
    "ApiKeys": st.lists(st.text(min_size=1, max_size=8).filter(str.strip) | KEY_SOURCES
                        | st.deferred(lambda: block(ApiKey)), min_size=1, max_size=3) | KEY_SOURCES,
    "Globs": st.lists(st.sampled_from(["m", "*", "org/*", "alias", "no-such-model", "[a-"]), max_size=2),
    "OneKey": st.text(min_size=1, max_size=8).filter(str.strip) | KEY_SOURCES,
    "LogPath": st.sampled_from(["activity.jsonl", "logs/activity.jsonl", ".", " "]),
    "Nameservers": st.lists(st.sampled_from(["127.0.0.1:5353", "10.96.0.10", "[::1]:53", "dns.local", "1.2.3.4:0"]),
                            max_size=2),
}


def valid(kind: Kind) -> st.SearchStrategy:
    """A value of a declared kind, mostly within its bounds (a choice in another case, or one that is not)."""
    if isinstance(kind, Flag):
        return st.booleans()
    if isinstance(kind, Number):
        most = min(kind.most if kind.most is not None else 1e6, 1e6)
        if kind.whole:
            return st.integers(int(kind.least) + kind.above, int(most))
        return st.floats(kind.least + 0.01 * kind.above, most)
    if isinstance(kind, Choice):
        return st.sampled_from([*kind.choices, *(c.upper() for c in kind.choices), "keep"])
    if isinstance(kind, Section):  # a nested block of settings
        return block(kind.cls)
    return TEXT_VALUES[type(kind).__name__]


def block(settings: type) -> st.SearchStrategy:
    """A settings block: any of its keys with mostly valid values, and sometimes an unknown key."""
    return st.fixed_dictionaries({}, optional={
        **{key.name: mostly(valid(key.kind), YAML_VALUES) for key in keys_of(settings)},
        "unknown_setting": YAML_VALUES})


PORT_ARG = st.integers(9001, 9006).map(lambda p: f"--port={p}")
ARGS = mostly(st.lists(st.text(max_size=12) | st.sampled_from(["--host 0.0.0.0", "--served-model-name a b", "--enforce-eager",
                                                              "--gpu-memory-utilization 0.7", "'unclosed", "--port x"]),
                       max_size=3).flatmap(lambda args: PORT_ARG.map(lambda port: [*args, port])),
              YAML_VALUES | st.lists(st.text(max_size=8) | st.sampled_from(["--port=", "--port 0", "--port=70000"])))
ENV = st.lists(st.builds("{}={}".format, mostly(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True),
                                                 st.text(max_size=6)), st.text(max_size=6)), max_size=3)
INSTANCE_VALUES = {
    "name": mostly(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,6}", fullmatch=True), st.text(max_size=10) | YAML_VALUES),
    "model": mostly(st.sampled_from(["m", "org/m", "org/other", "x"]), st.sampled_from([" m", ""]) | YAML_VALUES),
    "engine": mostly(st.sampled_from(["vllm", "SGLang", "sgl"]), st.sampled_from(["tgi", ""]) | YAML_VALUES),
    "engine_args": ARGS,
    "engine_env": mostly(ENV, YAML_VALUES),
    "kvcached_env": mostly(ENV, YAML_VALUES),
    "aliases": mostly(st.lists(st.text(max_size=6), max_size=2), YAML_VALUES),
    "launch": mostly(st.booleans(), YAML_VALUES),
    "sleep": mostly(st.booleans(), YAML_VALUES),
    "sleep_level": mostly(st.sampled_from([1, 2]), st.sampled_from([0, 3, "2"]) | YAML_VALUES),
    "max_concurrency": mostly(st.integers(1, 8), YAML_VALUES),
    "max_queue": mostly(st.integers(0, 8), YAML_VALUES),
    "routing": mostly(st.sampled_from(["least_outstanding", "Session", "prefix"]), st.sampled_from(["sticky", ""]) | YAML_VALUES),
    "routing_prefix_chars": mostly(st.sampled_from([64, 2048]), st.sampled_from([0, -1, 1.5]) | YAML_VALUES),
    "using_venv": mostly(st.booleans(), YAML_VALUES),
    "venv_path": mostly(st.sampled_from(["venv", "/nonexistent/venv"]), YAML_VALUES),
    "engine_package": mostly(st.sampled_from(["six==1.16.0", "vllm[x]==0.11.2", "six>=1", "bad req!!"]), YAML_VALUES),
    "engine_requirements": mostly(st.sampled_from(["reqs.txt", "/nonexistent/r.txt"]), YAML_VALUES),
    "engine_import": mostly(st.sampled_from(["six", "vllm.x", "1bad"]), YAML_VALUES),
    "sim_args": mostly(st.lists(st.sampled_from(["--itl-ms 5", "--startup-s=1", "'bad"]), max_size=2), YAML_VALUES),
    "on_demand": mostly(st.booleans(), YAML_VALUES),
    "pin": mostly(st.booleans(), YAML_VALUES),
    **{k: mostly(st.floats(0.1, 100), YAML_VALUES) for k in (
        "idle_stop_seconds", "gpu_memory_gb", "host_memory_gb", "gpu_sleeping_gb", "start_timeout_seconds",
        "request_timeout_seconds", "stream_idle_timeout_seconds")},
    "node": mostly(st.sampled_from(["gpu-1", "gpu-2"]), YAML_VALUES),
    "dns_name": mostly(st.sampled_from(["pool.test", "engine-a.llm.svc.cluster.local", "10.0.0.5", "a b"]), YAML_VALUES),
    **{k: mostly(st.dictionaries(st.sampled_from(["temperature", "max_tokens", "seed", "model"]),
                                 st.integers(0, 5) | st.text(max_size=4) | st.none(), max_size=2), YAML_VALUES)
       for k in ("request_defaults", "request_overrides")},
    "request_strip": mostly(st.lists(st.sampled_from(["seed", "logit_bias", "temperature", "stream"]), max_size=2),
                            YAML_VALUES),
    "fallbacks": mostly(st.lists(st.sampled_from(["m", "org/m", "org/other", "x", "nope"]), max_size=2), YAML_VALUES),
    "lora_adapters": mostly(st.lists(st.fixed_dictionaries(
        {"name": mostly(st.sampled_from(["sql", "chat", "m", "a b"]), YAML_VALUES),
         "path": mostly(st.sampled_from(["/l/sql", "loras/chat"]), st.sampled_from(["", " "]) | YAML_VALUES)},
        optional={"unknown": YAML_VALUES}), max_size=2), YAML_VALUES),
}
INSTANCES = st.lists(st.fixed_dictionaries(
    {k: INSTANCE_VALUES[k] for k in ("model", "engine", "engine_args")},
    optional={k: INSTANCE_VALUES[k] for k in INSTANCE_KEYS if k not in ("model", "engine", "engine_args")},
), min_size=1, max_size=3)
DOCUMENTS = st.fixed_dictionaries({"instances": mostly(INSTANCES, YAML_VALUES)}, optional={
    "router": mostly(block(RouterSettings), YAML_VALUES),
    "sleep_manager": mostly(block(SleepSettings), YAML_VALUES),
    "kvcached": mostly(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), SCALARS, max_size=3), YAML_VALUES),
    "launch_delay_seconds": mostly(st.floats(0, 5), YAML_VALUES),
    "unknown_key": YAML_VALUES,
})


@settings(max_examples=300, deadline=None)
@given(doc=DOCUMENTS)
def test_config_shaped_documents_load_or_raise_config_error(doc: dict) -> None:
    """Documents with the real keys and wrong, odd or valid values: validation reaches every field."""
    assert set(doc) <= {*TOP_KEYS, "unknown_key"}
    check_loaded(yaml.safe_dump(doc))


# -- rendering hostile values ---------------------------------------------------------

#: What a shell, supervisord's INI reader or a YAML dumper could trip on.
NASTY = st.text(st.sampled_from(list("aZ9 _-./%;#\"'$`\\!*?~&|<>(){}[]=:,\t\né\u2028")), max_size=14)
NO_NUL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=10)
HOSTILE = NASTY | NO_NUL
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True).filter(lambda n: n.lower() not in RESERVED_NAMES)

ECHO = f"""#!{PY}
import json, os, sys
with open(os.environ["KVR_ECHO_OUT"], "a") as f:
    f.write(json.dumps({{"session": os.environ.get("KVR_SESSION"), "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
"""
#: tmux stand-in: no session exists; a new one runs its command as tmux would (through a shell).
FAKE_TMUX = """#!/bin/bash
case "$1" in
    has-session) exit 1 ;;
    new-session) KVR_SESSION="$4" /bin/sh -c "$5" ;;
esac
"""


class Bench:
    """Stand-ins (a python that records its argv and env, a tmux that runs commands) in a short folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kvrf", dir="/tmp"))
        self.bin = self.root / "bin"
        self.bin.mkdir()
        for name, text in (("python", ECHO), ("tmux", FAKE_TMUX)):
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o700)
        self.python = str(self.bin / "python")
        self.record = self.root / "echo.jsonl"

    def run(self, argv: list[str]) -> list[dict]:
        """Run `argv` with only the stand-ins and the system on PATH; what the stand-in python recorded."""
        self.record.write_text("")
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "KVR_ECHO_OUT": str(self.record)}
        done = subprocess.run(argv, env=env, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    shutil.rmtree(b.root, ignore_errors=True)


def hostile_instance(draw: Any, index: int, name: str) -> dict:
    model = draw(HOSTILE).strip() or "m"
    return {
        "name": name, "model": model, "engine": draw(st.sampled_from(["vllm", "sglang"])),
        "engine_args": [shlex.quote(a) for a in draw(st.lists(HOSTILE, max_size=3))] + [f"--port={9100 + index}"],
        "engine_env": [f"KVR_F{j}={v}" for j, v in enumerate(draw(st.lists(HOSTILE, max_size=3)))],
        "kvcached_env": {"KVR_KV": draw(HOSTILE)},
        "aliases": sorted({a for a in draw(st.lists(HOSTILE, max_size=2)) if a.strip()}),
    }


@st.composite
def hostile_configs(draw: Any) -> tuple[str, dict]:
    """(config folder name, config document) full of values that need escaping."""
    names = draw(st.lists(NAMES, min_size=1, max_size=2, unique_by=str.lower))
    folder = draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"), min_size=1,
                          max_size=12).filter(lambda s: s not in (".", "..")))
    doc = {"router": {"router_port": 9099}, "kvcached": {"kvcached_note": draw(HOSTILE)},
           "instances": [hostile_instance(draw, i, n) for i, n in enumerate(names)]}
    return folder, doc


def expected_engine_argv(inst: dict, sim: bool) -> list[str]:
    """What the engine must receive (after the python), worked out from the YAML alone."""
    args = [a for item in inst["engine_args"] for a in shlex.split(item)]
    if sim:
        return ["-m", "router.sim", "--engine", inst["engine"], "--model", inst["model"], *args]
    if inst["engine"] == "vllm":
        return ["-m", "vllm.entrypoints.openai.api_server", "--model", inst["model"], *args]
    return ["-m", "sglang.launch_server", "--model-path", inst["model"], *args]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=hostile_configs(), sim=st.booleans())
def test_hostile_values_render_literally_or_are_refused(bench: Bench, case: tuple[str, dict], sim: bool) -> None:
    folder, doc = case
    work = Path(tempfile.mkdtemp(prefix="c", dir=bench.root))
    try:
        (work / folder).mkdir()
        cfg_path = work / folder / "config.yaml"
        text = yaml.safe_dump(doc)  # escaped: with allow_unicode, PyYAML folds a raw U+0085 into a space
        assert yaml.safe_load(text) == doc
        cfg_path.write_text(text)
        try:
            cfg = load_config(cfg_path, sim=True)
        except ConfigError as e:  # random aliases may name another instance's model: a config error, not ours
            assume(not all("would route to both" in p for p in e.problems))
            raise
        out = work / "o"
        try:
            files = render.render_files(cfg, out, sim=sim, python=bench.python)
        except render.RenderError as e:
            # Of all the values, only the config path reaches supervisord.conf: refused only when the INI
            # reader would cut it (a line break, or whitespace before ';' or '#' starts a comment).
            command = render.shell_join([bench.python, "-m", "router.serve", "--config", str(cfg_path)])
            assert "cannot be written into supervisord.conf" in str(e)
            assert "\n" in command or "\r" in command or render.INI_COMMENT.search(command)
            event("refused")
            return
        event("rendered")
        render.write_tree(out, files)
        check_rendered(bench, out, cfg_path, doc, sim)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_rendered(bench: Bench, out: Path, cfg_path: Path, doc: dict, sim: bool) -> None:
    options = ServerOptions()
    options.realize(args=["-c", str(out / "supervisord.conf")])
    programs = {p.name: p for g in options.process_group_configs for p in g.process_configs}
    instances = doc["instances"]
    assert set(programs) == {i["name"] for i in instances} | {"router", "logs"}
    router_argv = [bench.python, "-m", "router.serve", "--config", str(cfg_path),
                   "--supervisor-socket", str(out / "supervisor.sock")]
    assert shlex.split(programs["router"].command) == router_argv
    assert programs["router"].environment == {"PYTHONUNBUFFERED": "1"}
    for inst in instances:
        program = programs[inst["name"]]
        assert shlex.split(program.command) == [str(out / "engines" / f"{inst['name']}.sh")]
        assert program.stdout_logfile == str(out / "logs" / f"{inst['name']}.log")

    scripts = [out / "tmux-launch.sh", out / "tmux-logs.sh", *(out / "engines" / f"{i['name']}.sh" for i in instances)]
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr

    want = {f"kvcached-{i['name']}": expected_engine_argv(i, sim) for i in instances}
    for inst in instances:
        *waits, got = bench.run([str(out / "engines" / f"{inst['name']}.sh")])
        # Under launch_order healthy an engine after another on its GPU first waits for it (once).
        assert len(waits) <= 1 and all("router.render.wait_healthy" in w["argv"] for w in waits), waits
        assert got["argv"] == want[f"kvcached-{inst['name']}"]
        env = got["env"]
        assert env["KVCACHED_NOTE"] == doc["kvcached"]["kvcached_note"] and env["KVR_KV"] == inst["kvcached_env"]["KVR_KV"]
        assert [env[f"KVR_F{j}"] for j in range(len(inst["engine_env"]))] == \
            [e.partition("=")[2] for e in inst["engine_env"]]
    want["kvcached-frontend"] = router_argv[1:]
    sessions = {r["session"]: r["argv"] for r in bench.run([str(out / "tmux-launch.sh")])}
    assert sessions == want
