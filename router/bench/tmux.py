"""``router.bench --tmux``: one client per model, each in its own detached tmux session.

This is the kvcached controller's habit: ``tmux attach -t benchmark-<name>``
watches one model's live progress. Each client writes its figures to
``<results-dir>/<name>.json``; this process waits for every client, then
prints the collected table. A session stays open after its run (until Enter)
so its final table can still be read.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from router.bench.report import results_table, write_json
from router.config import Config

#: Options that only the launching process uses; every other option is passed on.
#: (--json: the launcher writes every client's figures to it, under "sessions".)
_OWN = {"tmux", "models", "json", "results_dir", "config"}


def session_name(name: str) -> str:
    """tmux forbids '.' and ':' in session names; keep only safe characters."""
    return "benchmark-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def child_argv(args: argparse.Namespace, p: argparse.ArgumentParser, config: str, model: str, out: Path) -> list[str]:
    """The same benchmark for one model, rebuilt from the parsed options."""
    argv = [sys.executable, "-m", "router.bench", "--config", config, "--models", model, "--json", str(out)]
    for action in p._actions:
        dest = action.dest
        if dest in _OWN or dest == "help" or not action.option_strings:
            continue
        value = getattr(args, dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(f"--{'' if value else 'no-'}{dest.replace('_', '-')}")
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(action.option_strings[0])
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


def _tmux(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", *args], capture_output=True, text=True)


def launch(args: argparse.Namespace, cfg: Config, models: list[str], p: argparse.ArgumentParser) -> int:
    if shutil.which("tmux") is None:
        p.exit(2, f"{p.prog}: error: --tmux needs tmux on PATH (install it, e.g. apt-get install tmux)\n")
    out_dir = Path(args.results_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {m: session_name(cfg.models[m][0].name) for m in models}
    taken = [s for s in names.values() if _tmux("has-session", "-t", f"={s}").returncode == 0]
    if taken:
        p.exit(2, f"{p.prog}: error: tmux session(s) {', '.join(taken)} already exist; "
                  f"watch them with 'tmux attach -t NAME' or end them with 'tmux kill-session -t NAME'\n")
    runs = {}
    for model, session in names.items():
        result, status = out_dir / f"{session}.json", out_dir / f"{session}.exit"
        for stale in (result, status):
            stale.unlink(missing_ok=True)
        cmd = shlex.join(child_argv(args, p, cfg.path, model, result))
        script = (f"{cmd}; echo $? > {shlex.quote(str(status))}; "
                  "echo; echo 'benchmark finished; press Enter to close this session'; read _")
        started = _tmux("new-session", "-d", "-s", session, "-x", "220", "-y", "50", "sh", "-c", script)
        if started.returncode != 0:
            p.exit(2, f"{p.prog}: error: tmux could not start {session}: {started.stderr.strip()}\n")
        runs[model] = (session, result, status)
        print(f"{model}: tmux attach -t {session}    (figures: {result})")
    print("waiting for every client (Ctrl-C stops waiting; the sessions keep running)...", flush=True)
    try:
        while not all(status.exists() for _, _, status in runs.values()):
            time.sleep(0.2)
    except KeyboardInterrupt:
        return 130
    return _collect(runs, args.json)


def _collect(runs: dict[str, tuple[str, Path, Path]], json_path: Optional[str]) -> int:
    """Print every client's figures in one table; with --json, write them all to one file too."""
    summaries, failed, docs = {}, [], {}
    for model, (session, result, status) in runs.items():
        if status.read_text().strip() != "0" or not result.exists():
            failed.append(f"{model} (see tmux session {session})")
            if not result.exists():
                continue
        doc = docs[model] = json.loads(result.read_text())
        kinds = [k for k in ("router", "direct") if k in doc]
        for kind in kinds:
            summaries.update({(m if len(kinds) == 1 else f"{m} ({kind})"): s for m, s in doc[kind].items()})
    if summaries:
        print(results_table(summaries))
    if json_path:
        write_json(json_path, {"sessions": {runs[m][0]: doc for m, doc in docs.items()}})
    if failed:
        print("not every client succeeded: " + ", ".join(failed), file=sys.stderr)
    print("end the sessions with: " + "; ".join(f"tmux kill-session -t {s}" for s, _, _ in runs.values()))
    return 1 if failed else 0
