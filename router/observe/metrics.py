"""Prometheus metrics of one router app, in its own registry.

Counters and histograms the hot path updates are bound to each model once at
start-up (`ModelMetrics`), so a request pays no label lookup. Gauges that are
just the current state (in-flight, replica health, sleep state) are read from
the live table at scrape time by a collector the server hands in
(router/server/report.py), so the hot path pays nothing for them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class ModelMetrics:
    """One model's metric children, bound once."""

    __slots__ = ("model", "latency", "ttfb", "_requests", "_errors", "_requests_family", "_errors_family",
                 "_retries_family")

    def __init__(self, model: str, requests: Counter, errors: Counter, latency: Histogram, ttfb: Histogram,
                 retries: Counter):
        self.model = model
        self._retries_family = retries
        self.latency = latency.labels(model)
        self.ttfb = ttfb.labels(model)
        self._requests_family = requests
        self._errors_family = errors
        self._requests: dict[int, object] = {}
        self._errors: dict[str, object] = {}

    def observe(self, status: int, latency_s: float, ttfb_s: float | None) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._requests_family.labels(self.model, str(status))
        child.inc()
        self.latency.observe(latency_s)
        if ttfb_s is not None:
            self.ttfb.observe(ttfb_s)

    def retry(self, reason: str) -> None:
        self._retries_family.labels(self.model, reason).inc()

    def upstream_error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._errors_family.labels(self.model, kind)
        child.inc()


class Metrics:
    """The app's registry and metric families; `render()` is the /metrics body."""

    def __init__(self, state: Collector):
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("router_requests", "Proxied requests by model and final status "
                           "(499: client went away; a stream that failed midway counts as 502/504)",
                           ["model", "status"], registry=self.registry)
        self._errors = Counter("router_upstream_errors", "Failures talking to engines, by kind "
                         "(connect, timeout, disconnect)", ["model", "kind"], registry=self.registry)
        self._latency = Histogram("router_request_duration_seconds", "Time from request to the end of the response",
                            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ttfb = Histogram("router_time_to_first_byte_seconds", "Time from request to the first response body byte",
                         ["model"], buckets=TTFB_BUCKETS, registry=self.registry)
        self._retries = Counter("router_retries", "Requests sent again to another replica before any byte reached "
                                "the client, by what the first engine did (502, 503, 504, timeout, disconnect)",
                                ["model", "reason"], registry=self.registry)
        #: Gauges of the current state, read from their owners at scrape time.
        self.registry.register(state)

    def for_model(self, model: str) -> ModelMetrics:
        """The children a new model's requests update (the table makes one per model it adds)."""
        return ModelMetrics(model, self._requests, self._errors, self._latency, self._ttfb, self._retries)

    def drop(self, model: str) -> None:
        """Forget a model a reload removed: its series leave /metrics."""
        for family in (self._requests, self._errors, self._latency, self._ttfb, self._retries):
            for labels in list(family._metrics):  # prometheus_client keeps children by label tuple
                if labels[0] == model:
                    family.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
