"""One reading of a stack: supervisord's process states and the router's view, per instance.

Both sources may be down (supervisord not started yet, the router still
importing): a source that does not answer gives a `Source` with its error and
empty data, never an exception, so the table can say what is missing. The
router's JSON is read field by field with type checks (no ``Any`` leaks into
the rows): a router of another version that lacks a field shows ``-`` there.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from router.config import Config, connect_host
from router.supervision.processes import ProcessState, fetch_all, tail_lines
from router.supervision.supervisord import SOCKET_NAME

#: The router's words for a replica that is up: probed healthy, or asleep on purpose.
READY = frozenset({"healthy", "sleeping"})
#: supervisord states in which an engine will not come up by itself.
FAILED = frozenset({"FATAL", "BACKOFF"})
#: The router's program name in the rendered supervisord.conf.
ROUTER_PROGRAM = "router"
#: Requests per second are counted over this window of /traffic/stats.
RATE_WINDOW_SECONDS = 10


@dataclass(frozen=True)
class Source:
    """Where a part of the reading comes from, and why it is missing if it is."""

    where: str
    error: Optional[str] = None

    @property
    def up(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RouterView:
    """What the router says of one instance (from /health/all and /traffic/stats)."""

    #: The probe's outcome (healthy, unhealthy, down); for a model that is not awake the router
    #: does not probe and says its residency here instead.
    health: Optional[str] = None
    detail: Optional[str] = None
    #: Where the model's engines are: awake, sleeping, stopped, waking, starting...
    residency: Optional[str] = None
    in_flight: Optional[int] = None
    rate: Optional[float] = None
    last_activity: Optional[float] = None
    #: The model's prompt + completion tokens per second over the window (GET /usage), when the router
    #: lets this reader see them (an admin endpoint).
    tokens_rate: Optional[float] = None


@dataclass(frozen=True)
class Row:
    """One instance: the config's facts, supervisord's process, the router's view."""

    name: str
    model: str
    #: False for `launch: false` instances: supervisord does not run them.
    launched: bool
    process: Optional[ProcessState]
    view: RouterView
    #: Started by the router when a request needs it (``on_demand: true``): stopped until then, and fine so.
    on_demand: bool = False

    @property
    def required(self) -> bool:
        """Whether the stack is up only once this one is: launched at start by supervisord."""
        return self.launched and not self.on_demand

    @property
    def ready(self) -> bool:
        """The router finds it healthy (or asleep) and supervisord counts its start as done (RUNNING,
        past startsecs): an engine may answer its health check within its first seconds, STARTING."""
        return self.view.health in READY and (self.process is None or self.process.running)

    @property
    def failed(self) -> bool:
        return self.process is not None and self.process.state in FAILED

    def last_log_lines(self, n: int) -> list[str]:
        """The end of its supervisord log, [] when there is none to read."""
        return tail_lines(self.process.logfile, n) if self.process and self.process.logfile else []

    def last_log_line(self) -> str:
        """Its log's last line as a progress display can show it: what a progress bar drew last
        (after its last carriage return), without colour codes or other control characters."""
        lines = self.last_log_lines(1)
        return printable(lines[0].rstrip("\r").rsplit("\r", 1)[-1]) if lines else ""


#: Terminal escape sequences (colours, cursor moves) and other control characters in a log line.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def printable(line: str) -> str:
    return _CONTROL.sub("", line).replace("\t", " ")


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    supervisord: Source
    router: Source
    rows: tuple[Row, ...]
    #: The router's own program, when supervisord runs it.
    router_process: Optional[ProcessState] = None

    @property
    def required(self) -> tuple[Row, ...]:
        """The instances supervisord starts with the stack (not on-demand, not started elsewhere)."""
        return tuple(r for r in self.rows if r.required)

    @property
    def ready(self) -> bool:
        """The router answers and supervisord counts its start as done (like an engine's, below), and
        every required instance is up in the router's eyes."""
        process = self.router_process
        return (self.router.up and (process is None or process.running)
                and all(r.ready for r in self.required))


def router_url(config: Config) -> str:
    host = connect_host(config.router.host)
    return f"http://[{host}]:{config.router.port}" if ":" in host else f"http://{host}:{config.router.port}"


