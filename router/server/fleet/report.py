"""What the router tells about its models and replicas: the JSON of /health, /sleep/status and the rest.

Reports are read from the owners (replica, model lifecycle) at the moment
they are asked for; nothing here keeps state.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.config import RouterSettings
from router.server.fleet.control import EngineControl
from router.server.fleet.health import probe_and_record, probed
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.replica import HEALTHY, UNHEALTHY, Replica
from router.server.fleet.residency import Residency
from router.util.states import AWAKE, SLEEPING

JSON = dict[str, object]


def lifecycle_status(lc: Lifecycle, now: Optional[float] = None) -> JSON:
    """Everything /sleep/status and /health show about a model's sleep."""
    now = lc.clock() if now is None else now
    return {
        "state": lc.state,
        "sleeping": lc.state != AWAKE,
        "manual": lc.manual,
        "sleepable": lc.sleepable,
        "in_flight": lc.in_flight,
        "waiting": lc.waiting,
        "idle_seconds": lc.idle_seconds(now),
        "asleep_seconds": now - lc.slept_at if lc.state == SLEEPING and lc.slept_at is not None else None,
        "sleep_count": lc.sleep_count,
        "wake_count": lc.wake_count,
        "sleep_failures": lc.sleep_failures,
        "sleep_retry_in_seconds": max(0.0, lc.sleep_retry_at - now) if lc.sleep_retry_at is not None else None,
        "wake_failures": lc.wake_failures,
        "last_wake_seconds": lc.last_wake_seconds,
        "wake_seconds_total": lc.wake_seconds_total,
        "last_error": lc.last_error,
        "pinned": lc.pinned,
        "on_demand": lc.startable,
        "stoppable": lc.stoppable,
        "start_count": lc.start_count,
        "stop_count": lc.stop_count,
        "start_failures": lc.start_failures,
        "last_start_seconds": lc.last_start_seconds,
        "replicas": {r.name: ("asleep" if r.asleep else "awake") for r in lc.members()},
    }


def replica_report(r: Replica, status: str, residency: str, detail: Optional[str] = None) -> JSON:
    """One replica in /health: its probe outcome, residency, routing state, load, and supervisord's process block."""
    out: JSON = {"instance": r.name, "endpoint": r.url, "status": status, "residency": residency,
                 "routing_state": r.health, "breaker": r.breaker.state,
                 "outstanding": r.outstanding, "ejected": r.ejected_until > time.monotonic()}
    if detail is not None:
        out["detail"] = detail
    if r.loras.known:  # the LoRA adapters its engine holds now, and those being loaded
        out["lora_adapters"] = {"loaded": sorted(r.loras.loaded), "loading": sorted(r.loras.loading)}
    if r.process is not None:
        out["process"] = r.process.report(time.time())
    return out


async def model_report(control: EngineControl, model: Model, settings: RouterSettings) -> JSON:
    """Probe a model's running replicas now and describe them, for /health/{model} and /health/all."""
    sleep = lifecycle_status(model.lifecycle)
    if model.lifecycle.state != AWAKE:
        state = model.lifecycle.state
        return {"model": model.name, "status": state,
                "endpoints": [replica_report(r, state, state) for r in model.replicas], "sleep": sleep}
    asked = probed(model)
    results = dict(zip(asked, await asyncio.gather(*(probe_and_record(control, model, r, settings) for r in asked))))
    endpoints = []
    for r in model.replicas:
        if r in results:
            ok, detail = results[r]
            endpoints.append(replica_report(r, "healthy" if ok else "unhealthy", model.lifecycle.state, detail))
        else:
            endpoints.append(replica_report(r, "down", model.lifecycle.state, r.down_reason()))
    n_ok = sum(ok for ok, _ in results.values())
    status = "healthy" if n_ok == len(model.replicas) else "degraded" if n_ok else "unhealthy"
    return {"model": model.name, "status": status, "endpoints": endpoints, "sleep": sleep}


