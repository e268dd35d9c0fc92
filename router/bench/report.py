"""Figures from a benchmark run: summaries, router-vs-direct ratios, tables.

Summaries are plain dicts (milliseconds and per-second rates, keys carry the
unit) so the same object is printed as a table and written as ``--json``.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

from router.bench.loadgen import Recorder

QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution_ms(seconds: Sequence[float]) -> Optional[dict[str, float]]:
    """Mean and quantiles in milliseconds; None when there is nothing to describe."""
    if not seconds:
        return None
    values = sorted(seconds)
    out = {"mean": sum(values) / len(values) * 1e3}
    out.update({name: percentile(values, q) * 1e3 for name, q in QUANTILES})
    return out


def summarize(rec: Recorder) -> dict:
    elapsed = rec.elapsed or float("nan")
    return {
        "ok": rec.ok,
        "failed": sum(rec.failed.values()),
        "failed_by_status": dict(sorted(rec.failed.items())),
        "elapsed_s": rec.elapsed,
        "req_per_s": rec.ok / elapsed,
        "output_tokens": rec.output_tokens,
        "output_tok_per_s": rec.output_tokens / elapsed,
        "chunks": rec.chunks,
        "latency_ms": distribution_ms(rec.latency),
        "ttft_ms": distribution_ms(rec.ttft),
        "itl_ms": distribution_ms(rec.gaps),
    }


def _delta(a: Optional[dict], b: Optional[dict], key: str) -> Optional[float]:
    return a[key] - b[key] if a and b else None


def compare(router: dict, direct: dict) -> dict:
    """The router's cost as ratios and differences against direct, from the same run."""
    return {
        "throughput_ratio": router["req_per_s"] / direct["req_per_s"] if direct["req_per_s"] else None,
        "added_latency_ms": {q: _delta(router["latency_ms"], direct["latency_ms"], q) for q in ("p50", "p99")},
        "added_ttft_ms": {q: _delta(router["ttft_ms"], direct["ttft_ms"], q) for q in ("p50", "p99")},
        "itl_ratio": (router["itl_ms"]["mean"] / direct["itl_ms"]["mean"]
                      if router["itl_ms"] and direct["itl_ms"] and direct["itl_ms"]["mean"] else None),
    }


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None or v != v else fmt.format(v)


def _dist(d: Optional[dict]) -> str:
    return "-" if not d else "/".join(_num(d[q]) for q, _ in QUANTILES)


def _failed(s: dict) -> str:
    if not s["failed"]:
        return "0"
    return f"{s['failed']} (" + ", ".join(f"{k}:{v}" for k, v in s["failed_by_status"].items()) + ")"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def results_table(summaries: Mapping[str, dict]) -> str:
    rows = [("MODEL", "OK", "FAILED", "REQ/S", "OUT TOK/S", "LATENCY ms p50/p90/p99", "TTFT ms p50/p90/p99", "ITL ms mean")]
    for model, s in summaries.items():
        rows.append((model, str(s["ok"]), _failed(s), _num(s["req_per_s"]), _num(s["output_tok_per_s"], "{:.1f}"),
                     _dist(s["latency_ms"]), _dist(s["ttft_ms"]), _num((s["itl_ms"] or {}).get("mean"))))
    return _table(rows)


def comparison_table(comparisons: Mapping[str, dict]) -> str:
    rows = [("MODEL", "THROUGHPUT router/direct", "ADDED LATENCY ms p50/p99", "ADDED TTFT ms p50/p99", "ITL router/direct")]
    for model, c in comparisons.items():
        if "refused" in c:
            rows.append((model, f"no figures: {c['refused']}", "", "", ""))
            continue
        lat, ttft = c["added_latency_ms"], c["added_ttft_ms"]
        rows.append((model, _num(c["throughput_ratio"], "{:.3f}"),
                     f"{_num(lat['p50'], '{:+.3f}')}/{_num(lat['p99'], '{:+.3f}')}",
                     f"{_num(ttft['p50'], '{:+.3f}')}/{_num(ttft['p99'], '{:+.3f}')}",
                     _num(c["itl_ratio"], "{:.3f}")))
    return _table(rows)


def workload_line(w: Mapping[str, object]) -> str:
    """The run's header: what was sent, above every table."""
    return (f"\n{w['mode']}, {'stream' if w['stream'] else 'no stream'}, /{w['endpoint']}, "
            f"input {w['input_len']}, output {w['output_len']}\n")


def swap_table(summaries: Mapping[str, dict]) -> str:
    """The swap pattern: first-request TTFT by the state a burst found its model in, and the swaps it caused."""
    rows = [("MODEL", "BURSTS cold/wake/warm", "OK", "FAILED", "COLD TTFT ms p50/p90/p99", "WAKE TTFT ms p50/p90/p99",
             "WARM TTFT ms p50/p90/p99", "STARTS", "WAKES", "EVICTED sleep/stop")]
    for model, s in summaries.items():
        b, ev = s["bursts"], s["evicted"]
        rows.append((model, f"{b['cold']}/{b['wake']}/{b['warm']}", str(s["ok"]), _failed(s), _dist(s["cold_ttft_ms"]),
                     _dist(s["wake_ttft_ms"]), _dist(s["warm_ttft_ms"]), _num(s["starts"], "{:g}"),
                     _num(s["wakes"], "{:g}"), f"{ev['sleep']}/{ev['stop']}"))
    return _table(rows)


def write_json(path: str, doc: dict) -> None:
    """Written whole then renamed, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(doc), f, indent=2)
    os.replace(tmp, path)


def _finite(v: object) -> object:
    """JSON has no NaN: a rate over no time becomes null."""
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v
