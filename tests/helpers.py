"""Shared test utilities: free ports, waiting on a condition, owned subprocesses.

Tests never kill processes by name: other suites may share the machine.
Each process a test starts is tracked and its whole group is ended.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar, Union

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

PY = sys.executable
T = TypeVar("T")


#: The two ways a router runs, for the stack fixtures' params: one process, or a controller and two
#: proxy workers (``router.workers: 2``). The second starts three router processes per test, so the fast
#: suite runs it only for the tests marked `in_both_modes`; ``-m slow`` runs it for the rest.
ROUTER_MODES = [pytest.param(1, id="one-process"), pytest.param(2, id="two-workers", marks=pytest.mark.slow)]


def in_both_modes(fixture: str) -> pytest.MarkDecorator:
    """Run this test in both router modes in the fast suite (through `fixture`, whose params are
    `ROUTER_MODES`): for the guarantees about what proxy workers share with their controller."""
    return pytest.mark.parametrize(fixture, [1, 2], ids=["one-process", "two-workers"], indirect=True)


#: Ports are drawn by chance (per process: several suites share the machine), never twice alike.
_ports = random.Random(os.urandom(16))


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port nothing listens on now; use `distinct_ports` for several.

    Drawn below the kernel's ephemeral range: a port from that range (what binding to port 0 gives)
    can become the local end of any client connection on the machine before the test's server binds
    it, which under load failed tests with "address already in use".
    """
    low = _ephemeral_ports()[0]
    if low <= 12000:  # no room below the range: the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    while True:
        port = _ports.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_for(check: Callable[[], T], timeout: float = 5.0, what: str = "the condition", interval: float = 0.1) -> T:
    """Poll `check` until it returns something truthy and return that value.

    The one way a test waits for another thread or process: on something it can observe (a state,
    a counter, an acknowledgement), never on a fixed sleep. A timeout is an AssertionError naming
    `what` and the last value seen, so the failure says what never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


async def wait_for_async(check: Callable[[], Union[T, Awaitable[T]]], timeout: float = 5.0,
                         what: str = "the condition", interval: float = 0.02) -> T:
    """`wait_for` for a test that runs on an event loop: the loop keeps serving between polls,
    and `check` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def distinct_ports(n: int) -> list[int]:
    """`n` free ports, all different (free_port alone may repeat one)."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def render(tmp: Path, config: dict, *flags: str) -> Path:
    """Write `config` (JSON is YAML) and render it with the real CLI; the output folder."""
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    out = tmp / "out"
    done = subprocess.run([PY, "-m", "router.render", "--config", str(path), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def http_status(url: str, timeout: float = 1.0) -> Optional[int]:
    """Status of GET `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, urllib.error.URLError):
        return None


def refused(port: int) -> bool:
    """Whether a connection to loopback `port` is refused (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def wait_http(url: str, status: int = 200, timeout: float = 30.0) -> None:
    """Wait until GET `url` answers `status`."""
    wait_for(lambda: http_status(url) == status, timeout, f"{url} to answer {status}")


class Proc:
    """A subprocess in its own process group, ended with its children."""

    def __init__(self, argv: Sequence[str], env: Optional[dict] = None, log: Optional[str] = None):
        self.log_path = log
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.p = subprocess.Popen(list(argv), env={**os.environ, **(env or {})}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        if log:
            out.close()

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
            except ProcessLookupError:
                pass


def start_sim(engine: str, model: str, port: int, *args: str, log: Optional[str] = None) -> Proc:
    """The simulated engine as its own process. Not waited on: callers start several
    and then wait for each one's /health, so the engines start up side by side."""
    return Proc([PY, "-m", "router.sim", "--engine", engine, "--model", model,
                 "--host", "127.0.0.1", "--port", str(port), *args], log=log)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def kvcached_fixture(tmp: str) -> str:
    """The kvcached-format fixture copied into `tmp`/cfg, with the virtualenvs
    it names (relative to the config's folder) made to exist; returns its path."""
    cfg_dir = os.path.join(tmp, "cfg")
    os.makedirs(cfg_dir, exist_ok=True)
    for venv in ("vllm-v0.9.2", "sglang-v0.4.9"):
        bin_dir = os.path.join(tmp, "engine_integration", venv, ".venv", "bin")
        os.makedirs(bin_dir, exist_ok=True)
        os.symlink(PY, os.path.join(bin_dir, "python"))
    path = os.path.join(cfg_dir, "config.yaml")
    with open(os.path.join(FIXTURES, "kvcached-format.yaml"), "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    return path


@pytest.fixture
def short_tmp():
    """A temp folder with a short path: unix socket paths (supervisord's,
    tmux's) must stay under 108 bytes, which pytest's tmp_path can exceed."""
    path = tempfile.mkdtemp(prefix="kvr", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Streamed:
    """What a client saw of one request: status, SSE data payloads, or the connection error."""

    def __init__(self, status: int = 0, events: Optional[list[bytes]] = None, body: bytes = b"",
                 failure: Optional[str] = None, ended: float = 0.0):
        self.status = status
        self.events = events or []
        self.body = body
        self.failure = failure
        self.ended = ended

    @property
    def done(self) -> bool:
        """A complete stream: status 200 and the closing [DONE]."""
        return self.status == 200 and bool(self.events) and self.events[-1] == b"[DONE]"

    def chunks(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e != b"[DONE]"]

    def text(self) -> str:
        """The generated text: completion `text` or chat `delta.content` of every chunk."""
        parts = []
        for c in self.chunks():
            for choice in c.get("choices") or ():
                parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        return "".join(parts)

    def error_event(self) -> Optional[dict]:
        """The OpenAI-shaped error the router put in the stream, if any."""
        found = [c["error"] for c in self.chunks() if "error" in c]
        return found[-1] if found else None


async def stream_request(http: aiohttp.ClientSession, url: str, body: dict, first: Optional[asyncio.Event] = None,
                         stop_after: Optional[int] = None) -> Streamed:
    """POST `body` with aiohttp and read it as SSE; `first` is set on the first data event.

    `stop_after` N: close the connection after N events, as a client that gives up.
    Connection failures are returned (`failure`), not raised, so load tests can count them.
    """
    out = Streamed()
    try:
        async with http.post(url, json=body) as r:
            out.status = r.status
            if r.content_type != "text/event-stream":
                out.body = await r.read()
                return out
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                out.events.append(line[6:].rstrip())
                if first is not None and len(out.events) == 1:
                    first.set()
                if stop_after is not None and len(out.events) >= stop_after:
                    r.close()
                    return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        out.failure = type(e).__name__
    finally:
        out.ended = time.monotonic()
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample `name` over the series matching `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def raise_own_nofile_limit() -> None:
    """This test process holds a socket per client: lift its soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def get_json(url: str, headers: Optional[dict] = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of GET `url`, error statuses included."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_json(url: str, body: Any, headers: Optional[dict] = None) -> tuple[int, Any]:
    """(status, parsed JSON body) of POST `url` with a JSON body, error statuses included."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


App = TypeVar("App", bound="LoopbackApp")


class LoopbackApp:
    """A test's own small aiohttp server on 127.0.0.1 (a fake engine, a trace receiver): subclasses
    add their routes in `routes` and keep what arrives; `start` and `stop` run on the test's loop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runner: Optional[web.AppRunner] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self: App) -> App:
        app = web.Application()
        self.routes(app)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.2)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
