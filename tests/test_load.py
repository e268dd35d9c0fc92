"""Load: 2,000 concurrent streaming clients through one router process against
two simulated engines (``python -m router.serve`` and ``python -m router.sim``
as real processes over loopback), with every chunk accounted for.

The simulator's text is deterministic (router.sim.textgen), so each client
knows exactly which tokens the engine sent and checks it got all of them, in
order. The router's RSS per stream is printed (``pytest -s``).
"""
from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import aiohttp
import psutil
import pytest
import yaml
from helpers import PY, Proc, Streamed, distinct_ports, metric_value, raise_own_nofile_limit, stream_request, wait_http

from router.sim import textgen

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

STREAMS = 2000
TOKENS = 16
#: Long enough for every client to connect before the first token, so all streams are open at once.
TTFT_MS = 5000
ITL_MS = 50
SOFT_NOFILE = 1024


class LoadStack:
    def __init__(self, router: Proc, router_port: int, engine_ports: dict[str, int]):
        self.router = psutil.Process(router.pid)
        self.url = f"http://127.0.0.1:{router_port}"
        self.engine_ports = engine_ports

    def metrics(self, url: str) -> str:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            return r.read().decode()


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def load_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LoadStack]:
    """The router as one process, or as a controller and two proxy workers (router.workers: 2)."""
    raise_own_nofile_limit()
    router_port, a, b = distinct_ports(3)
    config = {"router": {"router_port": router_port, "access_log": False, "workers": request.param},
              "instances": [
                  {"name": "a", "model": "load/a", "engine": "vllm", "launch": False, "engine_args": [f"--port={a}"]},
                  {"name": "b", "model": "load/b", "engine": "sglang", "launch": False, "engine_args": [f"--port={b}"]},
              ]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    knobs = ["--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS)]
    procs = [Proc([PY, "-m", "router.sim", "--engine", engine, "--model", model, "--port", str(port), *knobs],
                  log=str(tmp_path / f"{engine}.log"))
             for engine, model, port in (("vllm", "load/a", a), ("sglang", "load/b", b))]
    try:
        # Started with the usual soft limit of 1024 descriptors, too few for 4,000
        # sockets: the router must lift its own soft limit to carry this load.
        router = Proc(["prlimit", f"--nofile={SOFT_NOFILE}:", PY, "-m", "router.serve", "--config", str(path)],
                      log=str(tmp_path / "router.log"))
        procs.append(router)
        for port in (a, b, router_port):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        yield LoadStack(router, router_port, {"a": a, "b": b})
    finally:
        for p in procs:
            p.stop()
        assert all(p.p.poll() is not None for p in procs)


def request(i: int) -> tuple[str, dict, str]:
    """Client i's (path, body, the text the engine will send): completions on one engine, chat on the other."""
    prompt = f"client {i} asks"
    if i % 2:
        return "/v1/completions", {"model": "load/a", "prompt": prompt, "max_tokens": TOKENS, "stream": True}, \
            textgen.generate(prompt, TOKENS)
    messages = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {"model": "load/b", "messages": messages, "max_tokens": TOKENS, "stream": True}, \
        textgen.generate(textgen.chat_prompt(messages), TOKENS)


def check(r: Streamed, chat: bool, expected: str) -> str:
    """'' if the stream is complete and exact, else what is wrong with it."""
    if r.failure or not r.done:
        return f"status {r.status} failure {r.failure} events {len(r.events)}"
    tokens = [c for c in r.chunks() if c["choices"] and (c["choices"][0].get("text")
                                                          or (c["choices"][0].get("delta") or {}).get("content"))]
    if len(tokens) != TOKENS or r.text() != expected:
        return f"{len(tokens)} token chunks, text {r.text()!r} instead of {expected!r}"
    if chat and r.chunks()[0]["choices"][0]["delta"].get("role") != "assistant":
        return "no role chunk"
    return ""


def test_two_thousand_concurrent_streams(load_stack: LoadStack) -> None:
    s = load_stack
    soft, hard = s.router.rlimit(psutil.RLIMIT_NOFILE)
    assert soft == hard > 2 * STREAMS + SOFT_NOFILE, "the router did not raise its open-file limit"

    def rss() -> int:
        """The router's memory: its process and its proxy workers, if any."""
        return sum(p.memory_info().rss for p in [s.router, *s.router.children(recursive=True)] if p.is_running())
    base_rss = rss()
    peak = {"rss": base_rss, "in_flight": 0.0}
    stop = threading.Event()

    def watch() -> None:
        """Peak router RSS, and peak in-flight streams as the router itself counts them."""
        while not stop.is_set():
            try:
                peak["rss"] = max(peak["rss"], rss())
            except psutil.Error:
                pass
            try:
                peak["in_flight"] = max(peak["in_flight"], metric_value(s.metrics(s.url), "router_in_flight_requests"))
            except OSError:
                pass
            time.sleep(0.2)

    async def main() -> list[Streamed]:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            return await asyncio.gather(*(stream_request(http, s.url + request(i)[0], request(i)[1])
                                          for i in range(STREAMS)))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join(5)
    elapsed = time.monotonic() - start

    problems = {i: p for i, r in enumerate(results) if (p := check(r, i % 2 == 0, request(i)[2]))}
    assert not problems, f"{len(problems)} bad streams, e.g. {list(problems.items())[:3]}"
    for name, port in s.engine_ports.items():
        assert metric_value(s.metrics(f"http://127.0.0.1:{port}"), "sim_requests_total") == STREAMS / 2, name
    assert peak["in_flight"] == STREAMS, f"only {peak['in_flight']:.0f} streams were open at once"
    per_stream = (peak["rss"] - base_rss) / STREAMS
    print(f"\nload: {STREAMS} concurrent streams x {TOKENS} tokens, no error, no dropped chunk, in {elapsed:.1f}s; "
          f"router RSS {base_rss / 2**20:.1f} -> {peak['rss'] / 2**20:.1f} MB = {per_stream / 1024:.1f} KB per stream")
    assert per_stream < 200 * 1024
