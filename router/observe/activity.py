"""The activity log (``router.activity_log: PATH``): one JSON object a line per finished request,
for billing and audit, in a file of its own, rotated by size.

A line holds ``time`` (ISO 8601 UTC, when the request ended), ``key`` (the
client key's name, "anonymous" without one), ``model``, ``instance`` (null when
none was reached), ``status``, ``prompt_tokens`` and ``completion_tokens``
(the engine's ``usage``; null when it gave none), ``latency_ms``, ``ttft_ms``
(null when no byte came) and ``retries``. Nothing here sees a request's
headers or body: no key and no prompt or completion text can reach a line.

Lines are gathered and written together by the event loop at most
`FLUSH_SECONDS` later (like the access log), through the standard library's
`RotatingFileHandler`, which starts a new file once one passes `MAX_BYTES`
and keeps `BACKUPS` old ones (``PATH.1`` ... ``PATH.5``).

One process writes the file: the router, or with ``router.workers`` the
controller, which gets every worker's finished requests (`Report.done`,
router/server/workers/messages.py). A rotation is then never raced by another
process.
"""
from __future__ import annotations

import asyncio
import logging
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Optional

import orjson

from router.observe.logs import utc_stamp

FLUSH_SECONDS = 0.2
MAX_BYTES = 100 * 1024 * 1024
BACKUPS = 5


class ActivityLog:
    """The activity log at `path` (its folder is made if missing)."""

    def __init__(self, path: str, max_bytes: int = MAX_BYTES, backups: int = BACKUPS):
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._lines: list[bytes] = []

    def request(self, key: str, model: str, instance: Optional[str], status: int, prompt: Optional[int],
                completion: Optional[int], latency: float, ttft: Optional[float], retries: int) -> None:
        """One finished request; `latency` and `ttft` in seconds."""
        self._lines.append(orjson.dumps({
            "time": utc_stamp(time.time()), "key": key, "model": model, "instance": instance, "status": status,
            "prompt_tokens": prompt, "completion_tokens": completion, "latency_ms": round(latency * 1000, 1),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1), "retries": retries}))
        if len(self._lines) == 1:
            try:
                asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop (a test, a shutdown): write now
                self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = b"\n".join(self._lines).decode()
        self._lines.clear()
        # One record per batch: the handler rotates between batches, never inside one.
        self._handler.handle(logging.makeLogRecord({"msg": text, "levelno": logging.INFO, "levelname": "INFO"}))

    def close(self) -> None:
        self.flush()
        self._handler.close()
