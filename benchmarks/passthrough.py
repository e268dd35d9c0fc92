"""A bare pass-through on the router's own stack, as the overhead benchmark's yardstick.

uvicorn (uvloop, httptools) + one aiohttp session, a raw ASGI handler, one
JSON parse to find `model`, bytes relayed as they arrive; no checks, metrics,
traffic stats, health tracking or logging. benchmarks/overhead.py measures it
next to the router in the same run, so the router's figures can be read as
"what the stack costs" plus "what our features cost", on a noisy machine.

    python benchmarks/passthrough.py --port P --upstream MODEL=http://127.0.0.1:8001 [...]
"""
from __future__ import annotations

import argparse
from typing import Any, Awaitable, Callable, MutableMapping, Optional

import aiohttp
import orjson
import uvicorn

Message = MutableMapping[str, Any]


class PassThrough:
    def __init__(self, upstreams: dict[str, str]):
        self.upstreams = upstreams
        self.session: Optional[aiohttp.ClientSession] = None

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert self.session is not None
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["method"] == "GET":  # /health, for the benchmark's readiness wait
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        assert self.session is not None
        url = self.upstreams[orjson.loads(body)["model"]] + scope["path"]
        async with self.session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": [(b"content-type", resp.headers["Content-Type"].encode())]})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", action="append", required=True, metavar="MODEL=URL")
    args = p.parse_args()
    upstreams = dict(u.split("=", 1) for u in args.upstream)
    uvicorn.run(PassThrough(upstreams), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                access_log=False, log_level="warning", backlog=8192)


if __name__ == "__main__":
    main()
