"""Which tmux sessions a rendering would share with another stack.

Session names are global on a tmux server, so a second stack rendered with
the same `tmux_session_prefix` and instance names would meet the first one's
sessions. The scripts never adopt a session tagged with another stack's
folder; rendering refuses such a clash up front, where the fix (another
prefix) is one line of YAML.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from router.config import Config
from router.render.files import STACK_OPTION, RenderError, session_names


def session_owners() -> dict[str, str]:
    """Session name -> the stack folder it is tagged with ('' when untagged), on the
    tmux server this process would reach (``TMUX_TMPDIR``, ``-L`` default socket).
    Empty when tmux is not installed or no server runs."""
    try:
        done = subprocess.run(["tmux", "list-sessions", "-F", f"#{{session_name}}\t#{{{STACK_OPTION}}}"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:  # no server running: no session at all
        return {}
    return dict(line.partition("\t")[::2] for line in done.stdout.splitlines())


def check_sessions(cfg: Config, out: Path) -> list[str]:
    """Warnings about sessions of our names made by no stack (the logs program leaves
    them alone); RenderError when one belongs to another stack."""
    owners = session_owners()
    clashes, warnings = [], []
    for name in session_names(cfg):
        owner = owners.get(name)
        if owner == "":
            warnings.append(f"tmux session {name!r} exists but no kvrouter stack made it, so this stack will not use it; "
                            f"close it (tmux kill-session -t ={name}) to see this stack's log there")
        elif owner is not None and owner != str(out):
            clashes.append(f"tmux session {name!r} belongs to the stack in {owner}; set a different top-level "
                           f"'tmux_session_prefix' in {cfg.path} (now {cfg.tmux_session_prefix!r}) so the two stacks keep apart")
    if clashes:
        raise RenderError("\n".join(clashes))
    return warnings
