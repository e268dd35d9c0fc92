"""``python -m router.engines setup --config FILE [--dry-run]``: build the engine virtualenvs.

Exit status: 0 every venv holds its engine and imports it, 1 a step failed (its
command and output are printed), 2 a bad config (nothing was done).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from router.config import ConfigError, load_config
from router.engines.setup import Installer, SetupError, VenvPlan, build, plan


def carry_out(venvs: list[VenvPlan], console: Console) -> int:
    """Build every venv under one progress bar (a step, or a venv's import check, is one tick)."""
    total = sum(len(v.steps) + 1 for v in venvs)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    failed = 0
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("setup", total=total)
        for venv in venvs:
            def started(what: str, venv: VenvPlan = venv) -> None:
                progress.update(task, description=f"{venv.path}: {what}")
            try:
                version = build(venv, started, lambda: progress.advance(task))
            except SetupError as e:
                failed += 1
                progress.console.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
                continue
            changed = "built" if venv.steps else "unchanged"
            progress.console.print(f"{venv.path}: {venv.module} {version} imports ({changed})", highlight=False)
        progress.update(task, description="failed" if failed else "done")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.engines", description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="create each venv_path with its engine pinned (and kvcached where enabled)")
    setup.add_argument("--config", default="example-config.yaml", help="the YAML file (default: example-config.yaml)")
    setup.add_argument("--dry-run", action="store_true", help="print the plan per venv; install nothing")
    setup.add_argument("--python", default=sys.executable,
                       help="the interpreter new venvs are made from (default: this one); engines support only some versions")
    args = ap.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    try:
        # The venvs may not exist yet: that is what setup is for, so they are checked as under --sim.
        cfg = load_config(args.config, sim=True)
    except ConfigError as e:
        for w in e.warnings:
            print(f"warning: {w}", file=sys.stderr)
        for p in e.problems:
            print(f"error: {e.path}: {p}", file=sys.stderr)
        print("Nothing was done.", file=sys.stderr)
        return 2
    for w in cfg.warnings:
        if ".venv_path:" not in w:
            print(f"warning: {w}", file=sys.stderr)
    installer = Installer.find(args.python)
    try:
        venvs, notes = plan(cfg, installer)
    except SetupError as e:
        print(f"error: {cfg.path}: {e}\nNothing was done.", file=sys.stderr)
        return 2
    for note in notes:
        console.print(f"note: {note}")
    if not venvs:
        console.print("No instance declares engine_package or engine_requirements: nothing to set up.")
        return 0
    console.print(f"Plan ({installer.name}{', dry run: nothing is installed' if args.dry_run else ''}):")
    for venv in venvs:
        console.print("\n".join(venv.lines()))
    if args.dry_run:
        return 0
    return carry_out(venvs, console)


if __name__ == "__main__":
    sys.exit(main())
