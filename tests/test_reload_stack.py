"""A live reload under load: 200 concurrent streams through a supervised --sim stack.

While 200 streams run (half on a model the reload keeps but changes, half on
one it removes), the YAML is edited to add a model, remove another, add an
alias and change a max_concurrency, and the router is told to reload. Every
stream must complete with exactly the simulator's deterministic text; the new
model and alias answer within 1 s of the reload; the removed model answers 404
to new requests while its streams in flight complete.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
from helpers import PY, Proc, Streamed, distinct_ports, post_json, stream_request, wait_for, wait_http
from supervised import Supervised, sim_stack

from router.sim import textgen

pytestmark = pytest.mark.timeout(120)

STREAMS = 200
TOKENS = 20
SIM = "--ttft-ms 3000 --itl-ms 100"  # each stream lasts about 5 s, all open at once before the first token




def config(router_port: int, a: int, b: int, c: int, reloaded: bool) -> dict[str, Any]:
    kept = {"name": "a", "model": "m/a", "engine": "vllm", "engine_args": [f"--port={a}"], "sim_args": [SIM],
            "max_concurrency": 300 if reloaded else 400}
    removed = {"name": "b", "model": "m/b", "engine": "sglang", "engine_args": [f"--port={b}"], "sim_args": [SIM]}
    added = {"name": "c", "model": "m/c", "engine": "vllm", "launch": False, "engine_args": [f"--port={c}"]}
    if reloaded:
        kept["aliases"] = ["a-alias"]
    return {"router": {"router_port": router_port, "access_log": False, "health_check_interval_seconds": 0.5},
            "instances": [kept, added] if reloaded else [kept, removed]}


@pytest.fixture
def stack() -> Iterator[tuple[Supervised, Path, list[int]]]:
    ports = distinct_ports(4)
    with sim_stack(config(*ports, reloaded=False), prefix="kvl") as sup:
        tmp = sup.out.parent
        extra = Proc([PY, "-m", "router.sim", "--engine", "vllm", "--model", "m/c", "--port", str(ports[3])],
                     log=str(tmp / "c.log"))
        try:
            yield sup, tmp, ports
        finally:
            extra.stop()


def expected(i: int) -> tuple[str, dict[str, Any], str]:
    """Stream i: (path, body, the text the simulator will send). Even ones go to the removed model."""
    prompt = f"stream {i}"
    if i % 2:
        return "/v1/completions", {"model": "m/a", "prompt": prompt, "max_tokens": TOKENS, "stream": True}, \
            textgen.generate(prompt, TOKENS)
    messages = [{"role": "user", "content": prompt}]
    return "/v1/chat/completions", {"model": "m/b", "messages": messages, "max_tokens": TOKENS, "stream": True}, \
        textgen.generate(textgen.chat_prompt(messages), TOKENS)


def problem(r: Streamed, text: str) -> str:
    if r.failure or not r.done:
        return f"status {r.status} failure {r.failure} events {len(r.events)}"
    return "" if r.text() == text else f"text {r.text()!r} instead of {text!r}"


def test_reload_under_two_hundred_streams_loses_nothing(stack) -> None:
    sup, tmp, (router_port, a, b, c) = stack
    url = f"http://127.0.0.1:{router_port}"
    sup.wait_running(["a", "b", "logs", "router"])
    for port in (a, b, c, router_port):
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    assert post_json(f"{url}/v1/completions", {"model": "m/c", "prompt": "x", "max_tokens": 2})[0] == 404

    results: list[Streamed] = []

    async def streams() -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            results.extend(await asyncio.gather(*(stream_request(http, url + expected(i)[0], expected(i)[1])
                                                  for i in range(STREAMS))))

    load = threading.Thread(target=lambda: asyncio.run(streams()))
    load.start()
    # Reload once every stream is in flight (the router counts them).
    def in_flight() -> float:
        with urllib.request.urlopen(f"{url}/sleep/status", timeout=5) as r:
            models = json.loads(r.read())["models"]
        return sum(m["in_flight"] for m in models.values())
    wait_for(lambda: in_flight() >= STREAMS, 20, f"{STREAMS} streams in flight", interval=0.05)
    assert in_flight() == STREAMS

    (tmp / "config.yaml").write_text(json.dumps(config(router_port, a, b, c, reloaded=True)))
    status, change = post_json(f"{url}/action/reload", {})
    reloaded_at = time.monotonic()
    assert status == 200, change
    assert change["models"] == {"added": ["m/c"], "removed": ["m/b"], "changed": ["m/a"]}
    assert change["aliases"]["added"] == ["a-alias"]
    assert post_json(f"{url}/v1/completions", {"model": "m/c", "prompt": "x", "max_tokens": 2})[0] == 200
    assert time.monotonic() - reloaded_at < 1.0
    # The new alias leads to the kept model (whose simulated engine takes 3 s to its first token).
    assert post_json(f"{url}/v1/completions", {"model": "a-alias", "prompt": "x", "max_tokens": 2})[0] == 200
    status, err = post_json(f"{url}/v1/chat/completions", {"model": "m/b", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and "'m/b' does not exist" in err["error"]["message"]
    assert in_flight() > 0, "the streams ended before the reload: the test proves nothing"

    load.join(60)
    assert len(results) == STREAMS
    problems = {i: p for i, r in enumerate(results) if (p := problem(r, expected(i)[2]))}
    assert not problems, f"{len(problems)} bad streams, e.g. {list(problems.items())[:3]}"