class StateCollector(Collector):
    """In-flight requests, backend health and sleep state, read at scrape time."""

    def __init__(self, table: Callable[[], ModelTable], residency: Residency):
        self.table = table
        self.residency = residency

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry must not read a table that is still being built."""
        return []

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
        last_wake = GaugeMetricFamily("router_model_last_wake_seconds", "Duration of the last successful wake",
                                      labels=["model"])
        state = GaugeMetricFamily("router_model_state", "1 for the model's current lifecycle state "
                                  "(stopped, starting, awake, draining, sleeping, waking, stopping, failed)",
                                  labels=["model", "state"])
        starts = CounterMetricFamily("router_model_starts", "Times the router started the model's engines",
                                     labels=["model"])
        stops = CounterMetricFamily("router_model_stops", "Times the router stopped the model's engines",
                                    labels=["model"])
        start_seconds = GaugeMetricFamily("router_model_start_seconds", "How long the last start took, from the "
                                          "start call to a passed health check", labels=["model"])
        queued = GaugeMetricFamily("router_model_queued_requests", "Requests waiting for a free slot (all replicas "
                                   "at max_concurrency)", labels=["model"])
        queue_cap = GaugeMetricFamily("router_model_queue_capacity", "How many requests may wait for a slot: the sum "
                                      "of the replicas' max_queue (0: no queue)", labels=["model"])
        start_failures = CounterMetricFamily("router_model_start_failures", "Starts that failed or timed out",
                                             labels=["model"])
        process = GaugeMetricFamily("router_backend_process_state", "1 for the engine process's state in supervisord "
                                    "(RUNNING, STARTING, BACKOFF, FATAL, EXITED, STOPPED...)",
                                    labels=["model", "instance", "endpoint", "state"])
        breaker = GaugeMetricFamily("router_backend_breaker_state", "1 for the backend's circuit breaker state "
                                    "(closed, open, half_open)", labels=["model", "instance", "endpoint", "state"])
        evictions = CounterMetricFamily("router_model_evictions", "Models slept or stopped to make room, by reason "
                                        "(gpu_budget, host_budget, group_swap, idle_stop)", labels=["reason"])
        for reason, count in self.residency.eviction_counts.items():
            evictions.add_metric([reason], count)
        now = time.monotonic()
        for model in self.table():
            lc = model.lifecycle
            state.add_metric([model.name, lc.state], 1.0)
            starts.add_metric([model.name], lc.start_count)
            stops.add_metric([model.name], lc.stop_count)
            if lc.last_start_seconds is not None:
                start_seconds.add_metric([model.name], lc.last_start_seconds)
            in_flight.add_metric([model.name], lc.in_flight)
            queued.add_metric([model.name], model.queued)
            queue_cap.add_metric([model.name], sum(r.max_queue for r in model.replicas))
            start_failures.add_metric([model.name], lc.start_failures)
            sleeping.add_metric([model.name], 1.0 if lc.state == SLEEPING else 0.0)
            sleeps.add_metric([model.name], lc.sleep_count)
            wakes.add_metric([model.name], lc.wake_count)
            wake_failures.add_metric([model.name], lc.wake_failures)
            if lc.last_wake_seconds is not None:
                last_wake.add_metric([model.name], lc.last_wake_seconds)
            for r in model.replicas:
                labels = [model.name, r.name, r.url]
                outstanding.add_metric(labels, r.outstanding)
                healthy.add_metric(labels, 1.0 if r.health == HEALTHY else 0.0 if r.health == UNHEALTHY else -1.0)
                ejected.add_metric(labels, 1.0 if r.ejected_until > now else 0.0)
                breaker.add_metric([*labels, r.breaker.state], 1.0)
                if r.process is not None:
                    process.add_metric([*labels, r.process.state], 1.0)
        yield from (in_flight, outstanding, healthy, ejected, sleeping, sleeps, wakes, wake_failures, last_wake,
                    state, starts, stops, start_seconds, evictions, queued, queue_cap, start_failures,
                    process, breaker)
