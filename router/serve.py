"""``python -m router.serve --config FILE``: run the router on uvicorn.

Proxied requests are served on the fast server's protocol
(router/server/http/fastserver.py), everything else by uvicorn's own. With
``router.workers: N`` this process becomes the controller and N proxy worker
processes share the port (router/server/workers/).

uvicorn handles SIGTERM (supervisord's stop) gracefully: it stops
accepting, waits for in-flight requests and streams up to
`router.shutdown_grace_seconds`, then runs the app's lifespan shutdown,
which stops the health checks and the idle loop, and closes the upstream
session. Workers are stopped before the controller.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
from types import FrameType
from typing import Optional, Sequence

import uvicorn
import uvloop

from router.cluster.extras import missing_extras
from router.config import ConfigError, load_config
from router.observe import logs, tracing
from router.server.http.app import RouterApp, create_app
from router.server.http.fastserver import FastHttpProtocol
from router.server.state import RouterState
from router.server.workers.worker import WorkerProcesses

log = logging.getLogger("router.serve")

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


def stop_is_a_clean_exit(sig: int, frame: Optional[FrameType]) -> None:
    """SIGTERM is how supervisord (and systemd, and Kubernetes) stop the router: exit 0.

    uvicorn shuts down gracefully on it, then puts the previous handler back
    and raises the signal again; with Python's default the process would then
    die by the signal, which supervisord logs as an unexpected exit (WARN) on
    every clean stop. This handler, installed first, turns both that re-raise
    and a stop before uvicorn runs into exit status 0, one of the program's
    exitcodes.
    """
    raise SystemExit(0)


def main(argv: Optional[Sequence[str]] = None, http: type[asyncio.Protocol] = FastHttpProtocol) -> int:
    """Serve until stopped. `http` is the connection protocol: the fast server's by default;
    benchmarks/serve_uvicorn.py passes uvicorn's own to measure what the fast server saves."""
    signal.signal(signal.SIGTERM, stop_is_a_clean_exit)
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
    missing = missing_extras(config) + [p for p in [tracing.problem(config.router.tracing)] if p]
    for problem in missing:
        print(f"error: {config.path}: {problem}", file=sys.stderr)
    if missing:
        return 2
    settings = config.router
    logs.configure(settings.log_level, settings.log_format)
    for warning in config.warnings:
        if settings.log_format == logs.JSON:
            log.warning("%s", warning)
        else:
            print(f"warning: {warning}", file=sys.stderr)
    raise_nofile_limit()
    options: dict[str, object] = dict(
        # proxy_headers off: the router never uses the client address, so skip that middleware.
        # FastHttpProtocol: uvicorn's httptools protocol, serving the proxied POSTs without ASGI.
        loop="uvloop", http=http, lifespan="on", access_log=False, proxy_headers=False, backlog=BACKLOG,
        timeout_graceful_shutdown=settings.shutdown_grace_seconds, log_level=settings.log_level,
        timeout_keep_alive=KEEP_ALIVE_SECONDS, **logs.uvicorn_options(settings.log_level, settings.log_format),
    )
    host, port = args.host or settings.host, args.port or settings.port
    app = create_app(config, args.supervisor_socket)
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options)).run()  # type: ignore[arg-type]
        return 0
    return serve_with_workers(app, host, port, options)


def serve_with_workers(app: RouterApp, host: str, port: int, options: dict[str, object]) -> int:
    """This process is the controller, on a private unix socket; `router.workers` proxy processes
    share the public port and pass it everything but proxied requests."""
    state = app.state
    assert isinstance(state, RouterState) and state.workers is not None
    links = state.workers
    folder = tempfile.mkdtemp(prefix="kvrouter-")  # 0700: only this user reaches the sockets
    link_path, http_path = os.path.join(folder, "link.sock"), os.path.join(folder, "http.sock")
    workers = WorkerProcesses(state.config.router.workers, link_path, http_path, host, port, options,
                              state.config.router.shutdown_grace_seconds)
    server = ControllerServer(uvicorn.Config(app, uds=http_path, **options), workers)  # type: ignore[arg-type]

    async def run() -> None:
        await links.serve(link_path)
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            if serving.done():
                return serving.result()
            await asyncio.sleep(0.01)
        try:
            workers.start()
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", host, port, e)
            server.should_exit = True
        await serving
        await links.close()
    try:
        uvloop.run(run())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


class ControllerServer(uvicorn.Server):
    """The controller's server: on SIGTERM or SIGINT the workers stop first (their streams end while
    the controller can still act for them), then the controller."""

    def __init__(self, config: uvicorn.Config, workers: WorkerProcesses):
        super().__init__(config)
        self.workers = workers
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping = False

    async def serve(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        """A signal handler: the first signal starts the workers' stop; a second is uvicorn's own."""
        if self._stopping or self.loop is None:
            return super().handle_exit(sig, frame)
        self._stopping = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._stop_workers_first()))

    async def _stop_workers_first(self) -> None:
        await self.workers.stop()
        self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
