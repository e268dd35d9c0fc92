"""Faults injected for real into the rendered stack: supervisord running the
router and simulated engines (``python -m router.render --sim``) over loopback.

One stack serves the module. Its engines each carry one behaviour (sim_args):
``slow`` streams a token every 20 ms, ``other`` is the model that must never
notice someone else's fault, ``fast`` answers at once with a long context,
``hang`` never answers, ``stall`` stops streams after 3 chunks, ``flaky``
fails 30% of requests with 500. Each test leaves every program RUNNING.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Any, Iterator, Optional

import aiohttp
import psutil
import pytest
from helpers import ROUTER_MODES, Streamed, distinct_ports, http_status, in_both_modes, metric_value, refused, stream_request, wait_for
from supervised import Supervised, alive, sim_stack

pytestmark = pytest.mark.timeout(180)

REQUEST_TIMEOUT = 1.5
IDLE_TIMEOUT = 1.0
GRACE = 10.0
#: Keep-alive connections the router's health probes may hold to an engine (the
#: background prober and an on-demand /health report can overlap).
PROBE_CONNECTIONS = 2

#: Instance name -> (engine, engine_args beyond host/port, sim_args).
ENGINES: dict[str, tuple[str, list[str], list[str]]] = {
    "slow": ("vllm", [], ["--itl-ms 20"]),
    "other": ("sglang", [], ["--itl-ms 5"]),
    "fast": ("vllm", ["--max-model-len 400000"], []),
    "hang": ("vllm", [], ["--hang"]),
    "stall": ("vllm", [], ["--stall-after 3"]),
    "flaky": ("vllm", [], ["--fail-rate 0.3", "--seed 7"]),
}


class FaultStack:
    """The supervised stack and what tests ask of it: URLs, pids, metrics, sockets."""

    def __init__(self, sup: Supervised, router_port: int, ports: dict[str, int], proxies: int):
        self.sup = sup
        #: Processes that proxy requests, each with its own upstream pools (router.workers).
        self.proxies = proxies
        self.router_port = router_port
        self.url = f"http://127.0.0.1:{router_port}"
        self.ports = ports

    def engine_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def pid(self, program: str) -> int:
        return self.sup.pid(program)

    def router(self) -> psutil.Process:
        return psutil.Process(self.pid("router"))

    def metrics(self, base: Optional[str] = None) -> str:
        with urllib.request.urlopen(f"{base or self.url}/metrics", timeout=5) as r:
            return r.read().decode()

    def in_flight(self) -> float:
        return metric_value(self.metrics(), "router_in_flight_requests")

    def upstream(self, name: str, router: Optional[psutil.Process] = None) -> list[Any]:
        """The router's (and its proxy workers') open TCP connections to engine `name`."""
        port = self.ports[name]
        return [c for p in tree(router or self.router()) for c in p.net_connections("tcp")
                if c.raddr and c.raddr.port == port]

    def wait_serving(self, timeout: float = 30) -> None:
        """The router reports every model healthy (it probes each engine's /health)."""
        wait_for(lambda: http_status(f"{self.url}/health/all") == 200, timeout, "every model healthy via the router")


def tree(process: psutil.Process) -> list[psutil.Process]:
    """A process and its children (a router with proxy workers is a controller and its workers)."""
    return [process, *process.children(recursive=True)]


def rss(process: psutil.Process) -> int:
    return sum(p.memory_info().rss for p in tree(process))


def fds(process: psutil.Process) -> int:
    return sum(p.num_fds() for p in tree(process))


def model(name: str) -> str:
    return f"org/{name}"


def completion(name: str, stream: bool, max_tokens: int, prompt: str = "hello") -> dict:
    return {"model": model(name), "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


@pytest.fixture(scope="module", params=ROUTER_MODES)
def fs(request: pytest.FixtureRequest) -> Iterator[FaultStack]:
    """The supervised stack; its router is one process, or a controller and two proxy workers."""
    router_port, *engine_ports = distinct_ports(1 + len(ENGINES))
    ports = dict(zip(ENGINES, engine_ports))
    config = {
        "router": {"router_port": router_port, "request_timeout_seconds": REQUEST_TIMEOUT,
                   "stream_idle_timeout_seconds": IDLE_TIMEOUT, "health_check_interval_seconds": 0.5,
                   "eject_seconds": 1, "shutdown_grace_seconds": GRACE, "workers": request.param},
        "launch_delay_seconds": 0.1,
        "instances": [{"name": n, "model": model(n), "engine": e, "sim_args": sim,
                       "engine_args": ["--host 127.0.0.1", f"--port {ports[n]}", *args]}
                      for n, (e, args, sim) in ENGINES.items()],
    }
    with sim_stack(config) as sup:
        stack = FaultStack(sup, router_port, ports, request.param)
        sup.wait_running([*ENGINES, "router", "logs"], timeout=60)
        stack.wait_serving()
        yield stack
        everything = sup.snapshot()
        sup.shutdown()
        wait_for(lambda: not any(alive(p) for p in everything), 15,
                 f"every process of the stack to exit: {[p for p in everything if alive(p)]}")


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=30))