def _error_text(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _obj(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> Optional[str]:
    return value if isinstance(value, str) else None


def _num(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _residency(value: object) -> Optional[str]:
    """A residency field, whatever its shape: its text, or a mapping's ``state``."""
    if isinstance(value, dict):
        return _str(value.get("state")) or (json.dumps(value, separators=(",", ":"))[:40] if value else None)
    return _str(value)


def router_views(health: object, traffic: object, usage: object = None) -> dict[str, RouterView]:
    """Instance name -> the router's view of it, from the bodies of /health/all, /traffic/stats and
    /usage (by model, over `RATE_WINDOW_SECONDS`)."""
    stats = _obj(_obj(traffic).get("traffic_stats"))
    tokens = _obj(_obj(usage).get("usage"))
    window = _num(_obj(usage).get("window_seconds"))
    views: dict[str, RouterView] = {}
    for model_name, report_value in _obj(_obj(health).get("models")).items():
        report = _obj(report_value)
        model_stats = _obj(stats.get(model_name))
        counted = _obj(tokens.get(model_name))
        prompt, completion = _num(counted.get("prompt_tokens")), _num(counted.get("completion_tokens"))
        tokens_rate = ((prompt or 0) + (completion or 0)) / window if window and usage is not None else None
        # The model's lifecycle state: the same word the endpoints carry as their residency.
        state = _residency(report.get("residency")) or _str(_obj(report.get("sleep")).get("state"))
        endpoints = report.get("endpoints")
        for endpoint_value in endpoints if isinstance(endpoints, list) else []:
            endpoint = _obj(endpoint_value)
            name = _str(endpoint.get("instance"))
            if name is None:
                continue
            outstanding = _num(endpoint.get("outstanding"))
            views[name] = RouterView(
                health=_str(endpoint.get("status")), detail=_str(endpoint.get("detail")),
                residency=_residency(endpoint.get("residency")) or state,
                in_flight=int(outstanding) if outstanding is not None else None,
                rate=_num(model_stats.get("request_rate")), last_activity=_num(model_stats.get("last_activity_time")),
                tokens_rate=tokens_rate)
    return views


class Reader:
    """Reads snapshots of one stack; the two sources are asked side by side, so a slow
    router (probing engines for /health/all) does not delay supervisord's news."""

    def __init__(self, config: Config, out: Path):
        self.config = config
        self.socket = out / SOCKET_NAME
        self.url = router_url(config)
        key = config.router.admin_api_key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        #: /health/all probes engines: allow the router its probe timeout, and then some.
        self._timeout = config.router.health_check_timeout_seconds + 3
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="status")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def read(self) -> Snapshot:
        programs_future = self._pool.submit(self._programs)
        router_future = self._pool.submit(self._router)
        programs, supervisord = programs_future.result()
        views, router = router_future.result()
        rows = tuple(Row(name=i.name, model=i.model, launched=i.launch, on_demand=i.on_demand,
                         process=programs.get(i.name) if i.launch else None, view=views.get(i.name, RouterView()))
                     for i in self.config.instances)
        return Snapshot(taken_at=time.time(), supervisord=supervisord, router=router, rows=rows,
                        router_process=programs.get(ROUTER_PROGRAM))

    def _programs(self) -> tuple[dict[str, ProcessState], Source]:
        where = str(self.socket)
        if not self.socket.exists():
            return {}, Source(where, "no socket (supervisord is not running, or --out names another folder)")
        try:
            return {p.name: p for p in fetch_all(self.socket)}, Source(where)
        except Exception as e:  # OSError, a Fault, a broken answer: all mean "no news from supervisord"
            return {}, Source(where, _error_text(e))

    def _get(self, path: str) -> object:
        request = urllib.request.Request(self.url + path, headers=self._headers)
        with urllib.request.urlopen(request, timeout=self._timeout) as answer:
            return json.loads(answer.read())

    def _router(self) -> tuple[dict[str, RouterView], Source]:
        try:
            health = self._get("/health/all")
            traffic = self._get(f"/traffic/stats?window={RATE_WINDOW_SECONDS}")
        except Exception as e:  # refused, timed out, an error status, not JSON: the router is not there for us
            return {}, Source(self.url, _error_text(e))
        try:
            usage = self._get(f"/usage?by=model&window={RATE_WINDOW_SECONDS}")
        except Exception:  # an admin endpoint this reader may not see, or an older router: no token rates
            usage = None
        return router_views(health, traffic, usage), Source(self.url)
