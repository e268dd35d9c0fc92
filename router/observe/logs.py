"""The router's log format (``router.log_format``): text lines for people, or one JSON object a
line for a log pipeline (Loki, Elasticsearch, Cloud Logging) to index without parsing rules.

In json mode every line the router process writes through `logging` (its own
loggers, uvicorn's, asyncio's) and every access line is one object. The field
names are stable (docs/monitoring.md, "Logs as JSON"):

- every line: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``;
  ``exc`` (the traceback) when an exception is logged;
- access lines (``logger`` ``router.access``, ``message`` ``request``): ``model``,
  ``stream``, ``instance`` (null when none was reached), ``status``, ``bytes``,
  ``ttft_ms`` (first byte; null when none came), ``latency_ms``, ``retries``, ``key``
  (the client key's name, "anonymous" without one; never the key), ``prompt_tokens``
  and ``completion_tokens`` (the engine's usage; null when it gave none).
- state changes (``logger`` ``router.events``, as ``GET /events`` has them): ``kind``
  (model, process, health, breaker, reload, dns, leader), ``state``, ``model``,
  ``instance``, and the event's own detail.

Nothing here sees a request's headers, so no key can reach a line.

The format is set once per process, through the logging config uvicorn applies
in the controller and in every proxy worker (`uvicorn_options`); the access
log reads it from there (`json_configured`), so the format has one owner.
"""
from __future__ import annotations

import logging
import logging.config
import time

import orjson

TEXT, JSON = "text", "json"
#: The `extra` key of a record whose fields a JSON line carries beside the common ones.
FIELDS = "json_fields"
LOG_FORMATS = (TEXT, JSON)
#: The text layout of the router's own lines (uvicorn's keep uvicorn's default in text mode).
TEXT_LAYOUT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_stamp(t: float) -> str:
    """`t` (unix time) as 2026-01-31T12:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One log record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {"time": utc_stamp(record.created), "level": record.levelname,
                                   "logger": record.name, "message": record.getMessage()}
        for key, value in getattr(record, FIELDS, {}).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line).decode()


def _level(level: str) -> str:
    return "DEBUG" if level == "trace" else level.upper()


def json_config(level: str) -> dict[str, object]:
    """A `logging.config.dictConfig` that sends every logger through `JsonFormatter` to stderr.
    uvicorn's loggers keep no handler of their own and reach the root's."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # By name ("class", not "()": dictConfig pops "()" from the dict, and the same dict configures each worker).
        "formatters": {"json": {"class": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": _level(level), "handlers": ["stderr"]},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure(level: str, log_format: str) -> None:
    """This process's logging, before anything logs."""
    if log_format == JSON:
        logging.config.dictConfig(json_config(level))
    else:
        logging.basicConfig(level=_level(level), format=TEXT_LAYOUT)


def uvicorn_options(level: str, log_format: str) -> dict[str, object]:
    """What uvicorn.Config needs so its own logging setup (run again in each spawned proxy worker)
    keeps the format: in text mode nothing (uvicorn's default), in json mode the json config."""
    return {"log_config": json_config(level)} if log_format == JSON else {}


def json_configured() -> bool:
    """Whether this process logs JSON (its root handler formats with `JsonFormatter`)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
