"""One background task that runs a round of work every few seconds, for the router's whole life.

The health checker, the idle loop and the supervisord watcher each run one;
a round that raises is logged and the next one runs as planned, since one
bad round must not end the work for good. A loop whose work has deadlines of
its own (the idle loop: a model idle for ``idle_stop_seconds``) says how soon
the next one falls (`sooner`), and is poked when something that may bring it
forward happens, so it runs at the deadline rather than up to an interval late.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Optional


class Periodic:
    """`work()` every `interval()` seconds (read afresh each time: a reload may change it), or sooner
    when `sooner()` says so (seconds from now; None: nothing sooner)."""

    def __init__(self, name: str, work: Callable[[], Awaitable[object]], interval: Callable[[], float],
                 log: logging.Logger, first_at_once: bool = True,
                 sooner: Optional[Callable[[], Optional[float]]] = None):
        self._name = name
        self._work = work
        self._interval = interval
        self._sooner = sooner
        self._log = log
        self._first_at_once = first_at_once
        self._task: Optional[asyncio.Task[None]] = None
        #: Made at each start, in the loop that runs the task.
        self._poked: Optional[asyncio.Event] = None

    @property
    def running(self) -> bool:
        """Started, not stopped, and not ended by anything (a round's exceptions never end it)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._poked = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Something changed that may bring the next round forward: `sooner()` is asked again now
        (a round under way is not disturbed; the wait after it asks anyway)."""
        if self._poked is not None:
            self._poked.set()

    async def _run(self) -> None:
        if not self._first_at_once:
            await self._pause()
        while True:
            try:
                await self._work()
            except Exception:
                self._log.exception("%s: one round failed; the next runs as planned", self._name)
            await self._pause()

    async def _pause(self) -> None:
        """Until the next round: `interval()` after the last one ended, or when `sooner()` says, asked again
        at every poke."""
        loop = asyncio.get_running_loop()
        ended = loop.time()
        poked = self._poked
        assert poked is not None, "made by start()"
        while True:
            poked.clear()
            wait = self._interval() - (loop.time() - ended)
            if self._sooner is not None:
                soon = self._sooner()
                if soon is not None:
                    wait = min(wait, soon)
            if wait <= 0:
                return
            try:
                await asyncio.wait_for(poked.wait(), wait)
            except asyncio.TimeoutError:
                return
