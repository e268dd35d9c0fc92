"""``python -m router.bench``: load every configured model through the router (or directly).

The models and the router's address come from the same YAML the router
serves, so a benchmark always measures what is deployed. See the README's
"Benchmarks" section for the options and what each figure means.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import asdict
from typing import Callable, Mapping, Optional, Sequence, TextIO

import uvloop

from router.bench import swap, swap_trace
from router.bench.loadgen import ENDPOINTS, Recorder, Span, Target, Workload, new_session, run_model
from router.bench.report import compare, comparison_table, results_table, summarize, workload_line, write_json
from router.bench.residency import ResidencyWatch
from router.config import Config, ConfigError, connect_host, load_config


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return v
    return parse


def _span(text: str) -> Span:
    try:
        return Span.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DESCRIPTION = ("Load every configured model through the router (or directly) and report latency and throughput. "
               "The models and the router's address come from the YAML the router serves.")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.bench", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="example-config.yaml", help="the stack's YAML (models, router address)")
    p.add_argument("--pattern", choices=("steady", "swap", "swap-trace"), default="steady",
                   help="steady: every model loaded at once; swap: bursts to one model at a time, to measure cold "
                        "starts, wakes and evictions (see --burst); swap-trace: residency.policy fifo vs cost_aware "
                        "on one seeded trace, over stacks of simulated engines it starts itself (no --config)")
    p.add_argument("--url", help="router base URL, overriding router_host/router_port from the config")
    p.add_argument("--models", help="comma-separated models (or aliases) to load; default: every configured model")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--direct", action="store_true", help="send straight to each model's engine(s), not the router")
    where.add_argument("--compare-direct", action="store_true",
                       help="alternate router and direct phases (--rounds of each) and report the router's overhead")
    p.add_argument("--rounds", type=_positive(int), default=2, help="router+direct phase pairs with --compare-direct")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=_positive(int), help="closed loop: requests in flight per model (default 8)")
    loop.add_argument("--rate", type=_positive(float), help="open loop: Poisson arrivals, requests/s per model")
    p.add_argument("--duration", type=_positive(float), help="seconds per model (per phase with --compare-direct); default 30 unless --requests")
    p.add_argument("--requests", type=_positive(int), help="requests per model (per phase with --compare-direct)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="streamed (SSE) responses")
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    p.add_argument("--input-len", type=_span, default=Span(128, 128), help="prompt words: N, or LO:HI drawn uniformly per request")
    p.add_argument("--output-len", type=_span, default=Span(128, 128), help="max_tokens (with ignore_eos): N, or LO:HI drawn uniformly")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrival times")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="seconds one request may take")
    p.add_argument("--api-key", help="bearer key for the router (default: the config's first router.api_keys)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--progress-interval", type=_positive(float), default=1.0, help="seconds between progress updates")
    p.add_argument("--tmux", action="store_true",
                   help="one client per model in its own detached tmux session benchmark-<name>")
    p.add_argument("--results-dir", default="bench-results", help="with --tmux: where each model's JSON is written")
    swap.add_options(p, _positive(int))
    swap_trace.add_options(p, _positive(int), _positive(float))
    return p


#: Options that belong to the steady pattern only; --pattern swap refuses them rather than ignore them.
_STEADY_ONLY = ("direct", "compare_direct", "tmux", "concurrency", "rate", "requests")


def workload(args: argparse.Namespace) -> Workload:
    return Workload(
        endpoint=args.endpoint, stream=args.stream, input_len=args.input_len, output_len=args.output_len,
        concurrency=None if args.rate else (args.concurrency or 8), rate=args.rate,
        duration=args.duration if args.duration or args.requests else 30.0, requests=args.requests,
        seed=args.seed, timeout=args.timeout,
    )


def pick_models(cfg: Config, names: Optional[str]) -> list[str]:
    """Config models to load; aliases and served names map to their model."""
    if not names:
        return list(cfg.models)
    routes = cfg.routes
    out: list[str] = []
    for name in (n.strip() for n in names.split(",")):
        if name not in routes:
            raise ValueError(f"--models: {name!r} is not a model of {cfg.path}; known: {', '.join(routes)}")
        if routes[name] not in out:
            out.append(routes[name])
    return out


def router_url(cfg: Config, url: Optional[str]) -> str:
    if url:
        return url.rstrip("/")
    host = connect_host(cfg.router.host)
    return f"http://[{host}]:{cfg.router.port}" if ":" in host else f"http://{host}:{cfg.router.port}"


def targets(cfg: Config, models: Sequence[str], direct: bool, url: str, api_key: Optional[str]) -> dict[str, Target]:
    """Per model: the router, or each replica's engine with a name that engine serves."""
    out = {}
    for model in models:
        if direct:
            replicas = cfg.models[model]
            auth = next((i.auth_headers for i in replicas if i.auth_headers), {})
            out[model] = Target(model, tuple((i.url, i.served_names[0]) for i in replicas), auth)
        else:
            out[model] = Target(model, ((url, model),), _auth(api_key))
    return out


