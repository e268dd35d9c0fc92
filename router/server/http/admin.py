"""Traffic, usage and sleep endpoints, with the kvcached controller's names and shapes.

Answers keep the kvcached field names (``traffic_stats``, ``idle_models``,
``sleep_candidates``...) so its clients and scripts work unchanged, and add
what the router knows beyond them (in-flight requests, percentiles, sleep
state). Errors are OpenAI-shaped: 404 for an unknown model, 400 for a bad
query value, and the sleep/wake outcome's own status (409 when the rules
forbid it, 502 when the engine refused).

Model names may contain slashes, raw (``/traffic/stats/org/model``) or
encoded (``org%2Fmodel``): the server decodes the path before routing, and
the ``path`` converter takes the rest of it.
"""
from __future__ import annotations

import math
import time
from typing import Awaitable, Callable, Optional

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from router.config import ConfigError
from router.observe.traffic import MAX_WINDOW_SECONDS
from router.observe.usage import FIELDS, GROUPS
from router.server.fleet.lifecycle import SLEEPING, Lifecycle, ModelUnavailable, Outcome
from router.server.fleet.models import Model
from router.server.fleet.report import lifecycle_status
from router.server.proxy.errors import error_response
from router.server.state import RouterState


class UnknownModel(Exception):
    pass


