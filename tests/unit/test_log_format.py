"""The log lines of router.log_format: JSON objects with the documented fields, text unchanged."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import re
import sys

from router.observe.accesslog import AccessLog
from router.observe.events import Event, log_event
from router.observe.logs import JsonFormatter, json_config, utc_stamp

ACCESS_FIELDS = {"time", "level", "logger", "message", "model", "stream", "instance", "status", "bytes", "ttft_ms",
                 "latency_ms", "retries", "key", "prompt_tokens", "completion_tokens"}


def access_lines(log: AccessLog, *requests: tuple) -> list[str]:
    async def run() -> None:
        for r in requests:
            log.request(*r)
        log.flush()
    asyncio.run(run())
    return log._stream.getvalue().splitlines()  # type: ignore[union-attr]


def test_a_json_access_line_has_every_documented_field() -> None:
    lines = access_lines(AccessLog(io.StringIO(), json=True),
                         ("org/m", True, "m-0", 200, 512, 0.01234, 0.5, 1, "chat-ui", 31, 120),
                         ("org/m", False, None, 503, 90, None, 0.002, 0))
    first, second = (json.loads(line) for line in lines)
    assert set(first) == ACCESS_FIELDS
    assert first | {"time": None} == {"time": None, "level": "INFO", "logger": "router.access", "message": "request",
                                      "model": "org/m", "stream": True, "instance": "m-0", "status": 200, "bytes": 512,
                                      "ttft_ms": 12.3, "latency_ms": 500.0, "retries": 1, "key": "chat-ui",
                                      "prompt_tokens": 31, "completion_tokens": 120}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (second["instance"], second["ttft_ms"], second["status"]) == (None, None, 503)
    assert (second["key"], second["prompt_tokens"], second["completion_tokens"]) == ("anonymous", None, None)


def test_the_text_access_line_keeps_its_layout() -> None:
    (line,) = access_lines(AccessLog(io.StringIO(), json=False), ("org/m", False, "m-0", 200, 512, 0.01234, 0.5, 2))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO router.access: org/m single -> m-0 200 512B "
                        r"ttfb=12\.3ms total=500\.0ms retries=2", line), line
    (line,) = access_lines(AccessLog(io.StringIO(), json=False),
                           ("org/m", True, "m-0", 200, 512, 0.01, 0.5, 0, "chat-ui", 31, 120))
    assert line.endswith(" total=500.0ms tokens=31+120 key=chat-ui"), line


def test_a_log_record_is_one_json_object_with_its_traceback() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("router.lifecycle", logging.WARNING, __file__, 1, "model %s: %s", ("m", "x\ny"),
                                   sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["message"] == "model m: x\ny" and line["level"] == "WARNING" and line["logger"] == "router.lifecycle"
    assert "ValueError: boom" in line["exc"] and line["time"] == utc_stamp(record.created)


def test_the_json_config_survives_being_applied_twice() -> None:
    """The controller's uvicorn and each worker's apply the same dict: applying it must not spend it."""
    config = json_config("trace")
    before = json.dumps(config, sort_keys=True)
    formatter = logging.config.DictConfigurator(config).configure_formatter(config["formatters"]["json"])
    assert isinstance(formatter, JsonFormatter)
    assert json.dumps(config, sort_keys=True) == before and config["root"]["level"] == "DEBUG"


def test_a_state_change_is_a_line_with_the_events_fields() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    events_log = logging.getLogger("router.events")
    events_log.addHandler(handler)
    level = events_log.level
    events_log.setLevel(logging.INFO)
    try:
        log_event(Event("process", "FATAL", "org/m", "m-0", {"pid": None, "description": "Exited too quickly"}))
    finally:
        events_log.removeHandler(handler)
        events_log.setLevel(level)
    (record,) = records
    line = json.loads(JsonFormatter().format(record))
    assert line | {"time": None} == {"time": None, "level": "INFO", "logger": "router.events", "message": "process FATAL",
                                     "kind": "process", "state": "FATAL", "model": "org/m", "instance": "m-0",
                                     "pid": None, "description": "Exited too quickly"}
