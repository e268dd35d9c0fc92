"""One `Config` -> the text of every file that runs the node (nothing is written here).

The output folder holds everything needed to run the node:

- ``supervisord.conf``: one program per launched engine, ``router`` when the
  router is enabled, and ``logs``, which keeps a tmux session ``<prefix><name>``
  (``tmux_session_prefix``, default ``kvcached-``) following each program's
  log so ``tmux attach`` works under supervisord too;
- ``engines/<name>.sh``: the one launch script of each engine, run by
  supervisord and by ``tmux-launch.sh`` alike;
- ``tmux-launch.sh``: the supervisord-free mode of the kvcached controller;
- ``tmux-logs.sh``: the body of the ``logs`` program;
- ``kvrouter.service``: a systemd unit running that supervisord in the
  foreground at boot, as the user who rendered, with its secrets from that
  user's `ENV_FILE` (never from the YAML);
- ``logs/``, where supervisord writes ``<program>.log`` and its own
  ``supervisord.log``, beside its socket and pidfile;
- ``run/``, where each launch script notes what it started (see
  ``engine.sh.j2``), so ``--apply`` and the first-start wait can tell a first
  start from a restart.

Every tmux session a stack makes carries the stack's identity, its absolute
output folder, in the session option `STACK_OPTION`: the scripts only ever
list, follow or kill sessions carrying their own folder, so two stacks on one
tmux server never touch each other's sessions.

Every value from the YAML reaches a shell script only through `shlex.quote`,
and supervisord.conf only holds values that `ini_value` accepts, so no config
value can run as code. Rendering is a pure function of (config, output path,
python): the same input gives the same bytes.
"""
from __future__ import annotations

import getpass
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jinja2

from router.config import Config, Instance
from router.engines import sim_argv
from router.render.start_order import turns
from router.supervision.supervisord import SOCKET_NAME

#: supervisord program names that are not engines.
ROUTER_PROGRAM = "router"
LOGS_PROGRAM = "logs"
#: The router's tmux session is `<tmux_session_prefix>frontend`.
ROUTER_SESSION_SUFFIX = "frontend"
#: tmux session option naming the stack (absolute output folder) that made the session.
STACK_OPTION = "@kvrouter_stack"
#: Run-time notes of the launch scripts, beside logs/.
RUN_DIR = "run"
#: Engines get this long to shut down cleanly (free GPU memory, finish
#: in-flight work) before supervisord kills their process group.
ENGINE_STOPWAITSECS = 60
#: The first-start wait only happens this soon after supervisord's (re)start: later, a
#: first start is an engine that `render --apply` added to a running stack.
BOOT_WINDOW_SECONDS = 60
#: Runs the `launch_order: healthy` wait (router/render/wait_healthy.py).
WAIT_MODULE = "router.render.wait_healthy"
#: The launch script's comment on its wait, by launch_order.
ORDER_WHY = {
    "delay": "wait launch_delay_seconds for each engine listed before this one, so they do "
             "not all load weights and allocate GPU memory at the same moment.",
    "healthy": "start once the engine before this one on each of its GPUs serves (or failed, "
               "or is past its start timeout), so no two profile GPU memory at the same moment.",
}
#: How long a program must stay up to count as started.
STARTSECS = 3
#: The same for an engine: short, so a restarted engine shows RUNNING about when it serves again. A
#: longer one buys nothing: an engine that cannot start (a bad flag, no memory) dies after its imports,
#: seconds later, so it is counted as started under either value and supervisord restarts it alike.
ENGINE_STARTSECS = 1
#: Beyond the router's own shutdown grace period, before supervisord kills it.
ROUTER_STOP_MARGIN_SECONDS = 10
#: Linux's limit for a unix socket path (sun_path), less its NUL.
MAX_SOCKET_PATH = 107
#: Inline comments start with whitespace then ';' or '#' in supervisord's parser.
INI_COMMENT = re.compile(r"\s[;#]")

#: The systemd unit's file, and the environment file it reads secrets from (HF_TOKEN=..., one per
#: line), in the user's home: the same file a shell sources before starting supervisord by hand.
UNIT_FILE = "kvrouter.service"
ENV_FILE = "~/.config/kvrouter.env"
#: Beyond the longest stopwaitsecs, before systemd kills what supervisord has not stopped.
UNIT_STOP_MARGIN_SECONDS = 30

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
    #: False for an engine started on demand: the router starts it on its first request.
    autostart: bool = True


@dataclass(frozen=True)
class Session:
    """One tmux session: what runs in it, and the log it follows under supervisord."""

    name: str
    argv: tuple[str, ...]
    log: str