class BadQuery(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def _json(data: object) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def _query_number(request: Request, name: str, default: float, minimum: float, maximum: float = math.inf,
                  strict_min: bool = False) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    too_small = value <= minimum if strict_min else value < minimum
    if not math.isfinite(value) or too_small or value > maximum:
        low = f"> {minimum:g}" if strict_min else f">= {minimum:g}"
        high = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
        raise BadQuery(name, f"query parameter '{name}' must be a number {low}{high} (seconds), not {raw!r}")
    return value


#: The window of GET /usage when the query names none: the last hour, as the page's panel shows.
USAGE_WINDOW_SECONDS = 3600.0


def _window(request: Request) -> float:
    return _query_number(request, "window", 60.0, 0.0, MAX_WINDOW_SECONDS, strict_min=True)


def _threshold(request: Request, state: RouterState) -> float:
    return _query_number(request, "threshold", state.config.sleep.idle_threshold_seconds, 0.0)


def _seconds(value: float) -> float:
    """Numbers in answers: rounded for reading, same meaning."""
    return round(value, 6)


class Admin:
    """The handlers, bound to one router's state (no globals, so many routers fit in one process)."""

    def __init__(self, state: RouterState):
        self.state = state

    def _model(self, request: Request) -> Model:
        name = request.path_params["model"]
        model = self.state.table.get(name)
        if model is None:
            raise UnknownModel(name)
        return model

    def _last_activity(self, model: Model, total: int) -> Optional[float]:
        """Unix time of the model's last activity: now while a request runs (as its
        idle time is 0), else when the last request ended; None before the first."""
        lc: Lifecycle = model.lifecycle
        if lc.in_flight:
            return _seconds(time.time())
        if total == 0:
            return None
        return _seconds(lc.last_end + self.state.traffic.wall_offset)

    def model_stats(self, model: Model, window: float) -> dict:
        lc: Lifecycle = model.lifecycle
        stats = self.state.traffic.summary(model.name, window)
        idle = lc.idle_seconds()
        return {
            "model_name": model.name,
            **stats,
            "in_flight_requests": lc.in_flight,
            "waiting_requests": lc.waiting,
            "last_activity_time": self._last_activity(model, stats["total_requests"]),
            "idle_time_seconds": _seconds(idle),
            "is_idle": lc.in_flight == 0 and idle >= self.state.config.sleep.idle_threshold_seconds,
            "sleep_state": lc.state,
        }

    async def traffic_stats(self, request: Request) -> Response:
        window = _window(request)
        stats = {m.name: self.model_stats(m, window) for m in self.state.table}
        return _json({"traffic_stats": stats, "window_seconds": window})

    async def model_traffic_stats(self, request: Request) -> Response:
        window = _window(request)
        return _json({"model_stats": self.model_stats(self._model(request), window), "window_seconds": window})

    def _split_by_idleness(self, threshold: float) -> tuple[list[Model], list[Model]]:
        idle: list[Model] = []
        active: list[Model] = []
        for m in self.state.table:
            lc: Lifecycle = m.lifecycle
            (idle if lc.in_flight == 0 and lc.idle_seconds() >= threshold else active).append(m)
        return idle, active

    async def idle_models(self, request: Request) -> Response:
        threshold = _threshold(request, self.state)
        idle, _ = self._split_by_idleness(threshold)
        details = {}
        for m in idle:
            total = self.state.traffic.total(m.name)
            details[m.name] = {
                "idle_time_seconds": _seconds(m.lifecycle.idle_seconds()),
                "total_requests": total,
                "last_activity_time": self._last_activity(m, total),
                "sleep_state": m.lifecycle.state,
            }
        return _json({"idle_models": [m.name for m in idle], "idle_threshold_seconds": threshold,
                      "idle_model_details": details, "idle_models_count": len(idle)})

    async def active_models(self, request: Request) -> Response:
        threshold = _threshold(request, self.state)
        window = _window(request)
        _, active = self._split_by_idleness(threshold)
        details = {}
        for m in active:
            s = self.state.traffic.summary(m.name, window)
            details[m.name] = {
                "request_rate": s["request_rate"],
                "total_requests": s["total_requests"],
                "in_flight_requests": m.lifecycle.in_flight,
                "avg_response_time": s["avg_response_time"],
                "last_activity_time": self._last_activity(m, s["total_requests"]),
            }
        return _json({"active_models": [m.name for m in active], "idle_threshold_seconds": threshold,
                      "window_seconds": window, "active_model_details": details,
                      "active_models_count": len(active)})

    def _settings(self) -> dict:
        s = self.state.config.sleep
        return {"auto_sleep_enabled": s.auto_sleep_enabled, "idle_threshold_seconds": s.idle_threshold_seconds,
                "check_interval_seconds": s.check_interval_seconds, "wakeup_on_request": s.wakeup_on_request,
                "min_sleep_duration": s.min_sleep_duration, "wake_timeout_seconds": s.wake_timeout_seconds}

    async def sleep_status(self, request: Request) -> Response:
        models = list(self.state.table)
        candidates = self.state.idle.candidates()
        return _json({
            "sleeping_models": [m.name for m in models if m.lifecycle.state == SLEEPING],
            "sleep_candidates": [m.name for m in candidates],
            **self._settings(),
            "models": {m.name: lifecycle_status(m.lifecycle) for m in models},
        })

    async def sleep_candidates(self, request: Request) -> Response:
        details = {}
        names = []
        for m in self.state.table:
            lc: Lifecycle = m.lifecycle
            blocker = self.state.idle.blocker(m)
            if blocker is None:
                names.append(m.name)
            details[m.name] = {"can_sleep": blocker is None, "reason": blocker,
                               "idle_time_seconds": _seconds(lc.idle_seconds()), "sleep_state": lc.state}
        return _json({"sleep_candidates": names, "candidate_details": details, **self._settings()})

    async def action_sleep(self, request: Request) -> Response:
        model = self._model(request)
        try:
            if self.state.decides():  # else the leader makes room when it is asked
                await self.state.residency.make_host_room(model)
        except ModelUnavailable as e:
            return error_response(503, e.message, param="model", headers={"Retry-After": str(e.retry_after)})
        outcome = await model.lifecycle.sleep()
        return self._outcome(model, outcome)

    async def action_start(self, request: Request) -> Response:
        model = self._model(request)
        return self._outcome(model, await model.lifecycle.start())

    async def action_stop(self, request: Request) -> Response:
        model = self._model(request)
        return self._outcome(model, await model.lifecycle.stop())

    async def usage(self, request: Request) -> Response:
        """GET /usage: requests, tokens, errors and 429s over `window` seconds (default the last
        hour), by client key name or by model (docs/usage.md). Under router.workers a worker passes
        it here once this process has applied every request the worker finished."""
        window = _query_number(request, "window", USAGE_WINDOW_SECONDS, 0.0, MAX_WINDOW_SECONDS, strict_min=True)
        by = request.query_params.get("by", "key")
        if by not in GROUPS:
            raise BadQuery("by", f"query parameter 'by' must be one of {', '.join(GROUPS)}, not {by!r}")
        rows = self.state.traffic.usage_window(window, by)
        total = {field: sum(row[field] for row in rows.values()) for field in FIELDS}
        return _json({"window_seconds": window, "by": by, "usage": rows, "total": total})

    async def residency(self, request: Request) -> Response:
        return _json(self.state.residency.report())

    async def action_wakeup(self, request: Request) -> Response:
        model = self._model(request)
        outcome = await model.lifecycle.wake()
        return self._outcome(model, outcome)

    async def cluster_activity(self, request: Request) -> Response:
        """Another router replica served these models: they are not idle (router/server/fleet/leadership.py)."""
        try:
            names = orjson.loads(await request.body())["models"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(400, 'The body must be {"models": [model names]}.')
        touched = []
        for name in names if isinstance(names, list) else []:
            model = self.state.table.get(name) if isinstance(name, str) else None
            if model is not None:
                model.lifecycle.touch()
                touched.append(model.name)
        return _json({"touched": touched})

    async def action_reload(self, request: Request) -> Response:
        """Re-read the YAML: 200 with what changed, or 400 naming file and field (nothing changed)."""
        try:
            change = await self.state.reload()
        except ConfigError as e:
            problems = "; ".join(f"{e.path}: {p}" for p in e.problems)
            return error_response(400, f"reload refused, nothing changed: {problems}")
        return _json(change.report())

    def _outcome(self, model: Model, outcome: Outcome) -> Response:
        if not outcome.ok:
            return error_response(outcome.status, outcome.message, param="model")
        return _json({"model_name": model.name, "success": True, "message": outcome.message,
                      "state": model.lifecycle.state})


Handler = Callable[[Request], Awaitable[Response]]


def _guard(handler: Handler) -> Handler:
    """Turn bad input into 400/404 OpenAI errors instead of a 500."""
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except BadQuery as e:
            return error_response(400, e.message, param=e.param)
        except UnknownModel as e:
            return error_response(404, f"model {e.args[0]!r} is not served here; GET /v1/models lists the models",
                                  param="model")
    return endpoint


def admin_routes(state: RouterState) -> list[BaseRoute]:
    a = Admin(state)
    table = [
        ("/traffic/stats", a.traffic_stats, "GET"),
        ("/traffic/stats/{model:path}", a.model_traffic_stats, "GET"),
        ("/models/idle", a.idle_models, "GET"),
        ("/models/active", a.active_models, "GET"),
        ("/sleep/status", a.sleep_status, "GET"),
        ("/sleep/candidates", a.sleep_candidates, "GET"),
        ("/action/sleep/{model:path}", a.action_sleep, "POST"),
        ("/action/wakeup/{model:path}", a.action_wakeup, "POST"),
        ("/action/start/{model:path}", a.action_start, "POST"),
        ("/action/stop/{model:path}", a.action_stop, "POST"),
        ("/residency", a.residency, "GET"),
        ("/usage", a.usage, "GET"),
        ("/action/reload", a.action_reload, "POST"),
        ("/cluster/activity", a.cluster_activity, "POST"),
    ]
    return [Route(path, _guard(fn), methods=[method]) for path, fn, method in table]
