"""The routing table: engine instances (Backend), models over them (Model),
and every name a request may use (ModelTable).

Everything the hot path needs per request is precomputed here at start-up
(served-name sets, connection pools), so routing a request is a dict lookup and
a scan over a model's few replicas.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Iterator, Optional

from router.config import Config, Instance, RouterSettings, connect_host
from router.server.lifecycle import Lifecycle
from router.server.upstream import Pool

#: Health states of a backend; "unknown" (never probed) is routable.
UNKNOWN, HEALTHY, UNHEALTHY = "unknown", "healthy", "unhealthy"


class NoBackend(Exception):
    """No replica of the model can be routed to now (answer 503)."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


class Overloaded(Exception):
    """Every replica is at max_concurrency and the wait queue is full or timed out (429)."""


class Backend:
    """One engine instance, with the router's view of its load and health."""

    __slots__ = ("instance", "name", "url", "served", "served_name", "outstanding", "limit", "max_queue",
                 "health", "ok_streak", "fail_streak", "ejected_until", "eject_timer", "pool", "authority",
                 "auth_line")

    def __init__(self, instance: Instance):
        self.instance = instance
        self.name = instance.name
        self.url = instance.url
        self.served = frozenset(instance.served_names)
        #: The name written into a request whose model the engine does not serve.
        self.served_name = instance.served_names[0] if instance.served_names else instance.model
        self.outstanding = 0
        self.limit = instance.max_concurrency
        self.max_queue = instance.max_queue if instance.max_concurrency else 0
        self.health = UNKNOWN
        self.ok_streak = 0
        self.fail_streak = 0
        self.ejected_until = 0.0
        #: Armed while ejected, to hand the replica to queued requests when the ejection ends.
        self.eject_timer: Optional[asyncio.TimerHandle] = None
        #: Keep-alive connections of the hot path; `authority` is the Host header value.
        self.pool = Pool(connect_host(instance.host), instance.port)
        self.authority = self.url.split("//", 1)[1].encode()
        #: The engine's own key (its --api-key), sent in place of the client's authorization.
        self.auth_line = b"".join(f"{k.lower()}: {v}\r\n".encode() for k, v in instance.auth_headers.items())

    def routable(self, now: float) -> bool:
        return self.health != UNHEALTHY and now >= self.ejected_until

    def record_probe(self, ok: bool, settings: RouterSettings) -> None:
        """Apply one probe result: unhealthy after N failures in a row, healthy after M successes.

        A never-probed backend turns healthy on its first success: it was
        routable already, so there is nothing to be cautious about. The
        caller hands a replica that turned routable to queued requests
        (`Model.dispatch`).
        """
        if ok:
            self.fail_streak = 0
            self.ok_streak += 1
            if self.health == UNKNOWN or (self.health == UNHEALTHY and self.ok_streak >= settings.healthy_threshold):
                self.health = HEALTHY
                self.ejected_until = 0.0
        else:
            self.ok_streak = 0
            self.fail_streak += 1
            if self.fail_streak >= settings.unhealthy_threshold:
                self.health = UNHEALTHY


class Model:
    """A model's replicas, its lifecycle, and the least-outstanding pick."""

    __slots__ = ("name", "backends", "lifecycle", "metrics", "_waiters", "_retry_after")

    def __init__(self, name: str, backends: tuple[Backend, ...], lifecycle: Lifecycle, retry_after: int):
        self.name = name
        self.backends = backends
        self.lifecycle = lifecycle
        #: Per-model metric children (metrics.ModelMetrics), bound by Metrics at start-up.
        self.metrics: Any = None
        self._waiters: deque[asyncio.Future[Backend]] = deque()
        self._retry_after = retry_after

    def pick(self, now: float, exclude: tuple[Backend, ...] = ()) -> Backend:
        """Take a slot on the least-loaded routable replica without waiting.

        Raises NoBackend when none is routable, Overloaded when all are full.
        """
        best = None
        full = False
        for b in self.backends:
            if b in exclude or not b.routable(now):
                continue
            if b.limit is not None and b.outstanding >= b.limit:
                full = True
                continue
            if best is None or b.outstanding < best.outstanding:
                best = b
        if best is not None:
            best.outstanding += 1
            return best
        if full:
            raise Overloaded()
        raise NoBackend(self._wait_hint(now))

    async def acquire(self, now: float, exclude: tuple[Backend, ...], queue_timeout: float) -> Backend:
        """Like `pick`, but waits (FIFO, bounded by the replicas' max_queue) while all are full.

        A waiter is handed a slot by `dispatch`: when a request ends, when an
        ejection ends, or after a health probe. It fails with NoBackend if no
        replica is routable any more, and with Overloaded after `queue_timeout`.
        """
        try:
            return self.pick(now, exclude)
        except Overloaded:
            cap = sum(b.max_queue for b in self.backends if b not in exclude and b.routable(now))
            if len(self._waiters) >= cap:
                raise
        fut: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, queue_timeout)
        except BaseException as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed a slot just as the wait ended: give it back
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(e, asyncio.TimeoutError):
                raise Overloaded() from None
            raise

    def release(self, backend: Backend) -> None:
        """Free a slot; queued requests, if any, take it over."""
        backend.outstanding -= 1
        if self._waiters:
            self.dispatch()

    def eject(self, backend: Backend, now: float, seconds: float) -> None:
        """Skip `backend` for `seconds`; then queued requests may take it again."""
        backend.ejected_until = now + seconds
        if backend.eject_timer is None:
            backend.eject_timer = asyncio.get_running_loop().call_later(seconds, self._ejection_over, backend)

    def _ejection_over(self, backend: Backend) -> None:
        # The loop's clock may run a little behind time.monotonic(), and the
        # ejection may have been extended: wait for what is left of it.
        left = backend.ejected_until - time.monotonic()
        if left > 0:
            backend.eject_timer = asyncio.get_running_loop().call_later(left, self._ejection_over, backend)
            return
        backend.eject_timer = None
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots of routable replicas to queued requests, first come first served.

        When no replica is routable at all, the queued requests fail with
        NoBackend at once (503), as new ones do, rather than waiting out
        their queue timeout.
        """
        waiters = self._waiters
        now = time.monotonic()
        while waiters:
            fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            try:
                backend = self.pick(now)
            except Overloaded:
                return
            except NoBackend as e:
                waiters.popleft()
                fut.set_exception(NoBackend(e.retry_after))
                continue
            waiters.popleft()
            fut.set_result(backend)

    def _wait_hint(self, now: float) -> int:
        """Seconds until a replica may be routable again, for Retry-After."""
        ejected = [b.ejected_until - now for b in self.backends if b.health != UNHEALTHY and b.ejected_until > now]
        return max(1, math.ceil(min(ejected))) if ejected else self._retry_after


class ModelTable:
    """Every routable name -> its Model, built once from the config."""

    def __init__(self, config: Config):
        settings = config.router
        retry = max(1, math.ceil(settings.health_check_interval_seconds))
        self._models: dict[str, Model] = {}
        for name, instances in config.models.items():
            self._models[name] = Model(name, tuple(Backend(i) for i in instances), Lifecycle(name), retry)
        self._routes: dict[str, Model] = {n: self._models[m] for n, m in config.routes.items()}

    def get(self, name: str) -> Optional[Model]:
        """The model a request names (model, alias or served name), or None."""
        return self._routes.get(name)

    def __iter__(self) -> Iterator[Model]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def names(self) -> list[str]:
        """Every routable name, in config order."""
        return list(self._routes)

    def backends(self) -> Iterator[Backend]:
        for m in self._models.values():
            yield from m.backends
