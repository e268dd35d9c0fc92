"""One owner per model for its life: admission, sleep and wake.

MINIMAL INTERFACE (the sleep manager fills it in): the proxy calls
``await lifecycle.admit()`` before picking a backend and ``lifecycle.release()``
when the request (or stream) has ended. While the model is awake, `admit`
completes without yielding to the event loop.
"""
from __future__ import annotations

import time
from typing import Callable


class ModelUnavailable(Exception):
    """The model cannot take requests now (e.g. its wake failed): answer 503."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Lifecycle:
    def __init__(self, model: str, clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.state = "awake"
        self.in_flight = 0
        self.last_end = clock()
        self._clock = clock

    async def admit(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self.last_end = self._clock()


class SleepManager:
    """Runs the idle loop and engine-state reconciliation (to be filled in).

    The app's lifespan calls `start()` after the upstream session exists and
    `stop()` before it closes.
    """

    def __init__(self, state: object):
        self.state = state

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
