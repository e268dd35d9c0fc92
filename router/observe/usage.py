"""Requests, tokens, errors and 429s per model and client key, over any window up to an hour.

What ``GET /usage`` answers (and the page's usage panel shows). One bucket per
second, each holding a small dict from (model, key name) to five counts, so a
request costs a dict lookup and a few additions; a query walks at most
`MAX_WINDOW_SECONDS` buckets. Keys are counted by their configured `name`
("anonymous" without one), never by the key itself.
"""
from __future__ import annotations

import math
from typing import Optional

#: Longest window a query may ask for (one bucket per second).
MAX_WINDOW_SECONDS = 3600
#: What `/usage` may group by.
GROUPS = ("key", "model")
#: The counts of one (model, key) in one second, in this order.
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")


class UsageWindows:
    """Per-second counts by (model, key); times are the caller's clock (seconds)."""

    __slots__ = ("_stamps", "_buckets")

    def __init__(self) -> None:
        self._stamps = [-1] * MAX_WINDOW_SECONDS
        self._buckets: list[dict[tuple[str, str], list[int]]] = [{} for _ in range(MAX_WINDOW_SECONDS)]

    def add(self, now: float, model: str, key: str, status: int, prompt: Optional[int],
            completion: Optional[int]) -> None:
        """One finished request: a 429 is counted as rate limited, any other status >= 400 as an error."""
        sec = int(now)
        b = sec % MAX_WINDOW_SECONDS
        bucket = self._buckets[b]
        if self._stamps[b] != sec:
            self._stamps[b] = sec
            bucket.clear()
        counts = bucket.get((model, key))
        if counts is None:
            counts = bucket[(model, key)] = [0, 0, 0, 0, 0]
        counts[0] += 1
        if prompt:
            counts[1] += prompt
        if completion:
            counts[2] += completion
        if status == 429:
            counts[4] += 1
        elif status >= 400:
            counts[3] += 1

    def window(self, now: float, seconds: float, by: str) -> dict[str, dict[str, int]]:
        """The counts of the last `seconds` (whole seconds, the current one included), grouped by
        `by` ("key" or "model"): name -> {field: count}."""
        pos = 0 if by == "model" else 1  # in (model, key)
        sec = int(now)
        span = min(MAX_WINDOW_SECONDS, max(1, math.ceil(seconds)))
        out: dict[str, list[int]] = {}
        for s in range(sec - span + 1, sec + 1):
            b = s % MAX_WINDOW_SECONDS
            if self._stamps[b] != s:
                continue
            for pair, counts in self._buckets[b].items():
                name = pair[pos]
                total = out.get(name)
                if total is None:
                    out[name] = list(counts)
                else:
                    for i, n in enumerate(counts):
                        total[i] += n
        return {name: dict(zip(FIELDS, counts)) for name, counts in sorted(out.items())}
