"""``python -m router.sim``: one simulated engine process, until SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Optional, Sequence

from .engine import SimEngine
from .options import SimOptions, parse_options

log = logging.getLogger("router.sim")


async def serve(options: SimOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = SimEngine(options)
    starting = asyncio.ensure_future(engine.start())
    await asyncio.wait((starting, asyncio.ensure_future(stop.wait())), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        return
    starting.result()
    log.info("simulated %s engine serving %s on %s", options.engine, ", ".join(options.names), engine.url)
    await stop.wait()
    await engine.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.ignored_args:
        log.info("ignoring engine arguments the simulator does not model: %s", " ".join(options.ignored_args))
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # plain asyncio still works, just slower
        pass
    try:
        asyncio.run(serve(options))
    except OSError as e:
        print(f"python -m router.sim: cannot listen on {options.host}:{options.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