#: Relative path -> (text, mode) of every generated file.
Files = Mapping[str, tuple[str, int]]


def session_name(cfg: Config, suffix: str) -> str:
    """The tmux session `suffix` gets: tmux itself turns '.' into '_' in session
    names, so the prefix is rendered the way tmux will show it."""
    return (cfg.tmux_session_prefix + suffix).replace(".", "_")


def session_names(cfg: Config) -> list[str]:
    """Every tmux session a rendering of `cfg` makes, engines first."""
    names = [session_name(cfg, i.name) for i in cfg.launched]
    if cfg.router.enable_router:
        names.append(session_name(cfg, ROUTER_SESSION_SUFFIX))
    return names


def started_copy(out: Path, program: str) -> Path:
    """Where a script-run program's script copies itself when it starts: what runs now,
    which ``render --apply`` compares with a new rendering."""
    return out / RUN_DIR / f"{program}.script"


def applied_marker(out: Path, program: str) -> Path:
    """Where ``render --apply`` writes supervisord's pid before it adds or restarts an engine:
    a start that finds it is not a boot, so it does not wait its launch_order turn."""
    return out / RUN_DIR / f"{program}.applied"


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


def unit_value(value: str) -> str:
    """`value` as a systemd unit setting reads it back: '%' starts a specifier there, and a
    line break would end the setting, so the one is doubled and the other refused."""
    if any(not c.isprintable() for c in value):
        raise RenderError(f"{value!r} cannot be written into {UNIT_FILE} (a control character); use a path without one")
    return value.replace("%", "%%")


