"""One key's limits: requests and tokens per minute over a sliding window, and requests in flight.

Pure bookkeeping on a clock the caller passes in (no server, no loop), so one
owner can hold it: the router, or with ``router.workers`` the controller, which
the workers ask (router/server/workers/messages.py).

Tokens are charged when an answer ends, at the time it ends: a request in
flight holds a *reservation* of its bound (its prompt estimated from its size,
plus its ``max_tokens``), which its end replaces by what the engine reports it
used. A request is let in when the window's charged tokens, the reservations
of those in flight and its own bound fit in ``tpm``; otherwise its
Retry-After is the time at which enough charged tokens leave the window (a
full window when only reservations stand in the way: they leave when their
requests end, which no clock can say).
"""
from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple, Optional, Union

#: The window of `rpm` and `tpm`, in seconds.
WINDOW_SECONDS = 60.0


class Limits(NamedTuple):
    """A key's limits; None: none of that kind."""

    rpm: Optional[int] = None
    tpm: Optional[int] = None
    max_concurrency: Optional[int] = None


class Standing(NamedTuple):
    """Where a key stands after a decision, for the ``x-ratelimit-*`` headers (None: no such limit)."""

    rpm: Optional[int]
    remaining_requests: int
    reset_requests: float
    tpm: Optional[int]
    remaining_tokens: int
    reset_tokens: float


class Refusal(NamedTuple):
    """Why a request may not go now (status 429, or 400 when it can never fit), and when to retry."""

    status: int
    message: str
    retry_after: int
    standing: Standing


def whole_seconds(seconds: float) -> int:
    """Retry-After in whole seconds, never 0 (a client retrying at once would be refused again)."""
    return max(1, math.ceil(seconds - 1e-9))


class KeyQuota:
    """The counters of one key. `admit` decides and counts; `finish` ends what `admit` let in."""

    __slots__ = ("limits", "requests", "charged", "charged_total", "reserved", "in_flight")

    def __init__(self, limits: Limits):
        self.limits = limits
        #: When each request of the window was let in, oldest first.
        self.requests: deque[float] = deque()
        #: (when charged, tokens) of the answers that ended within the window, oldest first.
        self.charged: deque[tuple[float, int]] = deque()
        self.charged_total = 0
        #: The bounds of the requests in flight.
        self.reserved = 0
        self.in_flight = 0

    def _expire(self, now: float) -> None:
        since = now - WINDOW_SECONDS
        requests = self.requests
        while requests and requests[0] <= since:
            requests.popleft()
        charged = self.charged
        while charged and charged[0][0] <= since:
            self.charged_total -= charged.popleft()[1]

    def standing(self, now: float) -> Standing:
        self._expire(now)
        rpm, tpm = self.limits.rpm, self.limits.tpm
        reset_requests = self.requests[0] + WINDOW_SECONDS - now if self.requests else 0.0
        reset_tokens = self.charged[0][0] + WINDOW_SECONDS - now if self.charged else 0.0
        return Standing(rpm, max(0, (rpm or 0) - len(self.requests)), reset_requests,
                        tpm, max(0, (tpm or 0) - self.charged_total - self.reserved), reset_tokens)

    def admit(self, now: float, bound: int) -> Union[Standing, Refusal]:
        """Let one request in (counting it, and reserving `bound` tokens), or say why not."""
        self._expire(now)
        limits = self.limits
        if limits.max_concurrency is not None and self.in_flight >= limits.max_concurrency:
            return Refusal(429, f"This key has {self.in_flight} requests in flight, its limit (max_concurrency "
                                f"{limits.max_concurrency}); retry when one ends.", 1, self.standing(now))
        if limits.rpm is not None and len(self.requests) >= limits.rpm:
            # The request that leaves the window next frees a place (more than one if rpm was lowered).
            frees = self.requests[len(self.requests) - limits.rpm] + WINDOW_SECONDS - now
            return Refusal(429, f"This key's limit of {limits.rpm} requests per minute is reached; retry in "
                                f"{whole_seconds(frees)} s.", whole_seconds(frees), self.standing(now))
        if limits.tpm is not None:
            refusal = self._tokens_refusal(now, bound, limits.tpm)
            if refusal is not None:
                return refusal
        self.requests.append(now)
        self.reserved += bound
        self.in_flight += 1
        return self.standing(now)

    def _tokens_refusal(self, now: float, bound: int, tpm: int) -> Optional[Refusal]:
        if bound > tpm:
            return Refusal(400, f"This request may use up to {bound} tokens (its prompt, estimated, plus its "
                                f"max_tokens), more than this key's limit of {tpm} tokens per minute; lower "
                                "max_tokens or shorten the prompt.", 1, self.standing(now))
        over = self.charged_total + self.reserved + bound - tpm
        if over <= 0:
            return None
        freed = 0
        wait = WINDOW_SECONDS  # only reservations stand in the way: they end with their requests
        for at, tokens in self.charged:
            freed += tokens
            if freed >= over:
                wait = at + WINDOW_SECONDS - now
                break
        return Refusal(429, f"This key's limit of {tpm} tokens per minute would be passed: the last minute holds "
                            f"{self.charged_total + self.reserved} and this request may use up to {bound}; retry in "
                            f"{whole_seconds(wait)} s.", whole_seconds(wait), self.standing(now))

    def finish(self, now: float, bound: int, used: Optional[int]) -> None:
        """A request `admit` let in has ended: its reservation becomes what it used (its bound when
        the engine did not say)."""
        # Never below zero: a reload may have dropped the key and brought it back while this ran.
        self.in_flight = max(0, self.in_flight - 1)
        self.reserved = max(0, self.reserved - bound)
        if self.limits.tpm is not None:
            tokens = bound if used is None else used
            self.charged.append((now, tokens))
            self.charged_total += tokens
        self._expire(now)


class Quotas:
    """Every limited key's counters, by name; a reload keeps the counters of the names that stay."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyQuota] = {}

    def update(self, limits: dict[str, Limits]) -> None:
        """The keys and limits of a (re)loaded config; requests in flight of a dropped key end quietly."""
        kept = {}
        for name, lim in limits.items():
            quota = self.keys.get(name) or KeyQuota(lim)
            quota.limits = lim
            kept[name] = quota
        self.keys = kept

    def admit(self, name: str, now: float, bound: int) -> Union[Standing, Refusal, None]:
        """The decision for a request of key `name`; None when the key has no limit (any more)."""
        quota = self.keys.get(name)
        return None if quota is None else quota.admit(now, bound)

    def finish(self, name: str, now: float, bound: int, used: Optional[int]) -> None:
        quota = self.keys.get(name)
        if quota is not None:
            quota.finish(now, bound, used)
