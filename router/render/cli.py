"""``python -m router.render``: one YAML -> supervisord config, launch scripts, tmux scripts;
with ``--apply``, also brought to the running stack.

Exit status: 0 done, 1 a runtime failure (the output folder cannot be
written, no supervisord runs for ``--apply``, a step was refused), 2 a bad
config or output folder (then nothing was written).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from router import __version__
from router.cluster.extras import missing_extras
from router.config import Config, ConfigError, load_config, summary_table
from router.render.apply import ApplyError, apply, make_plan, router_step, running_programs, supervisor
from router.render.files import FILE_MODE, Files, RenderError, render_files, session_names
from router.render.kubernetes.cli import render_to_kubernetes
from router.render.mode import MODE_FILE, ModeFileError, RenderMode, read_mode, refusal
from router.render.nodes import for_node
from router.render.sessions import check_sessions
from router.render.tree import read_tree, write_tree


def report(warnings: Sequence[str], errors: Sequence[str] = ()) -> None:
    """Every problem at once on stderr, warnings first: a did-you-mean often explains an error."""
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)


def extras_problems(cfg: Config, target: str) -> tuple[list[str], list[str]]:
    """(warnings, errors): the cluster features `cfg` uses whose package (the extra ``kvrouter[kubernetes]``)
    this Python cannot import. An error when the router runs from this rendering (it would refuse to
    start), a warning for Kubernetes manifests or a rendering without the router (the router runs
    elsewhere, from an image or install that must have the extra)."""
    problems = [f"{cfg.path}: {p}" for p in missing_extras(cfg)]
    if target == "kubernetes" or not cfg.router.enable_router:
        return [f"{p} (here; the router runs elsewhere and needs it there)" for p in problems], []
    return [], problems


def file_changes(old: Mapping[str, str], new: Files) -> str:
    """One line saying which rendered files a new rendering adds, changes and removes."""
    parts = [(what, names) for what, names in (
        ("added", sorted(set(new) - set(old))),
        ("changed", sorted(r for r in new if r in old and old[r] != new[r][0])),
        ("removed", sorted(set(old) - set(new))),
    ) if names]
    return "Files: " + ("; ".join(f"{what} {', '.join(names)}" for what, names in parts) if parts else "unchanged")


def next_steps(cfg: Config, out: Path, mode: RenderMode) -> str:
    """What to run after rendering, printed for the user: every command exactly as it is typed."""
    conf = shlex.quote(str(out / "supervisord.conf"))
    lines = [
        f"Rendered {len(cfg.launched)} engine(s){' and the router' if cfg.router.enable_router else ''} into {out}",
        "",
        "Start everything under supervisord:",
        f"  supervisord -c {conf}",
        f"  supervisorctl -c {conf} status",
        "Watch a live log:",
        *(f"  tmux attach -t {n}" for n in session_names(cfg)),
        "Without supervisord (tmux only):",
        f"  {shlex.quote(str(out / 'tmux-launch.sh'))}        # then: list | kill",
        "After editing the YAML, apply it to the running stack:",
        f"  {mode.command(out, '--apply')}",
        "(add --dry-run to see the plan first)",
    ]
    return "\n".join(lines)


def apply_to_stack(cfg: Config, out: Path, old: Mapping[str, str], new: Files, dry_run: bool) -> int:
    """Plan against the running supervisord and, unless `dry_run`, carry the plan out."""
    try:
        proxy = supervisor(out)
        plan = make_plan(out, old, new, running_programs(proxy))
        if dry_run:
            print("Plan (dry run: nothing is written, started or stopped):", *plan.lines(), sep="\n")
            restarted = {*plan.start, *plan.restart}
        else:
            print("Plan:", *plan.lines(), "Applying:", sep="\n")
            restarted = apply(proxy, out, plan, print)
    except ApplyError as e:
        report([], [str(e)])
        return 1
    ok, message = router_step(cfg, restarted, dry_run)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


DESCRIPTION = """\
Render one YAML into the files that run a node: supervisord.conf, one launch
script per engine, and tmux scripts (or, with --target kubernetes, Kubernetes
manifests). With --apply, also bring the new files to the running supervisord
of the same folder and have the router re-read the YAML, restarting only the
engines whose launch changed."""

EPILOG = """\
exit status: 0 done; 1 a runtime failure (the output folder cannot be written,
no supervisord runs for --apply, supervisord refused a step); 2 a bad config,
output folder or mode (then nothing was written).