def ok(r: Streamed, stream: bool) -> bool:
    return r.done if stream else r.status == 200


async def until_served(http: aiohttp.ClientSession, url: str, name: str, timeout: float) -> float:
    """Poll `name` through the router until a request succeeds; the time it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ok(await stream_request(http, url, completion(name, True, 2)), True):
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} was not served again within {timeout}s")


# --------------------------------------------------------------------------
# Engine killed mid-stream


@in_both_modes("fs")
def test_engine_sigkill_during_streams_ends_them_and_recovers(fs: FaultStack) -> None:
    router_pid = fs.pid("router")
    old = fs.pid("slow")
    other: list[tuple[bool, Streamed]] = []

    async def other_traffic(http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            stream = i % 2 == 0
            other.append((stream, await stream_request(http, f"{fs.url}/v1/completions", completion("other", stream, 8))))
            i += 1

    async def main() -> tuple[list[Streamed], float]:
        async with session() as http:
            stop = asyncio.Event()
            background = [asyncio.ensure_future(other_traffic(http, stop)) for _ in range(3)]
            first = [asyncio.Event() for _ in range(20)]
            streams = [asyncio.ensure_future(stream_request(http, f"{fs.url}/v1/completions",
                                                            completion("slow", True, 500, f"p{i}"), first[i]))
                       for i in range(20)]
            try:
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in first)), 10)
                os.kill(old, signal.SIGKILL)
                killed = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*streams), 10)
                await asyncio.to_thread(wait_for, lambda: fs.pid("slow") not in (0, old), 20,
                                        "supervisord to restart the killed engine")
                await until_served(http, fs.url + "/v1/completions", "slow", 20)
            finally:
                stop.set()
                await asyncio.gather(*background)
            return results, killed

    results, killed = asyncio.run(main())
    for r in results:
        assert r.ended - killed < 3, "a stream kept going after its engine died"
        # Each had begun, so each must end with the router's error event: not [DONE], not a cut connection.
        err = r.error_event()
        assert r.status == 200 and r.failure is None and not r.done and err is not None, \
            (r.status, r.events[-2:], r.failure)
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == 502, err
    assert fs.pid("router") == router_pid  # served again without restarting the router
    assert len(other) > 20
    assert [r for stream, r in other if not ok(r, stream)] == []


# --------------------------------------------------------------------------
# Engines that never answer, or stall mid-stream


@in_both_modes("fs")
def test_timeouts_end_hung_and_stalled_requests_and_release_everything(fs: FaultStack) -> None:
    def disconnects(name: str) -> float:
        return metric_value(fs.metrics(fs.engine_url(name)), "sim_client_disconnects_total")
    seen_before = {n: disconnects(n) for n in ("hang", "stall")}

    async def timed(coro: Any) -> tuple[float, Streamed]:
        start = time.monotonic()
        r = await coro
        return r.ended - start, r

    async def main() -> list[tuple[str, float, Streamed]]:
        async with session() as http:
            url = f"{fs.url}/v1/completions"
            cases = [("hang plain", completion("hang", False, 5)), ("hang stream", completion("hang", True, 5)),
                     ("stall stream", completion("stall", True, 50))] * 4
            done = await asyncio.gather(*(timed(stream_request(http, url, body)) for _, body in cases))
            return [(kind, elapsed, r) for (kind, _), (elapsed, r) in zip(cases, done)]

    for kind, elapsed, r in asyncio.run(main()):
        if kind == "hang plain":
            # Nothing came back: 504 in OpenAI shape after request_timeout_seconds.
            assert r.status == 504 and b'"code":504' in r.body
            assert REQUEST_TIMEOUT - 0.1 < elapsed < REQUEST_TIMEOUT + 2
        elif kind == "hang stream":
            # A stream that never starts is ended by the idle timeout, before any byte: a plain 504.
            assert r.status == 504 and b'"code":504' in r.body and b"org/hang" in r.body
            assert IDLE_TIMEOUT - 0.1 < elapsed < IDLE_TIMEOUT + 2
        else:
            # Three chunks, then silence: an SSE error event, no [DONE].
            assert r.status == 200 and len(r.events) == 4 and not r.done
            err = r.error_event()
            assert err is not None and set(err) == {"message", "type", "param", "code"} and err["code"] == 504
            assert IDLE_TIMEOUT - 0.1 < elapsed < IDLE_TIMEOUT + 2

    # Released everywhere: with workers the controller's gauges follow the workers' periodic reports,
    # so the test waits for them (a client could see a stale count for one report period).
    def released(name: str) -> bool:
        metrics = fs.metrics()
        return (metric_value(metrics, "router_in_flight_requests", model=model(name)) == 0
                and metric_value(metrics, "router_backend_outstanding_requests", model=model(name)) == 0
                and metric_value(metrics, "router_upstream_errors_total", model=model(name), kind="timeout") >= 4)
    for name in ("hang", "stall"):
        wait_for(lambda name=name: released(name), 5, f"{name}: nothing in flight or outstanding, 4 timeouts counted")
    # The router closed the upstream connections it gave up on (only health-probe ones
    # remain); each engine saw its client go.
    wait_for(lambda: len(fs.upstream("hang")) <= PROBE_CONNECTIONS and len(fs.upstream("stall")) <= PROBE_CONNECTIONS,
             5, "upstream connections to close")
    wait_for(lambda: disconnects("hang") - seen_before["hang"] == 8, 5, "the hung engine to see 8 disconnects")
    wait_for(lambda: disconnects("stall") - seen_before["stall"] == 4, 5, "the stalled engine to see 4 disconnects")


# --------------------------------------------------------------------------
# Router killed, or stopped gracefully


def test_router_sigkill_under_load_costs_only_the_gap(fs: FaultStack) -> None:
    engines = {n: fs.pid(n) for n in ENGINES}
    old = fs.pid("router")
    log: list[tuple[float, float, bool, str]] = []  # (start, end, ok, what)

    async def client(http: aiohttp.ClientSession, i: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            name, stream = ("other", True) if (i + n) % 2 else ("fast", n % 3 == 0)
            start = time.monotonic()
            r = await stream_request(http, f"{fs.url}/v1/completions", completion(name, stream, 8))
            good = ok(r, stream)
            log.append((start, r.ended, good, r.failure or str(r.status)))
            n += 1
            if not good:
                await asyncio.sleep(0.05)  # refused connections come back at once; do not spin

    async def main() -> tuple[float, float]:
        async with session() as http:
            stop = asyncio.Event()
            clients = [asyncio.ensure_future(client(http, i, stop)) for i in range(6)]
            await asyncio.sleep(1.0)
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: fs.pid("router") not in (0, old), 20, "the router restarted")
            await asyncio.to_thread(wait_for, lambda: http_status(f"{fs.url}/health") == 200, 20, "the router back")
            back = time.monotonic()
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*clients)
            return killed, back

    killed, back = asyncio.run(main())
    failures = [entry for entry in log if not entry[2]]
    assert failures, "killing the router should have cost the requests in flight"
    for start, end, _, what in failures:
        # Only the gap: each failed request was in flight at the kill or sent before the router was back.
        assert end >= killed and start <= back + 0.2, (start - killed, end - killed, what)
        assert not what.isdigit(), f"an HTTP error {what}, not a connection error"
    after = [entry for entry in log if entry[0] > back + 0.2]
    assert len(after) > 20 and all(entry[2] for entry in after)
    assert {n: fs.pid(n) for n in ENGINES} == engines  # the engines never noticed


def test_router_sigterm_finishes_streams_in_flight_and_refuses_new_connections(fs: FaultStack) -> None:
    async def main() -> tuple[list[Streamed], float, float, subprocess.CompletedProcess]:
        async with session() as http:
            first = [asyncio.Event() for _ in range(10)]
            streams = [asyncio.ensure_future(stream_request(http, f"{fs.url}/v1/completions",
                                                            completion("slow", True, 100, f"p{i}"), first[i]))
                       for i in range(10)]
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in first)), 10)
            term = time.monotonic()
            stopping = asyncio.ensure_future(asyncio.to_thread(fs.sup.ctl, "stop", "router"))
            await asyncio.to_thread(wait_for, lambda: refused(fs.router_port), 3, "new connections to be refused")
            refused_at = time.monotonic()
            assert not any(s.done() for s in streams), "the streams ended before new connections were refused"
            results = await asyncio.gather(*streams)
            return results, term, refused_at, await stopping

    results, term, refused_at, stopped = asyncio.run(main())
    assert "stopped" in stopped.stdout
    assert refused_at - term < 1.5
    for _i, r in enumerate(results):
        assert r.done and len(r.chunks()) == 100, (r.status, len(r.events), r.failure)
        assert r.ended - term < GRACE
    assert "started" in fs.sup.ctl("start", "router").stdout
    fs.wait_serving()


# --------------------------------------------------------------------------
# Slow reader: backpressure, not buffering


def tcp_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (tx_queue, rx_queue) of every IPv4 loopback TCP socket."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, queues = fields[1], fields[2], fields[4]
            tx, rx = (int(q, 16) for q in queues.split(":"))
            out[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = (tx, rx)
    return out


def test_slow_reader_gets_backpressure_not_buffering(fs: FaultStack) -> None:
    tokens = 150_000  # about 30 MB of SSE: all of it buffered would show plainly in the RSS
    router = fs.router()
    base_rss = rss(router)
    generated = "vllm:generation_tokens_total"
    before = metric_value(fs.metrics(fs.engine_url("fast")), generated)
    timeouts = metric_value(fs.metrics(), "router_upstream_errors_total", model="org/fast", kind="timeout")
    body = ('{"model":"org/fast","prompt":"slow reader","max_tokens":%d,"stream":true}' % tokens).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", fs.router_port))
    try:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        read = 0
        peak = base_rss
        backpressure = []  # per check: (router's unread bytes, engine's unsent bytes) on the stream's connection
        start = time.monotonic()
        checks = [start + 1.0 + 0.75 * k for k in range(4)]  # reading /proc is slow: a few checks only
        while checks:
            read += len(client.recv(1024))
            time.sleep(0.02)
            peak = max(peak, rss(router))
            if time.monotonic() < checks[0]:
                continue
            checks.pop(0)
            queues = tcp_queues()
            for c in fs.upstream("fast", router):
                engine_side = queues.get((fs.ports["fast"], c.laddr.port), (0, 0))
                router_side = queues.get((c.laddr.port, fs.ports["fast"]), (0, 0))
                if router_side[1] > 0 and engine_side[0] > 0:
                    backpressure.append((router_side[1], engine_side[0]))
        # The engine has produced the whole generation; the client has read a sliver.
        assert metric_value(fs.metrics(fs.engine_url("fast")), generated) - before == tokens
        assert read < 1_000_000
        # The rest waits on the engine's side of the upstream connection: the router
        # stops reading it (its receive queue stays full) instead of buffering.
        assert len(backpressure) == 4, backpressure
        # Waiting on the client is not engine silence: no idle timeout ended the stream.
        assert metric_value(fs.metrics(), "router_upstream_errors_total", model="org/fast", kind="timeout") == timeouts
        assert peak - base_rss < 10 * 2**20, f"router RSS grew {(peak - base_rss) / 2**20:.1f} MB"
    finally:
        client.close()
    wait_for(lambda: metric_value(fs.metrics(), "router_in_flight_requests", model="org/fast") == 0, 5,
             "the router to drop the abandoned stream")
    wait_for(lambda: not any(tcp_queues().get((c.laddr.port, fs.ports["fast"]), (0, 0))[1]
                             for c in fs.upstream("fast")), 5, "the upstream connection of the stream to close")
    assert rss(router) - base_rss < 10 * 2**20


# --------------------------------------------------------------------------
# Connection hygiene


WORKERS = 32


def mixed_request(i: int) -> tuple[dict, Optional[int], str]:
    """The i-th request of the hygiene mix: (body, events to read before hanging up, kind)."""
    slot = i % 20
    if slot < 10:
        return completion("fast", False, 4, f"q{i}"), None, "plain"
    if slot < 14:
        return completion("fast", True, 8, f"q{i}"), None, "stream"
    if slot < 16:
        return completion("slow", True, 50, f"q{i}"), 1, "disconnect"
    if slot < 19:
        return completion("flaky", slot == 17, 4, f"q{i}"), None, "flaky"
    return completion("other", True, 4, f"q{i}"), None, "stream"


async def run_mix(url: str, count: int, timeouts: int) -> dict[str, int]:
    """`count` requests of the mix from WORKERS clients, `timeouts` of them to hung/stalled engines."""
    outcomes: dict[str, int] = {}
    next_i = 0

    def note(kind: str, r: Streamed, stream: bool) -> None:
        if kind == "disconnect":
            good = r.status == 200 and len(r.events) == 1
        elif kind == "flaky":
            good = ok(r, stream) or r.status == 500
        elif kind == "timeout":
            # 504 for those sent to the hung engine; 503 for those still queued when the first 504 opened
            # its circuit breaker (they are refused at once instead of waiting for the same hang).
            good = r.status in (503, 504) or (r.error_event() or {}).get("code") == 504
        else:
            good = ok(r, stream)
        key = kind if good else f"{kind} FAILED {r.status} {r.failure}"
        outcomes[key] = outcomes.get(key, 0) + 1

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < count - timeouts:
            i, next_i = next_i, next_i + 1
            body, stop_after, kind = mixed_request(i)
            note(kind, await stream_request(http, url, body, stop_after=stop_after), body["stream"])

    async def timeout(http: aiohttp.ClientSession, i: int) -> None:
        body = completion("hang", i % 2 == 0, 4) if i % 3 else completion("stall", True, 10)
        note("timeout", await stream_request(http, url, body), body["stream"])

    async with session() as http:
        await asyncio.gather(*(timeout(http, i) for i in range(timeouts)), *(worker(http) for _ in range(WORKERS)))
    return outcomes


@pytest.mark.slow
def test_connection_hygiene_after_ten_thousand_mixed_requests(fs: FaultStack) -> None:
    url = f"{fs.url}/v1/completions"
    router = fs.router()
    asyncio.run(run_mix(url, 1000, 0))  # warm up: pools, caches and allocator reach their working size
    time.sleep(0.5)
    base_rss, base_fds = rss(router), fds(router)
    base_pooled = sum(len(fs.upstream(n, router)) for n in ENGINES)

    start = time.monotonic()
    outcomes = asyncio.run(run_mix(url, 10_000, 60))
    elapsed = time.monotonic() - start
    print(f"\nhygiene: 10,000 mixed requests in {elapsed:.1f}s: {outcomes}")
    assert sum(outcomes.values()) == 10_000
    assert all("FAILED" not in k for k in outcomes), outcomes
    assert outcomes["timeout"] == 60 and outcomes["disconnect"] >= 900

    wait_for(lambda: fs.in_flight() == 0, 5, "no request in flight")
    time.sleep(0.5)
    conns = {n: fs.upstream(n, router) for n in ENGINES}
    # Pooled keep-alive connections only: at most one per client that ran at once in each
    # proxy process (and the health probes'); none but the probes' to engines whose every
    # request was abandoned (disconnects, timeouts).
    for name in ("fast", "flaky", "other"):
        assert len(conns[name]) <= WORKERS * fs.proxies + PROBE_CONNECTIONS, (name, len(conns[name]))
    for name in ("slow", "hang", "stall"):
        assert len(conns[name]) <= PROBE_CONNECTIONS, (name, conns[name])
    assert all(c.status == psutil.CONN_ESTABLISHED for cs in conns.values() for c in cs)
    now_rss, now_fds = rss(router), fds(router)
    print(f"hygiene: router RSS {base_rss / 2**20:.1f} -> {now_rss / 2**20:.1f} MB, fds {base_fds} -> {now_fds}, "
          f"upstream connections {({n: len(c) for n, c in conns.items()})}")
    # Every descriptor beyond the baseline is one of the pooled connections counted above.
    assert now_fds - sum(map(len, conns.values())) <= base_fds - base_pooled + 2
    assert now_rss - base_rss < 8 * 2**20
