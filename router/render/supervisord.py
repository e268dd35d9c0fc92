"""``python -m router.render``: one YAML -> supervisord config, launch scripts, tmux scripts.

The output folder holds everything needed to run the node:

- ``supervisord.conf``: one program per launched engine, ``router`` when the
  router is enabled, and ``logs``, which keeps a tmux session ``kvcached-<name>``
  following each program's log so ``tmux attach`` works under supervisord too;
- ``engines/<name>.sh``: the one launch script of each engine, run by
  supervisord and by ``tmux-launch.sh`` alike;
- ``tmux-launch.sh``: the supervisord-free mode of the kvcached controller;
- ``tmux-logs.sh``: the body of the ``logs`` program;
- ``logs/``, where supervisord writes ``<program>.log`` and its own
  ``supervisord.log``, beside its socket and pidfile.

Every value from the YAML reaches a shell script only through `shlex.quote`,
and supervisord.conf only holds values that `ini_value` accepts, so no config
value can run as code. Rendering is a pure function of (config, output path,
python): the same input gives the same bytes.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jinja2

from router.config import Config, ConfigError, Instance, load_config, summary_table
from router.engines import sim_argv

#: supervisord program and tmux session names that are not engines.
ROUTER_PROGRAM = "router"
LOGS_PROGRAM = "logs"
SESSION_PREFIX = "kvcached-"
ROUTER_SESSION = f"{SESSION_PREFIX}frontend"
#: Engines get this long to shut down cleanly (free GPU memory, finish
#: in-flight work) before supervisord kills their process group.
ENGINE_STOPWAITSECS = 60
#: How long a program must stay up to count as started.
STARTSECS = 3
#: Beyond the router's own shutdown grace period, before supervisord kills it.
ROUTER_STOP_MARGIN_SECONDS = 10
#: Linux's limit for a unix socket path (sun_path), less its NUL.
MAX_SOCKET_PATH = 107
#: Inline comments start with whitespace then ';' or '#' in supervisord's parser.
INI_COMMENT = re.compile(r"\s[;#]")

SCRIPT_MODE = 0o700
FILE_MODE = 0o600
DIR_MODE = 0o700


class RenderError(Exception):
    """The config is valid but cannot be written out as asked (e.g. a bad --out)."""


@dataclass(frozen=True)
class Program:
    """One ``[program:x]`` of supervisord.conf."""

    name: str
    argv: tuple[str, ...]
    log: str
    startsecs: int
    stopwaitsecs: int
    environment: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Session:
    """One tmux session: what runs in it, and the log it follows under supervisord."""

    name: str
    argv: tuple[str, ...]
    log: str


#: Relative path -> (text, mode) of every generated file.
Files = Mapping[str, tuple[str, int]]


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def ini_value(value: str) -> str:
    """`value` as supervisord reads it back unchanged, or RenderError.

    supervisord %-expands every value and cuts inline comments, so ``%`` is
    doubled, and text that would end a line or start a comment is refused.
    """
    if any(c in value for c in "\n\r\0") or INI_COMMENT.search(value) or value != value.strip():
        raise RenderError(f"{value!r} cannot be written into supervisord.conf (newline, leading/trailing space, or ' ;'/' #'); use a path without them")
    return value.replace("%", "%%")


def templates_dir() -> Path:
    """Templates ship as ``router/templates`` when installed; a checkout has them at top level."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "templates", package.parent / "templates"):
        if (candidate / "supervisord.conf.j2").is_file():
            return candidate
    raise RenderError(f"templates not found beside {package}; reinstall the package")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["shquote"] = shlex.quote
    env.filters["shjoin"] = shell_join
    env.filters["ini"] = ini_value
    return env


def engine_argv(inst: Instance, sim: bool, python: str) -> tuple[str, ...]:
    """The engine command; under `sim` the simulated engine on the same host:port."""
    if sim:
        return tuple(sim_argv(python, inst.engine, inst.model, inst.engine_args, inst.sim_args))
    return tuple(inst.spec.launch_argv(inst.python, inst.model, inst.engine_args))


def router_argv(cfg: Config, python: str) -> tuple[str, ...]:
    return (python, "-m", "router.serve", "--config", cfg.path)


