"""Measure what the simulator costs: its CPU time per request and per streamed chunk.

    python -m router.sim.loadtest [--requests 20000] [--concurrency 64]
                                  [--streams 1000] [--tokens 50] [--itl-ms 20]

Starts ``python -m router.sim`` as its own process, drives it from this one
with aiohttp (non-streaming requests at a fixed concurrency, then many
concurrent streams), and divides the simulator's user+system CPU time (from
/proc via psutil) by the work done. CPU time rather than wall time, because it
is what the simulator takes away from a router under benchmark on the same
cores, and it holds on a noisy machine.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Awaitable, Callable, Sequence

import aiohttp
import orjson
import psutil

from router.engines import ENGINES
from router.util.answering import answers_200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        if await answers_200(http, url + "/health", 10.0, 0.05):
            return
    raise SystemExit(f"the simulator at {url} did not come up")


async def _plain(url: str, requests: int, concurrency: int) -> int:
    body = orjson.dumps({"model": "m", "prompt": "hello world", "max_tokens": 16})
    left = requests
    ok = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal left, ok
        while left > 0:
            left -= 1
            async with http.post(url + "/v1/completions", data=body,
                                 headers={"content-type": "application/json"}) as r:
                await r.read()
                ok += r.status == 200

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return ok


async def _streams(url: str, streams: int, tokens: int) -> int:
    body = orjson.dumps({"model": "m", "prompt": "hello world", "max_tokens": tokens, "stream": True})
    chunks = 0

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal chunks
        async with http.post(url + "/v1/completions", data=body,
                             headers={"content-type": "application/json"}) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunks += 1

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as http:
        await asyncio.gather(*(one(http) for _ in range(streams)))
    return chunks


async def _with_sim(args: argparse.Namespace, extra: Sequence[str], itl_ms: float, phase: Callable[[str, psutil.Process], Awaitable[None]]) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    sim = subprocess.Popen([sys.executable, "-m", "router.sim", "--engine", args.engine, "--model", "m",
                            "--port", str(port), "--itl-ms", str(itl_ms), *extra],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        await _wait_up(url)
        await phase(url, psutil.Process(sim.pid))
    finally:
        os.killpg(sim.pid, 15)
        sim.wait(10)


async def _measure(args: argparse.Namespace, extra: Sequence[str]) -> None:
    async def plain(url: str, proc: psutil.Process) -> None:
        await _plain(url, min(500, args.requests), args.concurrency)  # warm up
        c0, t0 = _cpu(proc), time.monotonic()
        ok = await _plain(url, args.requests, args.concurrency)
        c1, t1 = _cpu(proc), time.monotonic()
        print(f"non-streaming: {ok} requests (16 tokens, no delays, concurrency {args.concurrency}) in "
              f"{t1 - t0:.1f} s; sim CPU {1e6 * (c1 - c0) / max(ok, 1):.1f} us/request")

    async def streams(url: str, proc: psutil.Process) -> None:
        c0, t0 = _cpu(proc), time.monotonic()
        chunks = await _streams(url, args.streams, args.tokens)
        c1, t1 = _cpu(proc), time.monotonic()
        print(f"streaming: {args.streams} concurrent streams x {args.tokens} tokens at {args.itl_ms} ms "
              f"({chunks} chunks) in {t1 - t0:.1f} s; sim CPU {1e6 * (c1 - c0) / max(chunks, 1):.1f} us/chunk "
              f"(request overhead included); sim RSS {proc.memory_info().rss / 2**20:.0f} MiB")

    await _with_sim(args, extra, 0.0, plain)
    await _with_sim(args, extra, args.itl_ms, streams)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router.sim.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=next(iter(ENGINES)), choices=tuple(ENGINES))
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--itl-ms", type=float, default=20.0)
    args, extra = p.parse_known_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_measure(args, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
