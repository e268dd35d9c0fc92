"""``python -m router.serve --config FILE``: run the router on uvicorn.

uvicorn handles SIGTERM (supervisord's stop) gracefully: it stops
accepting, waits for in-flight requests and streams up to
`router.shutdown_grace_seconds`, then runs the app's lifespan shutdown,
which stops the health checker and sleep manager and closes the upstream
session.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
from typing import Optional, Sequence

import uvicorn

from router.server.app import create_app
from router.config import ConfigError, load_config

#: Listen backlog: thousands of clients may connect at once.
BACKLOG = 8192
#: How long an idle client connection stays open. Longer than the idle expiry of
#: the common clients' pools (aiohttp 15 s, httpx and the OpenAI SDK 5 s), so the
#: client closes first: a request sent on a connection the router is closing at
#: that moment would fail. uvicorn's default of 5 s loses that race (measured:
#: 222 of 1,000 streams failed after 4 s of pool idleness).
KEEP_ALIVE_SECONDS = 75


def raise_nofile_limit() -> None:
    """Many concurrent streams need two descriptors each: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.serve", description="Serve the OpenAI-compatible router.")
    ap.add_argument("--config", required=True, help="the YAML file listing the engine instances")
    ap.add_argument("--host", help="address to bind (default: router.router_host, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="port to bind (default: router.router_port, else 8080)")
    ap.add_argument("--supervisor-socket", help="supervisord's unix socket: the router then follows every engine's "
                    "process state (render passes it; without it, e.g. in tmux mode, process states are absent)")
    args = ap.parse_args(argv)
    try:
        # The router never launches engines, so launch-only checks (a missing
        # venv) are warnings here, as under --sim.
        config = load_config(args.config, sim=True)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {e.path}: {problem}", file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    settings = config.router
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_nofile_limit()
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, args.supervisor_socket), host=args.host or settings.host, port=args.port or settings.port,
        # proxy_headers off: the router never uses the client address, so skip that middleware.
        loop="uvloop", http="httptools", lifespan="on", access_log=False, proxy_headers=False, backlog=BACKLOG,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds, log_level=settings.log_level,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    ))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