def render_files(cfg: Config, out: Path, sim: bool = False, python: str = sys.executable) -> Files:
    """Every generated file's text, rendered in memory; nothing is written.

    `out` must be absolute: the files name each other by absolute path so
    they work from any working directory.
    """
    if not out.is_absolute():
        raise RenderError(f"output folder {out} must be an absolute path")
    if "%" in str(out):
        # supervisord %-expands log file paths twice, so no escaping survives.
        raise RenderError(f"output folder {out} contains '%', which supervisord cannot use in log paths; choose another --out")
    socket = out / "supervisor.sock"
    if len(str(socket).encode()) > MAX_SOCKET_PATH:
        raise RenderError(f"supervisord's socket path {socket} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --out")
    logs = out / "logs"
    env = _environment()
    files: dict[str, tuple[str, int]] = {}
    programs: list[Program] = []
    sessions: list[Session] = []
    for index, inst in enumerate(cfg.launched):
        script = out / "engines" / f"{inst.name}.sh"
        delay = index * cfg.launch_delay_seconds
        files[f"engines/{inst.name}.sh"] = (env.get_template("engine.sh.j2").render(
            inst=inst,
            argv=engine_argv(inst, sim, python),
            venv=None if sim else inst.venv_path,
            delay=_seconds(delay),
            sim=sim,
        ), SCRIPT_MODE)
        log = str(logs / f"{inst.name}.log")
        # The launch delay does not count as having started: an engine that
        # dies right after it is still a failed start (retried, then FATAL).
        startsecs = STARTSECS + math.ceil(delay)
        programs.append(Program(inst.name, (str(script),), log, startsecs, ENGINE_STOPWAITSECS))
        sessions.append(Session(SESSION_PREFIX + inst.name, (str(script),), log))
    if cfg.router.enable_router:
        log = str(logs / f"{ROUTER_PROGRAM}.log")
        argv = router_argv(cfg, python)
        grace = math.ceil(cfg.router.shutdown_grace_seconds) + ROUTER_STOP_MARGIN_SECONDS
        programs.append(Program(ROUTER_PROGRAM, argv, log, STARTSECS, grace, (("PYTHONUNBUFFERED", "1"),)))
        sessions.append(Session(ROUTER_SESSION, argv, log))
    logs_script = out / "tmux-logs.sh"
    if sessions:
        programs.append(Program(LOGS_PROGRAM, (str(logs_script),), str(logs / f"{LOGS_PROGRAM}.log"), STARTSECS, 10))
    files["tmux-launch.sh"] = (env.get_template("tmux-launch.sh.j2").render(sessions=sessions), SCRIPT_MODE)
    files["tmux-logs.sh"] = (env.get_template("tmux-logs.sh.j2").render(sessions=sessions), SCRIPT_MODE)
    files["supervisord.conf"] = (env.get_template("supervisord.conf.j2").render(
        out=str(out), socket=str(socket), logs=str(logs), programs=programs,
    ), FILE_MODE)
    return files


def _seconds(value: float) -> str:
    """Seconds for ``sleep``, without float noise (0.1 * 3 -> '0.3')."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def write_tree(out: Path, files: Files) -> None:
    """Write `files` under `out` so a failure leaves the previous output intact.

    Everything is first written into a staging folder inside `out` (same file
    system), then renamed into place: the engines folder as a whole, then the
    scripts, and supervisord.conf last, so it never names a script that is
    not there. Run-time files (logs/, socket, pidfile) are left alone, so a
    running supervisord keeps working and picks the change up with
    ``supervisorctl update``.
    """
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(out, DIR_MODE)
    (out / "logs").mkdir(mode=DIR_MODE, exist_ok=True)
    os.chmod(out / "logs", DIR_MODE)
    stage = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        (stage / "engines").mkdir(mode=DIR_MODE)
        for rel, (text, mode) in files.items():
            _write_file(stage / rel, text, mode)
        old = stage / "engines.old"
        if (out / "engines").exists():
            os.rename(out / "engines", old)
        try:
            os.rename(stage / "engines", out / "engines")
        except OSError:
            if old.exists():
                os.rename(old, out / "engines")
            raise
        for rel in sorted(files, key=lambda r: r == "supervisord.conf"):
            if not rel.startswith("engines/"):
                os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_file(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it; never widened past `mode`


def next_steps(cfg: Config, out: Path) -> str:
    """What to run after rendering, printed for the user."""
    conf = shlex.quote(str(out / "supervisord.conf"))
    names = [SESSION_PREFIX + i.name for i in cfg.launched]
    if cfg.router.enable_router:
        names.append(ROUTER_SESSION)
    lines = [
        f"Rendered {len(cfg.launched)} engine(s){' and the router' if cfg.router.enable_router else ''} into {out}",
        "",
        "Start everything under supervisord:",
        f"  supervisord -c {conf}",
        f"  supervisorctl -c {conf} status",
        "Watch a live log:",
        *(f"  tmux attach -t {n}" for n in names),
        "Without supervisord (tmux only):",
        f"  {shlex.quote(str(out / 'tmux-launch.sh'))}        # then: list | kill",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.render", description=__doc__.split("\n", 1)[0])
    ap.add_argument("--config", default="example-config.yaml", help="the YAML file (default: example-config.yaml)")
    ap.add_argument("--out", default="supervisor", help="output folder (default: supervisor)")
    ap.add_argument("--sim", action="store_true", help="run the simulated engine in place of every engine (no GPU needed)")
    ap.add_argument("--check", action="store_true", help="validate and print the instances; write nothing")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, sim=args.sim)
    except ConfigError as e:
        print(f"{e}\nNothing was written.", file=sys.stderr)
        return 2
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.check:
        print(summary_table(cfg))
        return 0
    out = Path(os.path.abspath(args.out))
    try:
        write_tree(out, render_files(cfg, out, sim=args.sim))
    except RenderError as e:
        print(f"error: {e}\nNothing was written.", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cannot write {out}: {e}\nThe previous output is unchanged.", file=sys.stderr)
        return 1
    print(next_steps(cfg, out))
    return 0

