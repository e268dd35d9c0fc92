"""The access log: one line per proxied request, written in batches.

Going through `logging` costs about 10 us per line (a LogRecord, handler
locks, a formatter, a flush), a tenth of the router's CPU budget per request
(issue 4). Here a line costs a string format and a list append; the lines are
written to stderr together by the event loop at most `FLUSH_SECONDS` later,
in the same ``date time LEVEL logger: message`` layout as the other logs.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional, TextIO

FLUSH_SECONDS = 0.2
NAME = "router.access"


class AccessLog:
    def __init__(self, stream: Optional[TextIO] = None):
        #: None means sys.stderr as it is at flush time (so test capture works).
        self._stream = stream
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def write(self, message: str) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._lines.append(f"{self._stamp},{int(now % 1 * 1000):03d} INFO {NAME}: {message}\n")
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
