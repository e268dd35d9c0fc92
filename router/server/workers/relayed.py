"""What a proxy worker puts where one process keeps its own figures: stand-ins that send them to the
controller, which owns them (the rule for each is in messages.py)."""
from __future__ import annotations

from typing import Coroutine, Optional

from router.observe.metrics import ModelMetrics
from router.observe.traffic import Traffic
from router.server.proxy.tenants import Decision
from router.server.workers.worker_end import ControllerLink


class ControllerGate:
    """A worker's `Gate` (router/server/proxy/tenants.py): the controller keeps every key's counters,
    so a key's limits hold across workers."""

    def __init__(self, link: ControllerLink):
        self.link = link

    def admit(self, key: str, bound: int) -> Coroutine[object, object, Decision]:
        return self.link.quota(key, bound)

    def finish(self, ticket: int, key: str, bound: int, used: Optional[int]) -> None:
        self.link.quota_done(ticket, used)


class RelayedTraffic(Traffic):
    """A worker's traffic: each finished request goes to the controller, which owns the figures
    (its metrics too: the controller observes the request there)."""

    def __init__(self, link: ControllerLink):
        super().__init__(())
        self._link = link

    def record(self, model: str, status: int, latency_s: float, ttfb_s: Optional[float], stream: bool,
               key: str = "anonymous", prompt: Optional[int] = None, completion: Optional[int] = None,
               instance: Optional[str] = None, retries: int = 0) -> None:
        self._link.finished(model, status, latency_s, ttfb_s, stream, key, instance, retries, prompt, completion)


class RelayedMetrics(ModelMetrics):
    """A worker's metrics of one model: retries, engine failures and fallbacks go to the controller; a
    request's status and times go there through `RelayedTraffic` (one record per request)."""

    __slots__ = ("_link",)

    def __init__(self, model: str, link: ControllerLink):
        super().__init__(model)
        self._link = link

    def observe(self, status: int, latency_s: float, ttfb_s: Optional[float], key: str = "anonymous",
                prompt: Optional[int] = None, completion: Optional[int] = None) -> None:
        return None

    def retry(self, reason: str) -> None:
        self._link.retried(self.model, reason)

    def upstream_error(self, kind: str) -> None:
        self._link.upstream_failed(self.model, kind)

    def routed(self, hit: bool) -> None:
        self._link.picked(self.model, hit)

    def fallback(self, to: str) -> None:
        self._link.fell_back(self.model, to)
