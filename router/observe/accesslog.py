"""The access log: one line per proxied request, written in batches.

Going through `logging` costs about 10 us per line (a LogRecord, handler
locks, a formatter, a flush), a tenth of the router's CPU budget per request
(issue 4). Here a line costs a string format and a list append; the lines are
written to stderr together by the event loop at most `FLUSH_SECONDS` later,
in the same ``date time LEVEL logger: message`` layout as the other logs, or, when
the process logs JSON (``router.log_format: json``), as one JSON object a line
with the fields router/observe/logs.py documents.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional, TextIO

import orjson

from router.observe.logs import json_configured, utc_stamp

FLUSH_SECONDS = 0.2
NAME = "router.access"


class AccessLog:
    def __init__(self, stream: Optional[TextIO] = None, json: Optional[bool] = None):
        #: None means sys.stderr as it is at flush time (so test capture works).
        self._stream = stream
        #: JSON lines; by default as this process's logging is configured.
        self.json = json_configured() if json is None else json
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def request(self, model: str, stream: bool, instance: Optional[str], status: int, nbytes: int,
                ttft: Optional[float], latency: float, retries: int, key: str = "anonymous",
                prompt: Optional[int] = None, completion: Optional[int] = None) -> None:
        """One finished request; `ttft` and `latency` in seconds (`ttft` None: no byte came); `key` the
        client key's name (never the key), `prompt` and `completion` the engine's usage (None: not given)."""
        now = time.time()
        if self.json:
            line = orjson.dumps({"time": utc_stamp(now), "level": "INFO", "logger": NAME, "message": "request",
                                 "model": model, "stream": stream, "instance": instance, "status": status,
                                 "bytes": nbytes, "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
                                 "latency_ms": round(latency * 1000, 1), "retries": retries, "key": key,
                                 "prompt_tokens": prompt, "completion_tokens": completion}).decode()
        else:
            second = int(now)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            first = f"{ttft * 1000:.1f}ms" if ttft is not None else "-"
            retried = f" retries={retries}" if retries else ""
            if prompt is not None or completion is not None:
                retried += f" tokens={prompt if prompt is not None else '-'}+{completion if completion is not None else '-'}"
            if key != "anonymous":
                retried += f" key={key}"
            line = (f"{self._stamp},{int(now % 1 * 1000):03d} INFO {NAME}: {model} {'stream' if stream else 'single'} "
                    f"-> {instance or '-'} {status} {nbytes}B ttfb={first} total={latency * 1000:.1f}ms{retried}")
        self._lines.append(line + "\n")
        if len(self._lines) == 1:
            asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if not self._lines:
            return
        stream = self._stream or sys.stderr
        text = "".join(self._lines)
        self._lines.clear()
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the log is lost, requests are not
            pass
