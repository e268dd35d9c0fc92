"""How an output folder was rendered (``--sim``, target, config, node), kept in the folder.

``render --apply`` brings a running stack to a new rendering. Without a record
of how the running one was made, a ``--sim`` stack applied without ``--sim``
would get real engines' launch scripts and restart every engine. So each
rendering writes `MODE_FILE` beside supervisord.conf, ``--apply`` refuses a
mode that differs from it, and the hints printed after rendering show the
exact command, flags included.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

#: The record, relative to the output folder.
MODE_FILE = "rendered.json"
#: The supervisord folder is the default target.
SUPERVISORD = "supervisord"


@dataclass(frozen=True)
class RenderMode:
    """The flags a rendering was made with; the config by its absolute path."""

    config: str
    sim: bool
    target: str = SUPERVISORD
    node: Optional[str] = None

    def text(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def command(self, out: Path, *extra: str) -> str:
        """The render command line that makes this mode again into `out`, then `extra` flags."""
        argv = ["python", "-m", "router.render", "--config", self.config, "--out", str(out)]
        if self.target != SUPERVISORD:
            argv += ["--target", self.target]
        if self.node is not None:
            argv += ["--node", self.node]
        if self.sim:
            argv.append("--sim")
        return " ".join(shlex.quote(a) for a in argv) + "".join(f" {e}" for e in extra)

    def differences(self, asked: "RenderMode") -> list[str]:
        """What `asked` changes from this (recorded) mode, one phrase each; empty when nothing does."""
        found = []
        if self.sim != asked.sim:
            found.append("it was rendered with --sim (simulated engines), this run has no --sim" if self.sim
                         else "it was rendered without --sim (real engines), this run has --sim")
        if self.target != asked.target:
            found.append(f"it was rendered with --target {self.target}, this run asks for --target {asked.target}")
        if self.config != asked.config:
            found.append(f"it was rendered from --config {self.config}, this run reads {asked.config}")
        if self.node != asked.node:
            found.append(f"it was rendered with {_node(self.node)}, this run has {_node(asked.node)}")
        return found


def _node(node: Optional[str]) -> str:
    return "no --node" if node is None else f"--node {node}"


class ModeFileError(Exception):
    """The record exists but cannot be read: the folder was edited or damaged."""


def read_mode(out: Path) -> Optional[RenderMode]:
    """The mode `out` was last rendered with; None for a folder rendered before the record existed."""
    path = out / MODE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return RenderMode(config=str(doc["config"]), sim=bool(doc["sim"]), target=str(doc.get("target", SUPERVISORD)),
                          node=None if doc.get("node") is None else str(doc["node"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModeFileError(f"{path}: cannot read how this folder was rendered ({e}); "
                            f"render without --apply to rewrite it, then restart the stack") from None


def refusal(out: Path, recorded: RenderMode, asked: RenderMode, dry_run: bool) -> Optional[str]:
    """Why ``--apply`` to `out` must not go ahead with `asked`, and the command that would; None when it may."""
    why = recorded.differences(asked)
    if not why:
        return None
    extra = ("--apply", "--dry-run") if dry_run else ("--apply",)
    return (f"{out} runs a stack rendered differently: {'; '.join(why)}. Applying would change how every engine runs "
            f"and restart them all, so nothing was written, started or stopped.\n"
            f"  To apply the edited YAML to the running stack as it runs:\n    {recorded.command(out, *extra)}\n"
            f"  To switch mode, stop the stack (supervisorctl -c {shlex.quote(str(out / 'supervisord.conf'))} shutdown), "
            f"render without --apply, and start it again.")
