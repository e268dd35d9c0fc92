"""Waiting for a process we just started to answer: the load tools start engines and routers
and must not send their first request into a refused connection."""
from __future__ import annotations

import asyncio
import time

import aiohttp


async def answers_200(session: aiohttp.ClientSession, url: str, timeout: float, poll: float) -> bool:
    """Whether GET `url` answered 200 within `timeout` seconds, asked every `poll` seconds (a refused
    or reset connection is "not yet", like any other status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll)
