"""One background task that runs a round of work every few seconds, for the router's whole life.

The health checker, the idle loop and the supervisord watcher each run one;
a round that raises is logged and the next one runs as planned, since one
bad round must not end the work for good.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Optional


class Periodic:
    """`work()` every `interval()` seconds (read afresh each time: a reload may change it)."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], interval: Callable[[], float],
                 log: logging.Logger, first_at_once: bool = True):
        self._name = name
        self._work = work
        self._interval = interval
        self._log = log
        self._first_at_once = first_at_once
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def running(self) -> bool:
        """Started, not stopped, and not ended by anything (a round's exceptions never end it)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        if not self._first_at_once:
            await asyncio.sleep(self._interval())
        while True:
            try:
                await self._work()
            except Exception:
                self._log.exception("%s: one round failed; the next runs as planned", self._name)
            await asyncio.sleep(self._interval())
