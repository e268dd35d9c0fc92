"""``python -m router.render.wait_healthy``: an engine's launch script waits here for its turn.

Under ``launch_order: healthy`` an engine's first start waits until each engine
before it on its GPU serves (its health URL answers 2xx), has failed (under
supervisord: FATAL, EXITED, BACKOFF, or STOPPED for a while), or the timeout
passes; then the script goes on to exec the engine. It polls rather than sleeps a
guessed time, and it never fails the start: whatever happens, the engine starts.
Only the standard library and the supervisor package (beside the router) are used,
so it runs with the renderer's python before the engine's venv is activated.

    python -m router.render.wait_healthy --timeout 1800 [--socket S] e0=http://127.0.0.1:9001/health
"""
from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

#: supervisord states of a program that will not become healthy on this start.
GAVE_UP = frozenset({"FATAL", "EXITED", "BACKOFF"})
#: STOPPED also means "not yet spawned" for a moment at supervisord's start.
STOPPED_FOR_SECONDS = 5.0
POLL_SECONDS = 0.25
PROBE_TIMEOUT_SECONDS = 2.0


def healthy(url: str) -> bool:
    """Whether `url` answers 2xx now."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_SECONDS) as reply:
            return 200 <= reply.status < 300
    except (OSError, ValueError):  # refused, reset, timed out, HTTP error status (urllib's HTTPError is an OSError)
        return False


def supervisor_states(socket: str) -> Callable[[str], Optional[str]]:
    """Program -> its supervisord state name, or None when supervisord cannot say."""
    from router.supervision.supervisord import connect

    proxy = connect(socket)

    def state(program: str) -> Optional[str]:
        try:
            return str(proxy.supervisor.getProcessInfo(program)["statename"])
        except Exception:  # noqa: BLE001  (no supervisord, unknown program: fall back on health alone)
            return None
    return state


def wait(engines: dict[str, str], timeout: float, state: Callable[[str], Optional[str]],
         probe: Callable[[str], bool] = healthy, clock: Callable[[], float] = time.monotonic,
         pause: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Wait until every engine (name -> health URL) is healthy or given up on, or `timeout`
    passes; each engine -> why the wait on it ended ("healthy", "FATAL", "timeout", ...)."""
    start = clock()
    pending = dict(engines)
    ended: dict[str, str] = {}
    stopped_since: dict[str, float] = {}
    while pending:
        now = clock()
        for name, url in list(pending.items()):
            st = state(name)
            if st == "STOPPED":
                stopped_since.setdefault(name, now)
            else:
                stopped_since.pop(name, None)
            if probe(url):
                ended[name] = "healthy"
            elif st in GAVE_UP:
                ended[name] = st
            elif name in stopped_since and now - stopped_since[name] >= STOPPED_FOR_SECONDS:
                ended[name] = "STOPPED"
            else:
                continue
            del pending[name]
        if not pending:
            break
        if now - start >= timeout:
            ended.update((name, "timeout") for name in pending)
            break
        pause(POLL_SECONDS)
    return ended


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.render.wait_healthy",
                                     description="Wait until the engines before this one serve, fail, or the timeout passes.")
    parser.add_argument("--timeout", type=float, required=True, help="longest wait, in seconds")
    parser.add_argument("--socket", help="supervisord's socket, to see an engine that failed")
    parser.add_argument("engines", nargs="+", metavar="NAME=URL", help="an engine and its health URL")
    args = parser.parse_args(argv)
    engines = dict(e.split("=", 1) for e in args.engines)
    state = supervisor_states(args.socket) if args.socket else (lambda _name: None)
    t0 = time.monotonic()
    print(f"launch_order healthy: waiting for {', '.join(engines)} (at most {args.timeout:g}s)", flush=True)
    ended = wait(engines, args.timeout, state)
    said = ", ".join(f"{name} {why}" for name, why in ended.items())
    print(f"launch_order healthy: starting after {time.monotonic() - t0:.1f}s ({said})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
