"""The command line of ``python -m router.status`` (also ``kvrouter-status``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO

from rich.console import Console
from rich.live import Live

from router.config import ConfigError, load_config
from router.status.snapshot import Reader
from router.status.view import progress_table, status_table, to_json
from router.status.wait import Verdict, Waiter

DEFAULT_TIMEOUT = 900.0
POLL_SECONDS = 0.5
#: Width of a table written to a pipe or file (rich would assume 80 and squeeze the columns).
PIPE_WIDTH = 200

DESCRIPTION = """\
Show every instance of a kvrouter stack: supervisord's process state, the
router's health probe and residency (awake, sleeping, stopped...), in-flight requests, requests per second,
last activity and uptime. supervisord is asked over <out>/supervisor.sock,
the router over HTTP at router_host:router_port (with the admin key, if the
config sets one); a source that does not answer is named, not fatal."""

EPILOG = """\
exit status: 0 every launched instance is healthy (or asleep; on-demand engines
need not run), 1 not (with --wait: one went FATAL or BACKOFF, or time ran out),
2 the config is wrong.

examples:
  python -m router.status --config example-config.yaml
  python -m router.status --config example-config.yaml --wait --timeout 300
  python -m router.status --config example-config.yaml --json | jq '.instances[].health'"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m router.status", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, metavar="FILE", help="the stack's YAML file")
    ap.add_argument("--out", default="supervisor", metavar="DIR",
                    help="the folder python -m router.render wrote, holding supervisor.sock (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table (for scripts)")
    ap.add_argument("--wait", action="store_true",
                    help="follow the engines as they come up (a live table on a terminal, one line per change "
                         "otherwise) until every launched instance is healthy (exit 0) or one fails (exit 1, "
                         "naming it, with the end of its log)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                    help="with --wait: give up after S seconds (default: %(default)g)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout must be more than 0 seconds, not {args.timeout:g}")
    try:
        config = load_config(args.config, sim=True)
    except ConfigError as e:
        # One "file: field: problem" line per problem, as render and serve print them.
        sys.stderr.writelines(f"error: {line}\n" for line in str(e).splitlines())
        return 2
    reader = Reader(config, Path(args.out))
    try:
        if args.wait:
            return wait(reader, args.timeout, args.json)
        snapshot = reader.read()
        if args.json:
            print(json.dumps(to_json(snapshot), indent=2))
        else:
            console(sys.stdout).print(status_table(snapshot))
        return 0 if snapshot.ready else 1
    except KeyboardInterrupt:
        return 130
    finally:
        reader.close()


def console(file: TextIO) -> Console:
    """rich on `file`: the terminal's own width there; elsewhere wide, with no colours or escape codes."""
    terminal = file.isatty()
    return Console(file=file, width=None if terminal else PIPE_WIDTH, force_terminal=terminal)


@contextlib.contextmanager
def live_display(console: Console, enabled: bool) -> Iterator[Optional[Live]]:
    """rich's Live on a terminal; None on a pipe, where redraws would be escape codes in a file."""
    if not enabled:
        yield None
        return
    with Live(console=console, refresh_per_second=4) as live:
        yield live


def wait(reader: Reader, timeout: float, as_json: bool) -> int:
    """Poll until a verdict; progress to stdout (stderr with --json, which keeps stdout for the JSON)."""
    progress: TextIO = sys.stderr if as_json else sys.stdout
    display = console(progress)
    waiter = Waiter(timeout=timeout, started=time.monotonic())
    with live_display(display, display.is_terminal) as live:
        while True:
            polled = time.monotonic()
            snapshot = reader.read()
            now = time.monotonic()
            last_lines = {r.name: r.last_log_line() for r in snapshot.required}
            verdict = waiter.judge(snapshot, now)
            if live is not None:
                live.update(progress_table(snapshot, waiter.elapsed(snapshot, now), last_lines))
            else:
                for line in waiter.changes(snapshot, now, last_lines):
                    print(line, file=progress, flush=True)
            if verdict is not None:
                break
            time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - polled)))
    report(verdict, progress)
    if as_json:
        print(json.dumps(to_json(snapshot), indent=2))
    return 0 if verdict.ok else 1


def report(verdict: Verdict, progress: TextIO) -> None:
    """The outcome: one line with the progress on success; on failure the culprits with the end
    of each log, on stderr."""
    if verdict.ok:
        print(verdict.message, file=progress, flush=True)
        return
    out = sys.stderr
    print(f"error: {verdict.message}", file=out)
    for c in verdict.culprits:
        if c.logfile is None:
            continue
        print(f"--- last {len(c.log)} lines of {c.name}'s log {c.logfile}:", file=out)
        for line in c.log:
            print(f"    {line}", file=out)
    out.flush()