examples:
  python -m router.render --config example-config.yaml --check
  python -m router.render --config example-config.yaml --out supervisor --sim
  python -m router.render --config example-config.yaml --out supervisor --sim --apply --dry-run
  python -m router.render --config example-config.yaml --target kubernetes --out kubernetes"""


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m router.render", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"kvrouter {__version__}")
    ap.add_argument("--config", default="example-config.yaml", help="the YAML file (default: example-config.yaml)")
    ap.add_argument("--out", help="output folder (default: supervisor, or kubernetes for --target kubernetes)")
    ap.add_argument("--target", choices=("supervisord", "kubernetes"), default="supervisord",
                    help="what to render: a node's supervisord folder (default), or Kubernetes manifests (kubectl apply -k OUT)")
    ap.add_argument("--node", metavar="NAME",
                    help="render only the engines whose 'node:' is NAME, and the router unless router.node names another node")
    ap.add_argument("--sim", action="store_true", help="run the simulated engine in place of every engine (no GPU needed)")
    ap.add_argument("--check", action="store_true", help="validate and print the instances; write nothing")
    ap.add_argument("--apply", action="store_true",
                    help="then apply the new files to the running supervisord (<out>/supervisor.sock) and reload the router; "
                         "refused when --sim, --config or --node differ from the running rendering")
    ap.add_argument("--dry-run", action="store_true", help="with --apply: print the plan; write and change nothing")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.dry_run and not args.apply:
        ap.error("--dry-run goes with --apply (python -m router.render --apply --dry-run)")
    if args.target == "kubernetes" and (args.apply or args.node):
        ap.error("--target kubernetes takes neither --apply (use: kubectl apply -k OUT) nor --node "
                 "(instances' 'node:' pins their pods there)")
    try:
        # A virtualenv of this machine means nothing to a pod: kubernetes renders like --sim checks.
        cfg = load_config(args.config, sim=args.sim or args.target == "kubernetes")
    except ConfigError as e:
        report(e.warnings, [f"{e.path}: {p}" for p in e.problems])
        print("Nothing was written.", file=sys.stderr)
        return 2
    warnings, errors = extras_problems(cfg, args.target)
    report([*cfg.warnings, *warnings], errors)
    if errors:
        print("Nothing was written.", file=sys.stderr)
        return 2
    if args.check:
        print(summary_table(cfg))
        return 0
    if args.target == "kubernetes":
        return render_to_kubernetes(cfg, Path(os.path.abspath(args.out or "kubernetes")), args.sim)
    if args.node:
        cfg, warnings = for_node(cfg, args.node)
        report(warnings)
    out = Path(os.path.abspath(args.out or "supervisor"))
    mode = RenderMode(config=cfg.path, sim=args.sim, node=args.node)
    if args.apply:
        try:
            recorded = read_mode(out)
        except ModeFileError as e:
            report([], [str(e)])
            return 2
        refused = recorded and refusal(out, recorded, mode, args.dry_run)
        if refused:
            report([], [refused])
            return 2
    try:
        files = {**render_files(cfg, out, sim=args.sim), MODE_FILE: (mode.text(), FILE_MODE)}
        report(check_sessions(cfg, out))
    except RenderError as e:
        report([], str(e).splitlines())
        print("Nothing was written.", file=sys.stderr)
        return 2
    old = read_tree(out)
    if args.dry_run:
        print(file_changes(old, files).replace("Files:", "Files that would change:", 1))
        return apply_to_stack(cfg, out, old, files, dry_run=True)
    try:
        write_tree(out, files)
    except OSError as e:
        print(f"error: cannot write {out}: {e}\nThe previous output is unchanged.", file=sys.stderr)
        return 1
    if not args.apply:
        print(next_steps(cfg, out, mode))
        return 0
    print(file_changes(old, files))
    return apply_to_stack(cfg, out, old, files, dry_run=False)
