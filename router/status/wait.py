"""``--wait``: follow snapshots until every launched engine is up, one fails, or time runs out.

A deploy script needs one exit code and, on failure, the reason without a
second command: so a failed engine is named with supervisord's description
and the end of its log. FATAL and BACKOFF count as failed at once (BACKOFF
is an engine that exited within its start time: it crashed on start, and
its log already says why), so the wait ends within a poll of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from router.status.snapshot import Row, Snapshot
from router.status.view import health_text, process_text, source_lines

#: Lines of a failed engine's log shown with the verdict.
LOG_LINES = 20


@dataclass(frozen=True)
class Culprit:
    """An instance the wait failed on: why, and the end of its log."""

    name: str
    reason: str
    logfile: Optional[str]
    log: tuple[str, ...]

    @classmethod
    def of(cls, row: Row, reason: str, lines: int = LOG_LINES) -> Culprit:
        return cls(row.name, reason, row.process.logfile if row.process else None, tuple(row.last_log_lines(lines)))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str
    culprits: tuple[Culprit, ...] = ()


@dataclass
class Waiter:
    """The wait's memory: when it began, when each engine became ready, what was last printed."""

    timeout: float
    started: float
    ready_at: dict[str, float] = field(default_factory=dict)
    _shown: dict[str, str] = field(default_factory=dict)

    def elapsed(self, snapshot: Snapshot, now: float) -> dict[str, float]:
        """Per launched engine: seconds waited until it became ready, or until now."""
        return {r.name: self.ready_at.get(r.name, now) - self.started for r in snapshot.required}

    def judge(self, snapshot: Snapshot, now: float) -> Optional[Verdict]:
        """The verdict once there is one; None while engines are still coming up."""
        for row in snapshot.required:
            if row.ready:
                self.ready_at.setdefault(row.name, now)
        failed = [r for r in snapshot.required if r.failed]
        router = snapshot.router_process
        if router is not None and router.state in ("FATAL", "BACKOFF"):
            log = tuple(router.log_tail(LOG_LINES))
            return Verdict(False, f"the router is {router.state}: {router.description}",
                           (Culprit("router", router.description, router.logfile, log),))
        if failed:
            culprits = tuple(Culprit.of(r, f"{r.process.state}: {r.process.description}" if r.process else "")
                             for r in failed)
            names = ", ".join(f"{c.name} is {c.reason}" for c in culprits)
            return Verdict(False, f"instance {names}", culprits)
        if snapshot.ready:
            return Verdict(True, f"all {len(snapshot.required)} launched instances are healthy "
                                 f"after {now - self.started:.1f}s")
        if now - self.started >= self.timeout:
            late = [r for r in snapshot.required if not r.ready]
            culprits = tuple(Culprit.of(r, f"process {process_text(r, snapshot)}, health {health_text(r, snapshot)}"
                                        + (f" ({r.view.detail})" if r.view.detail else ""), 10) for r in late)
            why = "; ".join(f"{c.name}: {c.reason}" for c in culprits) or "; ".join(source_lines(snapshot))
            return Verdict(False, f"not healthy after {self.timeout:g}s: {why}", culprits)
        return None

    def changes(self, snapshot: Snapshot, now: float, last_lines: dict[str, str]) -> list[str]:
        """Plain progress lines for what changed since the last call (for a pipe: no redraws)."""
        stamp = f"[{now - self.started:6.1f}s]"
        current = {f"source:{line.split(' ')[0]}": line for line in source_lines(snapshot)}
        for name in ("supervisord", "router"):
            current.setdefault(f"source:{name}", f"{name} answering")
        for row in snapshot.required:
            current[row.name] = f"{row.name}: process {process_text(row, snapshot)}, health {health_text(row, snapshot)}"
        out = []
        for key, text in current.items():
            if self._shown.get(key) != text:
                first = key not in self._shown
                self._shown[key] = text
                if first and text.endswith(" answering"):
                    continue  # a source that answers from the start is not news
                tail = last_lines.get(key)
                out.append(f"{stamp} {text}" + (f" | {tail}" if tail else ""))
        return out
