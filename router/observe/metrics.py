"""Prometheus metrics of one router app, in its own registry.

The hot path counts into plain ints and lists per model (`ModelMetrics`:
no prometheus_client object, lock or label lookup per request; one event
loop thread updates them), and a collector turns them into metric families
when /metrics is scraped. Gauges that are just the current state (in-flight,
replica health, sleep state) are read from the live table at scrape time by
a collector the server hands in (router/server/fleet/report.py), so the hot path
pays nothing for them either.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Wakes: a level-1 wake copies weights back in seconds; a level-2 one reads them from disk.
WAKE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

REQUESTS = ("router_requests", "Proxied requests by model, final status and client key name (499: client went "
            "away; a stream that failed midway counts as 502/504)")
TOKENS = ("router_tokens", "Tokens of the engines' answers (their usage) by model, client key name and kind "
          "(prompt, completion)")
ERRORS = ("router_upstream_errors", "Failures talking to engines, by kind (connect, timeout, disconnect)")
LATENCY = ("router_request_duration_seconds", "Time from request to the end of the response")
TTFB = ("router_time_to_first_byte_seconds", "Time from request to the first response body byte")
WAKES = ("router_model_wake_seconds", "Time each successful wake took, from its first call to the engine to its "
         "last, by the sleep tier it woke from (1: weights in host RAM; 2: weights read again from disk)")
AFFINITY = ("router_affinity", "Replica picks for requests with a key (routing session or prefix; a retry is a pick of "
            "its own), by whether the pick was the key's own replica (hit) or the next along the ring (moved: it was "
            "unroutable, full, above the bounded load or already tried, or the request waited for any free slot)")
RETRIES = ("router_retries", "Requests sent again to another replica before any byte reached the client, by what "
           "the first engine did (502, 503, 504, timeout, disconnect)")
FALLBACKS = ("router_fallbacks", "Requests a model could not serve (every replica failed before the first byte) sent "
             "to a model of its fallbacks, by the model asked (from) and the model tried next (to)")


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf), their sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # A bucket's bound is inclusive (le): the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            out.append((floatToGoString(bound), float(total)))
        return out


class ModelMetrics:
    """One model's counters, updated by the hot path."""

    __slots__ = ("model", "requests", "tokens", "errors", "retries", "fallbacks", "latency", "ttfb", "hits", "moved")

    def __init__(self, model: str):
        self.model = model
        #: (status, key name) -> requests
        self.requests: dict[tuple[int, str], int] = {}
        #: key name -> [prompt tokens, completion tokens]
        self.tokens: dict[str, list[int]] = {}
        self.errors: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        #: Requests sent on from this model, by the model they went to.
        self.fallbacks: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttfb = Histogram(TTFB_BUCKETS)
        self.hits = 0
        self.moved = 0

    def observe(self, status: int, latency_s: float, ttfb_s: float | None, key: str = "anonymous",
                prompt: int | None = None, completion: int | None = None) -> None:
        requests = self.requests
        requests[(status, key)] = requests.get((status, key), 0) + 1
        if prompt is not None or completion is not None:
            tokens = self.tokens.get(key)
            if tokens is None:
                tokens = self.tokens[key] = [0, 0]
            tokens[0] += prompt or 0
            tokens[1] += completion or 0
        self.latency.observe(latency_s)
        if ttfb_s is not None:
            self.ttfb.observe(ttfb_s)

    def retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def upstream_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def routed(self, hit: bool) -> None:
        """A request with a key went to its key's replica (`hit`) or on along the ring."""
        if hit:
            self.hits += 1
        else:
            self.moved += 1
    def fallback(self, to: str) -> None:
        self.fallbacks[to] = self.fallbacks.get(to, 0) + 1


class Metrics:
    """The app's registry; `render()` is the /metrics body."""

    def __init__(self, state: Collector):
        self.registry = CollectorRegistry(auto_describe=True)
        self._models: dict[str, ModelMetrics] = {}
        self.registry.register(_Counts(self._models))
        #: (model, tier) -> the wakes' times.
        self._wakes: dict[tuple[str, str], Histogram] = {}
        self.registry.register(_Wakes(self._wakes))
        #: Gauges of the current state, read from their owners at scrape time.
        self.registry.register(state)

    def for_model(self, model: str) -> ModelMetrics:
        """The counters a model's requests update (the table asks once per model it adds; a model
        kept across a reload keeps its counts)."""
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = ModelMetrics(model)
        return found

    def drop(self, model: str) -> None:
        """Forget a model a reload removed: its series leave /metrics."""
        self._models.pop(model, None)
        for key in [k for k in self._wakes if k[0] == model]:
            del self._wakes[key]

    def transition(self, model: str, kind: str, seconds: float) -> None:
        """A measured transition (router/server/fleet/costs.py): a wake goes into its tier's histogram."""
        kind, _, tier = kind.partition("_")
        if kind == "wake" and tier:
            found = self._wakes.get((model, tier))
            if found is None:
                found = self._wakes[(model, tier)] = Histogram(WAKE_BUCKETS)
            found.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Counts(Collector):
    """The models' counters as metric families, built at scrape time."""

    def __init__(self, models: dict[str, ModelMetrics]):
        self._models = models

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(*REQUESTS, labels=["model", "status", "key"])
        tokens = CounterMetricFamily(*TOKENS, labels=["model", "key", "kind"])
        errors = CounterMetricFamily(*ERRORS, labels=["model", "kind"])
        latency = HistogramMetricFamily(*LATENCY, labels=["model"])
        ttfb = HistogramMetricFamily(*TTFB, labels=["model"])
        retries = CounterMetricFamily(*RETRIES, labels=["model", "reason"])
        affinity = CounterMetricFamily(*AFFINITY, labels=["model", "result"])
        fallbacks = CounterMetricFamily(*FALLBACKS, labels=["from", "to"])
        for name, m in list(self._models.items()):
            for (status, key), n in sorted(m.requests.items()):
                requests.add_metric([name, str(status), key], n)
            for key, (prompt, completion) in sorted(m.tokens.items()):
                tokens.add_metric([name, key, "prompt"], prompt)
                tokens.add_metric([name, key, "completion"], completion)
            for kind, n in sorted(m.errors.items()):
                errors.add_metric([name, kind], n)
            for reason, n in sorted(m.retries.items()):
                retries.add_metric([name, reason], n)
            for to, n in sorted(m.fallbacks.items()):
                fallbacks.add_metric([name, to], n)
            for family, histogram in ((latency, m.latency), (ttfb, m.ttfb)):
                family.add_metric([name], histogram.buckets(), histogram.sum)
            if m.hits or m.moved:
                affinity.add_metric([name, "hit"], m.hits)
                affinity.add_metric([name, "moved"], m.moved)
        yield from (requests, tokens, errors, latency, ttfb, retries, affinity, fallbacks)


class _Wakes(Collector):
    """The wakes' histograms by model and tier."""

    def __init__(self, wakes: dict[tuple[str, str], Histogram]):
        self._wakes = wakes

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(*WAKES, labels=["model", "tier"])
        for (model, tier), histogram in sorted(self._wakes.items()):
            family.add_metric([model, tier], histogram.buckets(), histogram.sum)
        yield family
