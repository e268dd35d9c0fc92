"""A `Snapshot` shown: the rich status table, the --wait progress table, JSON.

rich draws the tables because it already knows what a terminal needs (widths,
colours, and none of them when the output is not a terminal); the same
cell texts serve the tables, the plain progress lines and nothing else, so
a state reads the same everywhere.
"""
from __future__ import annotations

from typing import Optional

from rich.table import Table
from rich.text import Text

from router.status.snapshot import RATE_WINDOW_SECONDS, Row, Snapshot
from router.supervision.processes import ProcessState

#: A value nobody reported: the source is down, or the field does not apply.
NONE = "-"
STYLES = {"RUNNING": "green", "healthy": "green", "awake": "green", "STARTING": "yellow", "sleeping": "cyan",
          "BACKOFF": "red", "FATAL": "red", "unhealthy": "red", "down": "red", "STOPPED": "dim", "EXITED": "red",
          "stopped": "dim", "waking": "yellow", "starting": "yellow", "failed": "red"}


def duration(seconds: Optional[float]) -> str:
    """``42s``, ``3m05s``, ``2h07m``, ``3d04h``: short and exact enough for a glance."""
    if seconds is None:
        return NONE
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def process_text(row: Row, snapshot: Snapshot) -> str:
    if not row.launched:
        return "not supervised"
    if row.process is None:
        return "?" if not snapshot.supervisord.up else "not in supervisord"
    return f"{row.process.state} (on demand)" if row.on_demand and not row.process.running else row.process.state


def health_text(row: Row, snapshot: Snapshot) -> str:
    return row.view.health or ("?" if not snapshot.router.up else NONE)


def probe_text(row: Row, snapshot: Snapshot) -> str:
    """The health column of the table: the probe's outcome only. A model that is not awake is
    not probed, and the router repeats its residency as its health: that is the residency
    column's to say, once."""
    return NONE if row.view.health is not None and row.view.health == row.view.residency else health_text(row, snapshot)


def styled(text: str) -> Text:
    return Text(text, style=STYLES.get(text, ""))


def source_lines(snapshot: Snapshot) -> list[str]:
    """One line per source that did not answer, naming where it was asked."""
    lines = []
    if not snapshot.supervisord.up:
        lines.append(f"supervisord not reachable at {snapshot.supervisord.where}: {snapshot.supervisord.error}")
    if not snapshot.router.up:
        lines.append(f"router not reachable at {snapshot.router.where}: {snapshot.router.error}")
    return lines


def router_line(snapshot: Snapshot) -> str:
    """The router's own program, as supervisord sees it."""
    p = snapshot.router_process
    process = f"{p.state}, up {duration(p.uptime_seconds(snapshot.taken_at))}" if p and p.running else (
        p.state if p else "not in supervisord" if snapshot.supervisord.up else "?")
    return f"router at {snapshot.router.where}: process {process}"


def _caption(snapshot: Snapshot) -> str:
    return "\n".join([router_line(snapshot), *source_lines(snapshot)])


def status_table(snapshot: Snapshot) -> Table:
    """One row per instance: process (supervisord), health (the router's probe), residency (awake,
    sleeping, stopped...: one column, the router's one word for it), load, last activity, uptime."""
    table = Table(title="kvrouter instances", caption=_caption(snapshot), caption_justify="left")
    headers = ["instance", "model", "process", "health", "residency",
               "in-flight", f"req/s ({RATE_WINDOW_SECONDS}s)", f"tok/s ({RATE_WINDOW_SECONDS}s)", "last activity", "uptime"]
    for header in headers:
        table.add_column(header, justify="right" if header in ("in-flight", "uptime") or "/s" in header else "left")
    now = snapshot.taken_at
    for row in snapshot.rows:
        v = row.view
        cells = [Text(row.name), Text(row.model), styled(process_text(row, snapshot)),
                 styled(probe_text(row, snapshot)), styled(v.residency or NONE)]
        uptime = row.process.uptime_seconds(now) if row.process else None
        cells += [Text(NONE if v.in_flight is None else str(v.in_flight)),
                  Text(NONE if v.rate is None else f"{v.rate:.2f}"),
                  Text(NONE if v.tokens_rate is None else f"{v.tokens_rate:.1f}"),
                  Text(NONE if v.last_activity is None else f"{duration(now - v.last_activity)} ago"),
                  Text(duration(uptime))]
        table.add_row(*cells)
    return table


def progress_table(snapshot: Snapshot, elapsed: dict[str, float], last_lines: dict[str, str]) -> Table:
    """The --wait table: each launched engine's process, health, time waited and its log's last line."""
    table = Table(title="waiting for the engines", caption=_caption(snapshot), caption_justify="left")
    for header in ("instance", "process", "health", "elapsed", "last log line"):
        table.add_column(header, justify="right" if header == "elapsed" else "left",
                         overflow="ellipsis", no_wrap=header == "last log line")
    for row in snapshot.required:
        table.add_row(row.name, styled(process_text(row, snapshot)), styled(health_text(row, snapshot)),
                      duration(elapsed.get(row.name)), Text(last_lines.get(row.name, "")))
    return table


def process_json(p: Optional[ProcessState], now: float) -> Optional[dict[str, object]]:
    return dict(p.report(now)) if p else None


def to_json(snapshot: Snapshot) -> dict[str, object]:
    """The reading for scripts: sources with their errors, then one object per instance."""
    now = snapshot.taken_at
    return {
        "ready": snapshot.ready,
        "taken_at": round(now, 3),
        "supervisord": {"socket": snapshot.supervisord.where, "reachable": snapshot.supervisord.up,
                        "error": snapshot.supervisord.error},
        "router": {"url": snapshot.router.where, "reachable": snapshot.router.up, "error": snapshot.router.error,
                   "process": process_json(snapshot.router_process, now)},
        "instances": [{
            "name": r.name, "model": r.model, "launched": r.launched, "on_demand": r.on_demand, "ready": r.ready,
            "process": process_json(r.process, now),
            "health": r.view.health, "health_detail": r.view.detail,
            "residency": r.view.residency, "in_flight": r.view.in_flight, "requests_per_second": r.view.rate,
            "tokens_per_second": r.view.tokens_rate,
            "last_activity": r.view.last_activity,
            "uptime_seconds": r.process.uptime_seconds(now) if r.process else None,
        } for r in snapshot.rows],
    }
