"""Per-model traffic counters and windows.

MINIMAL INTERFACE (the traffic monitor fills it in): the proxy calls
`record` once per finished request.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional


class Traffic:
    def __init__(self, models: Iterable[str], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.totals = {m: 0 for m in models}

    def record(self, model: str, status: int, latency_s: float, ttfb_s: Optional[float], stream: bool) -> None:
        self.totals[model] += 1
