"""Prometheus metrics of one router app, in its own registry.

Counters and histograms the hot path updates are bound to each model once at
start-up (`ModelMetrics`), so a request pays no label lookup. Gauges that are
just the current state (in-flight, backend health, sleep state) are read from
the routing table by a collector at scrape time, so the hot path pays nothing
for them.
"""
from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.server.replicas import HEALTHY, UNHEALTHY, ModelTable
from router.server.lifecycle import SLEEPING

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class ModelMetrics:
    """One model's metric children, bound once."""

    __slots__ = ("model", "latency", "ttfb", "_requests", "_errors", "_requests_family", "_errors_family")

    def __init__(self, model: str, requests: Counter, errors: Counter, latency: Histogram, ttfb: Histogram):
        self.model = model
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

    def upstream_error(self, kind: str) -> None:
        child = self._errors.get(kind)
        if child is None:
            child = self._errors[kind] = self._errors_family.labels(self.model, kind)
        child.inc()


class StateCollector(Collector):
    """In-flight requests, backend health and sleep state, read at scrape time."""

    def __init__(self, table: ModelTable):
        self.table = table

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("router_in_flight_requests", "Requests admitted and not yet finished", labels=["model"])
        outstanding = GaugeMetricFamily("router_backend_outstanding_requests", "Requests being served by a backend",
                                        labels=["model", "instance", "endpoint"])
        healthy = GaugeMetricFamily("router_backend_healthy", "1 when the backend's health probes pass, 0 when unhealthy, "
                                    "-1 while never probed", labels=["model", "instance", "endpoint"])
        ejected = GaugeMetricFamily("router_backend_ejected", "1 while the backend is ejected after a failure",
                                    labels=["model", "instance", "endpoint"])
        sleeping = GaugeMetricFamily("router_model_sleeping", "1 while the model's engines are asleep", labels=["model"])
        sleeps = CounterMetricFamily("router_model_sleeps", "Times the model was put to sleep", labels=["model"])
        wakes = CounterMetricFamily("router_model_wakes", "Successful wakes of the model", labels=["model"])
        wake_failures = CounterMetricFamily("router_model_wake_failures", "Wakes that failed or timed out",
                                            labels=["model"])
        wake_seconds = CounterMetricFamily("router_model_wake_seconds", "Time spent in successful wakes "
                                           "(divide by router_model_wakes_total for the mean)", labels=["model"])
        last_wake = GaugeMetricFamily("router_model_last_wake_seconds", "Duration of the last successful wake",
                                      labels=["model"])
        now = time.monotonic()
        for model in self.table:
            lc = model.lifecycle
            in_flight.add_metric([model.name], lc.in_flight)
            sleeping.add_metric([model.name], 1.0 if lc.state == SLEEPING else 0.0)
            sleeps.add_metric([model.name], lc.sleep_count)
            wakes.add_metric([model.name], lc.wake_count)
            wake_failures.add_metric([model.name], lc.wake_failures)
            wake_seconds.add_metric([model.name], lc.wake_seconds_total)
            if lc.last_wake_seconds is not None:
                last_wake.add_metric([model.name], lc.last_wake_seconds)
            for b in model.backends:
                labels = [model.name, b.name, b.url]
                outstanding.add_metric(labels, b.outstanding)
                healthy.add_metric(labels, 1.0 if b.health == HEALTHY else 0.0 if b.health == UNHEALTHY else -1.0)
                ejected.add_metric(labels, 1.0 if b.ejected_until > now else 0.0)
        yield from (in_flight, outstanding, healthy, ejected, sleeping, sleeps, wakes, wake_failures, wake_seconds, last_wake)


class Metrics:
    """The app's registry and metric families; `render()` is the /metrics body."""

    def __init__(self, table: ModelTable):
        self.registry = CollectorRegistry(auto_describe=True)
        requests = Counter("router_requests", "Proxied requests by model and final status "
                           "(499: client went away; a stream that failed midway counts as 502/504)",
                           ["model", "status"], registry=self.registry)
        errors = Counter("router_upstream_errors", "Failures talking to engines, by kind "
                         "(connect, timeout, disconnect)", ["model", "kind"], registry=self.registry)
        latency = Histogram("router_request_duration_seconds", "Time from request to the end of the response",
                            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        ttfb = Histogram("router_time_to_first_byte_seconds", "Time from request to the first response body byte",
                         ["model"], buckets=TTFB_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(table))
        for model in table:
            model.metrics = ModelMetrics(model.name, requests, errors, latency, ttfb)

    def render(self) -> bytes:
        return generate_latest(self.registry)