def unit_text(value: str) -> str:
    """Free text of the unit (its Description, its comments): control characters shown escaped
    rather than refused, since nothing reads them back as a path."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value).replace("%", "%%")


def env_file(user: Optional[str] = None) -> str:
    """`ENV_FILE` in `user`'s home (default: whoever renders): systemd reads it before it drops to
    that user, and does not expand '~' itself."""
    return os.path.expanduser(ENV_FILE.replace("~", f"~{user}", 1) if user else ENV_FILE)


def unit_command(argv: Sequence[str]) -> str:
    """An ExecStart= line: each word double-quoted where it holds a space or a quote (systemd's
    own quoting, backslash escapes inside), every '%' and '$' (a variable there) doubled."""
    words = []
    for word in argv:
        text = unit_value(word).replace("$", "$$")
        if not text or any(c in text for c in " \t\"'\\;"):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        words.append(text)
    return " ".join(words)


def engine_argv(inst: Instance, sim: bool, python: str) -> tuple[str, ...]:
    """The engine command (an `engine: openai` instance's own command as given); under
    `sim` the simulated engine on the same host:port."""
    if sim:
        return tuple(sim_argv(python, inst))
    return tuple(inst.spec.launch_argv(inst))


def router_argv(cfg: Config, python: str, socket: Path) -> tuple[str, ...]:
    """The router reads the engines' process states from supervisord's `socket`."""
    return (python, "-m", "router.serve", "--config", cfg.path, "--supervisor-socket", str(socket))


def render_files(cfg: Config, out: Path, sim: bool = False, python: str = sys.executable,
                 user: Optional[str] = None) -> Files:
    """Every generated file's text, rendered in memory; nothing is written.

    `out` must be absolute: the files name each other by absolute path so
    they work from any working directory. The systemd unit runs as `user`
    (default: whoever renders).
    """
    user = user or getpass.getuser()
    if not out.is_absolute():
        raise RenderError(f"output folder {out} must be an absolute path")
    if "%" in str(out):
        # supervisord %-expands log file paths twice, so no escaping survives.
        raise RenderError(f"output folder {out} contains '%', which supervisord cannot use in log paths; choose another --out")
    socket = out / SOCKET_NAME
    if len(str(socket).encode()) > MAX_SOCKET_PATH:
        raise RenderError(f"supervisord's socket path {socket} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --out")
    logs = out / "logs"
    run = out / RUN_DIR
    env = _environment()
    files: dict[str, tuple[str, int]] = {}
    programs: list[Program] = []
    sessions: list[Session] = []
    waits = first_start_waits(cfg, python, socket)
    for inst in cfg.launched:
        script = out / "engines" / f"{inst.name}.sh"
        files[f"engines/{inst.name}.sh"] = (env.get_template("engine.sh.j2").render(
            inst=inst,
            argv=engine_argv(inst, sim, python),
            venv=None if sim else inst.venv_path,
            wait=waits.get(inst.name, ""),
            order=cfg.launch_order,
            why=ORDER_WHY[cfg.launch_order],
            boot_window=BOOT_WINDOW_SECONDS,
            sim=sim,
            script=str(script),
            run=str(run),
            copy=str(started_copy(out, inst.name)),
            marker=str(run / f"{inst.name}.launched"),
            applied=str(applied_marker(out, inst.name)),
            pidfile=str(out / "supervisord.pid"),
        ), SCRIPT_MODE)
        log = str(logs / f"{inst.name}.log")
        # startsecs counts from the spawn, wait included, and supervisord has one startsecs for
        # first starts and restarts alike: were the wait added to it, a restart (which does not
        # wait) would show STARTING that much longer while it already serves. So an engine
        # shows RUNNING during its first-start wait (its log says what it waits for); one that
        # dies right after the wait is restarted at once, without waiting, and a start that
        # keeps failing still ends FATAL.
        programs.append(Program(inst.name, (str(script),), log, ENGINE_STARTSECS, ENGINE_STOPWAITSECS,
                                autostart=not inst.on_demand))
        sessions.append(Session(session_name(cfg, inst.name), (str(script),), log))
    if cfg.router.enable_router:
        log = str(logs / f"{ROUTER_PROGRAM}.log")
        argv = router_argv(cfg, python, socket)
        grace = math.ceil(cfg.router.shutdown_grace_seconds) + ROUTER_STOP_MARGIN_SECONDS
        programs.append(Program(ROUTER_PROGRAM, argv, log, STARTSECS, grace, (("PYTHONUNBUFFERED", "1"),)))
        sessions.append(Session(session_name(cfg, ROUTER_SESSION_SUFFIX), argv, log))
    logs_script = out / "tmux-logs.sh"
    if sessions:
        programs.append(Program(LOGS_PROGRAM, (str(logs_script),), str(logs / f"{LOGS_PROGRAM}.log"), STARTSECS, 10))
    stack = {"sessions": sessions, "stack": str(out), "stack_option": STACK_OPTION}
    files["tmux-launch.sh"] = (env.get_template("tmux-launch.sh.j2").render(**stack), SCRIPT_MODE)
    files["tmux-logs.sh"] = (env.get_template("tmux-logs.sh.j2").render(
        **stack, script=str(logs_script), run=str(run), copy=str(started_copy(out, LOGS_PROGRAM)),
    ), SCRIPT_MODE)
    files["supervisord.conf"] = (env.get_template("supervisord.conf.j2").render(
        out=str(out), socket=str(socket), logs=str(logs), programs=programs,
    ), FILE_MODE)
    files[UNIT_FILE] = (env.get_template(f"{UNIT_FILE}.j2").render(
        config=unit_text(cfg.path), unit=unit_text(str(out / UNIT_FILE)), user=unit_value(user),
        out=unit_value(str(out)), env_file=unit_value(env_file(user)),
        exec_start=unit_command([python, "-m", "supervisor.supervisord", "--nodaemon", "-c", str(out / "supervisord.conf")]),
        stop_seconds=max(p.stopwaitsecs for p in programs) + UNIT_STOP_MARGIN_SECONDS if programs else UNIT_STOP_MARGIN_SECONDS,
    ), FILE_MODE)
    return files


def first_start_waits(cfg: Config, python: str, socket: Path) -> dict[str, str]:
    """Engine -> the shell command its first start runs before the engine (none: no wait).

    `delay`: engine number *i* started with supervisord sleeps *i* x launch_delay_seconds.
    `healthy`: it polls the health URLs of the engines before it on its GPUs (see
    `start_order`). The wait never fails the start: were the helper itself to fail, the
    engine starts at once.
    """
    at_start = [i for i in cfg.launched if not i.on_demand]
    if cfg.launch_order == "delay":
        delays = {inst.name: n * cfg.launch_delay_seconds for n, inst in enumerate(at_start)}
        return {name: f"sleep {_seconds(d)}" for name, d in delays.items() if d > 0}
    out: dict[str, str] = {}
    for name, turn in turns(cfg).items():
        if turn.after:
            urls = [f"{p.name}={p.url}{p.health_path}" for p in turn.after]
            argv = [python, "-m", WAIT_MODULE, "--timeout", _seconds(turn.timeout), "--socket", str(socket), *urls]
            out[name] = f"{shell_join(argv)} || true"
    return out


def _seconds(value: float) -> str:
    """Seconds for ``sleep``, without float noise (0.1 * 3 -> '0.3')."""
    return f"{value:.3f}".rstrip("0").rstrip(".")