def _auth(key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Progress:
    """Live progress: one updating line per model on a terminal, periodic lines otherwise."""

    def __init__(self, out: TextIO, interval: float):
        self.out = out
        self.interval = interval
        self.tty = out.isatty()
        self._drawn = 0

    async def show(self, label: str, recs: Mapping[str, Recorder], until: asyncio.Future) -> None:
        t0 = last_t = time.perf_counter()
        last = {m: 0 for m in recs}
        while not until.done():
            await asyncio.wait({until}, timeout=self.interval)
            now = time.perf_counter()
            lines = []
            for model, rec in recs.items():
                done = rec.done
                rate = (done - last[model]) / (now - last_t)
                last[model] = done
                failed = sum(rec.failed.values())
                lines.append(f"[{label} {now - t0:6.1f}s] {model}: {done} done, {rate:.1f} req/s, {failed} errors")
            last_t = now
            self._draw(lines)
        self._drawn = 0

    def _draw(self, lines: list[str]) -> None:
        if self.tty:
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()


async def run_phase(label: str, tgts: Mapping[str, Target], work: Workload, stop: asyncio.Event,
                    progress: Progress) -> dict[str, Recorder]:
    """Every model at once through one session; returns each model's figures."""
    recs = {m: Recorder() for m in tgts}
    async with new_session(work.timeout) as session:
        runs = asyncio.ensure_future(asyncio.gather(*(run_model(session, t, work, stop, recs[m]) for m, t in tgts.items())))
        await asyncio.gather(progress.show(label, recs, runs), runs)
    return recs


async def bench(args: argparse.Namespace, cfg: Config, models: list[str]) -> dict:
    """Ctrl-C or SIGTERM stops sending: requests in flight finish and the figures are kept.

    A second one abandons the requests in flight (long streams) without figures.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await (_swap if args.pattern == "swap" else _phases)(args, cfg, models, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _phases(args: argparse.Namespace, cfg: Config, models: list[str], stop: asyncio.Event) -> dict:
    """Run the router and/or direct phases, then summarise each model."""
    work = workload(args)
    url = router_url(cfg, args.url)
    key = _api_key(args, cfg)
    progress = Progress(sys.stderr, args.progress_interval)
    kinds = ["router", "direct"] if args.compare_direct else ["direct" if args.direct else "router"]
    totals: dict[str, dict[str, Recorder]] = {k: {m: Recorder() for m in models} for k in kinds}
    watch = ResidencyWatch(url, _auth(key), models) if args.compare_direct else None
    if watch is not None:
        await watch.start(work.timeout)
    for rnd in range(args.rounds if args.compare_direct else 1):
        for kind in kinds:
            if stop.is_set():
                break
            label = f"{kind} {rnd + 1}/{args.rounds}" if args.compare_direct else kind
            recs = await run_phase(label, targets(cfg, models, kind == "direct", url, key), work, stop, progress)
            for m, rec in recs.items():
                totals[kind][m].merge(rec)
    doc: dict = {"config": cfg.path, "url": url, "workload": {**asdict(work), "input_len": str(work.input_len),
                 "output_len": str(work.output_len), "mode": work.mode}, "interrupted": stop.is_set()}
    for kind in kinds:
        doc[kind] = {m: summarize(rec) for m, rec in totals[kind].items()}
    if watch is not None:
        changed = await watch.changes(work.timeout)
        doc["residency_changes"] = changed
        doc["comparison"] = {m: watch.refusal(changed[m]) if m in changed else compare(doc["router"][m], doc["direct"][m])
                             for m in models}
        for warning in watch.warnings(changed):
            print(f"warning: {warning}", file=sys.stderr)
    return doc


async def _swap(args: argparse.Namespace, cfg: Config, models: list[str], stop: asyncio.Event) -> dict:
    """The swap pattern (router/bench/swap.py), through the router only."""
    work = workload(args)
    url = router_url(cfg, args.url)
    doc = await swap.run(args, work, url, _auth(_api_key(args, cfg)), models, stop)
    plan = doc.pop("plan")
    common = {k: getattr(work, k) for k in ("endpoint", "stream", "seed", "timeout")}
    return {"config": cfg.path, "url": url, "workload": {**common, **asdict(plan), "input_len": str(work.input_len),
            "output_len": str(work.output_len), "mode": plan.describe()}, "interrupted": stop.is_set(), **doc}


def _swap_trace(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The swap-trace pattern (router/bench/swap_trace.py): its own stacks, so no config and no router URL."""
    given = [f"--{o.replace('_', '-')}" for o in (*_STEADY_ONLY, "url", "models") if getattr(args, o) not in (None, False)]
    if given:
        p.error(f"--pattern swap-trace starts its own stacks and trace; drop {', '.join(given)}")
    try:
        swap_trace.plans(args)
        doc = uvloop.run(swap_trace.run(args))
    except ValueError as e:
        p.error(str(e))
    except swap_trace.SwapTraceError as e:
        p.exit(1, f"{p.prog}: {e}\n")
    swap_trace.report(doc, sys.stdout)
    if args.json:
        write_json(args.json, doc)
    return 0 if swap_trace.passed(doc) else 1


def _api_key(args: argparse.Namespace, cfg: Config) -> Optional[str]:
    return args.api_key or next((k.key for k in cfg.router.api_keys if k.key is not None), None)


def report(doc: dict, out: TextIO) -> None:
    if doc.get("pattern") == "swap":
        return swap.report(doc, out)
    out.write(workload_line(doc["workload"]))
    for kind in ("router", "direct"):
        if kind in doc:
            out.write(f"\n{kind} ({doc['url'] if kind == 'router' else 'engines from the config'}):\n")
            out.write(results_table(doc[kind]) + "\n")
    if "comparison" in doc:
        out.write("\nrouter overhead (router vs direct, same run, alternating phases):\n")
        out.write(comparison_table(doc["comparison"]) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.pattern == "swap-trace":
        return _swap_trace(p, args)
    try:
        cfg = load_config(args.config, sim=True)  # engines are not launched here: a missing venv is no matter
        models = pick_models(cfg, args.models)
    except (ConfigError, ValueError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if args.pattern == "swap":
        given = [f"--{o.replace('_', '-')}" for o in _STEADY_ONLY if getattr(args, o) not in (None, False)]
        if given:
            p.error(f"--pattern swap sends its own bursts through the router; drop {', '.join(given)}")
    if args.tmux:
        from router.bench.tmux import launch
        return launch(args, cfg, models, p)
    try:
        doc = uvloop.run(bench(args, cfg, models))
    except asyncio.CancelledError:
        print(f"{p.prog}: interrupted twice; requests in flight abandoned, no figures", file=sys.stderr)
        return 130
    report(doc, sys.stdout)
    if args.json:
        write_json(args.json, doc)
    if "swap" in doc:  # a failed start or wake is what this pattern is for: any failure fails the run
        return 0 if not any(s["failed"] for s in doc["swap"].values()) else 1
    kinds = [k for k in ("router", "direct") if k in doc]
    return 0 if all(doc[k][m]["ok"] for k in kinds for m in doc[k]) else 1

