"""Per-model traffic counters and windows, cheap enough for every request.

The proxy calls `Traffic.record` once per finished request, so recording is a
handful of integer and float stores into preallocated arrays: per-second
buckets (exact request counts over any window up to `MAX_WINDOW_SECONDS`) and
a ring of the most recent `SAMPLE_SIZE` requests (latency and time-to-first-
byte percentiles over the window, from at most that many requests). Reading
the numbers (`summary`) does the work instead, since it runs rarely.

`Traffic` is also where every finished request is accounted for the operator:
its tokens and errors per model and key (`usage`, ``GET /usage``) and its line
in the activity log (`activity`, ``router.activity_log``). Under
``router.workers`` only the controller's `Traffic` records (the workers relay
each request to it), so these have one writer.

In-flight requests and the time the last request ended belong to the model's
`Lifecycle` (it must know them to decide sleep safely); the admin endpoints
join the two.
"""
from __future__ import annotations

import math
import time
from array import array
from typing import Callable, Iterable, Optional

from router.observe.activity import ActivityLog
from router.observe.usage import UsageWindows

#: Longest window a query may ask for (one bucket per second).
MAX_WINDOW_SECONDS = 3600
#: Requests kept for latency percentiles.
SAMPLE_SIZE = 4096


class ModelTraffic:
    """Counters of one model. Times are the traffic clock's (monotonic)."""

    __slots__ = ("total", "successful", "failed", "latency_sum", "ttfb_sum", "streams",
                 "_stamps", "_counts", "_fails", "_ends", "_lat", "_ttfb", "_next")

    def __init__(self) -> None:
        self.total = 0
        self.successful = 0
        self.failed = 0
        #: Sum of latencies of successful requests (kvcached's average is over those).
        self.latency_sum = 0.0
        self.ttfb_sum = 0.0
        self.streams = 0
        self._stamps = array("q", [-1]) * MAX_WINDOW_SECONDS
        self._counts = array("q", [0]) * MAX_WINDOW_SECONDS
        self._fails = array("q", [0]) * MAX_WINDOW_SECONDS
        self._ends = array("d", [-math.inf]) * SAMPLE_SIZE
        self._lat = array("d", [0.0]) * SAMPLE_SIZE
        self._ttfb = array("d", [math.nan]) * SAMPLE_SIZE
        self._next = 0

    def add(self, now: float, ok: bool, latency_s: float, ttfb_s: Optional[float]) -> None:
        self.total += 1
        sec = int(now)
        b = sec % MAX_WINDOW_SECONDS
        if self._stamps[b] != sec:
            self._stamps[b] = sec
            self._counts[b] = 0
            self._fails[b] = 0
        self._counts[b] += 1
        if ok:
            self.successful += 1
            self.latency_sum += latency_s
        else:
            self.failed += 1
            self._fails[b] += 1
        i = self._next
        self._next = (i + 1) % SAMPLE_SIZE
        self._ends[i] = now
        self._lat[i] = latency_s
        if ttfb_s is None:
            self._ttfb[i] = math.nan
        else:
            self._ttfb[i] = ttfb_s
            self.ttfb_sum += ttfb_s
            self.streams += 1

    def window_counts(self, now: float, window: float) -> tuple[int, int]:
        """(requests, failed requests) that ended in the last `window` seconds.

        Whole seconds: the current second counts, plus ``ceil(window) - 1``
        seconds before it.
        """
        sec = int(now)
        span = min(MAX_WINDOW_SECONDS, max(1, math.ceil(window)))
        n = fails = 0
        for s in range(sec - span + 1, sec + 1):
            b = s % MAX_WINDOW_SECONDS
            if self._stamps[b] == s:
                n += self._counts[b]
                fails += self._fails[b]
        return n, fails

    def window_samples(self, now: float, window: float) -> tuple[list[float], list[float]]:
        """Latencies and stream TTFBs of the sampled requests in the window."""
        cutoff = now - window
        lat: list[float] = []
        ttfb: list[float] = []
        for end, latency, first in zip(self._ends, self._lat, self._ttfb):
            if end >= cutoff:
                lat.append(latency)
                if first == first:  # not NaN
                    ttfb.append(first)
        return lat, ttfb


def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (`q` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Traffic:
    """Traffic of every configured model, keyed by the model's canonical name."""

    def __init__(self, models: Iterable[str], clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._models = {m: ModelTraffic() for m in models}
        #: Offset turning the traffic clock into Unix time, for reports.
        self.wall_offset = time.time() - clock()
        #: Requests, tokens, errors and 429s per model and key (GET /usage).
        self.usage = UsageWindows()
        #: The activity log (router.activity_log), when configured; set by the router's state.
        self.activity: Optional[ActivityLog] = None

    def follow(self, models: Iterable[str]) -> None:
        """Track exactly `models` after a reload: new ones start empty, removed ones are forgotten,
        the others keep their history."""
        self._models = {m: self._models.get(m) or ModelTraffic() for m in models}

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def record(self, model: str, status: int, latency_s: float, ttfb_s: Optional[float], stream: bool,
               key: str = "anonymous", prompt: Optional[int] = None, completion: Optional[int] = None,
               instance: Optional[str] = None, retries: int = 0) -> None:
        """Count one finished request; `status` < 400 is a success.

        `ttfb_s` is kept for streams only (for a non-streaming answer the
        first byte is the whole answer, already in the latency). `key` is
        the client key's name; `prompt` and `completion` the engine's usage.
        """
        m = self._models.get(model)
        if m is not None:
            now = self._clock()
            m.add(now, 0 < status < 400, latency_s, ttfb_s if stream else None)
            self.usage.add(now, model, key, status, prompt, completion)
        if self.activity is not None:
            self.activity.request(key, model, instance, status, prompt, completion, latency_s, ttfb_s, retries)

    def usage_window(self, window: float, by: str) -> dict[str, dict[str, int]]:
        """The counts of the last `window` seconds by "key" or "model" (router/observe/usage.py)."""
        return self.usage.window(self._clock(), window, by)

    def total(self, model: str) -> int:
        return self._models[model].total

    def summary(self, model: str, window: float) -> dict:
        """The numbers of one model over `window` seconds (zeros when it had no traffic)."""
        m = self._models[model]
        now = self._clock()
        n, fails = m.window_counts(now, window)
        lat, ttfb = m.window_samples(now, window)
        return {
            "total_requests": m.total,
            "successful_requests": m.successful,
            "failed_requests": m.failed,
            "requests_in_window": n,
            "failed_in_window": fails,
            "request_rate": n / window,
            "avg_response_time": m.latency_sum / m.successful if m.successful else 0.0,
            "p50_response_time": percentile(lat, 50),
            "p99_response_time": percentile(lat, 99),
            "streams": m.streams,
            "avg_ttfb": m.ttfb_sum / m.streams if m.streams else 0.0,
            "p50_ttfb": percentile(ttfb, 50),
            "p99_ttfb": percentile(ttfb, 99),
        }
