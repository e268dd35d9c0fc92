"""``render --apply``: bring a running stack to a new rendering without a restart of everything.

supervisord's own ``update`` sees only changes to a program's section; an
engine's command, arguments and environment live in its launch script, whose
path (the program's command) never changes. So the plan compares three
things: the program sections (old file vs new), the running programs
(supervisord), and for each script-run program, the script it was started
from (each script copies itself into ``run/<name>.script`` when it starts)
with its new text. Untouched programs keep running with the same pid.
The router is not restarted: it re-reads the YAML on ``POST /action/reload``.
"""
from __future__ import annotations

import configparser
import json
import shlex
import urllib.error
import urllib.request
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from router.config import Config, connect_host
from router.render.files import ROUTER_PROGRAM, Files, applied_marker, started_copy
from router.supervision.supervisord import SOCKET_NAME, connect

#: States in which a program is not running and was left so on purpose.
STOPPED_STATES = ("STOPPED",)
#: Why a program restarts.
PROGRAM_CHANGED = "its supervisord program changed"
SCRIPT_CHANGED = "its launch script changed"
#: What happens to an on-demand engine that is added or whose program changes.
ON_DEMAND_LEFT = "on demand: left stopped until its first request"
#: A router reload re-reads the YAML and probes nothing: it answers fast.
RELOAD_TIMEOUT_SECONDS = 30


class ApplyError(Exception):
    """The running stack could not be reached or refused a step (exit status 1)."""


@dataclass
class Plan:
    """What applying a rendering does to each program, by name."""

    start: list[str] = field(default_factory=list)
    #: name -> why it restarts
    restart: dict[str, str] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    #: Programs of the new rendering that supervisord does not start (``autostart=false``):
    #: engines the router starts on their first request. Adding one leaves it stopped.
    on_demand: set[str] = field(default_factory=set)

    def lines(self) -> list[str]:
        start = [n for n in self.start if n not in self.on_demand]
        add = [f"{n} ({ON_DEMAND_LEFT})" for n in self.start if n in self.on_demand]
        restart = [f"{n} ({why})" for n, why in self.restart.items()]
        rows = [("start", start), *([("add", add)] if add else []), ("restart", restart), ("stop", self.stop), ("keep", self.keep)]
        return [f"  {what + ':':9}{', '.join(names) if names else '-'}" for what, names in rows]


def programs(conf: str, source: str) -> dict[str, dict[str, str]]:
    """supervisord.conf text (from `source`) -> program name -> its settings, as written."""
    parser = configparser.RawConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(conf, source)
    except configparser.Error as e:
        raise ApplyError(f"cannot read {source}: {' '.join(str(e).split())}; render without --apply, then run supervisorctl update") from None
    return {s.split(":", 1)[1]: dict(parser.items(s)) for s in parser.sections() if s.startswith("program:")}


def script_of(settings: Mapping[str, str], out: Path) -> Optional[str]:
    """The rendered script (relative path) a program's command runs, if it runs one."""
    argv = shlex.split(settings.get("command", "").replace("%%", "%"))
    if len(argv) == 1 and Path(argv[0]).parent in (out, out / "engines"):
        return str(Path(argv[0]).relative_to(out))
    return None


def started_script(out: Path, name: str, old: Mapping[str, str], rel: str) -> Optional[str]:
    """The script program `name` was last started from: its own copy in run/, else
    the previous rendering's file (a stack started before scripts kept copies)."""
    try:
        return started_copy(out, name).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return old.get(rel)


def make_plan(out: Path, old: Mapping[str, str], new: Files, running: Mapping[str, str]) -> Plan:
    """The plan for `running` (name -> supervisord state) going from the `old` files to `new`."""
    before = programs(old.get("supervisord.conf", ""), str(out / "supervisord.conf"))
    after = programs(new["supervisord.conf"][0], "the new supervisord.conf")
    plan = Plan(stop=sorted(set(running) - set(after)),
                on_demand={n for n, settings in after.items() if settings.get("autostart") == "false"})
    for name, settings in after.items():
        rel = script_of(settings, out)
        if name not in running:
            plan.start.append(name)
        elif rel is not None and running[name] not in STOPPED_STATES and started_script(out, name, old, rel) != new[rel][0]:
            plan.restart[name] = SCRIPT_CHANGED
        elif before.get(name) != settings:
            plan.restart[name] = PROGRAM_CHANGED
        else:
            plan.keep.append(name)
    return plan


def supervisor(out: Path) -> Any:
    """The running supervisord of `out`'s stack, or ApplyError saying none runs."""
    socket = out / SOCKET_NAME
    proxy = connect(socket)
    try:
        proxy.supervisor.getState()
    except (OSError, xmlrpc.client.ProtocolError) as e:
        raise ApplyError(f"no supervisord is running for {out} (cannot connect to {socket}: {getattr(e, 'strerror', None) or e}); "
                         f"start it with: supervisord -c {shlex.quote(str(out / 'supervisord.conf'))}") from None
    return proxy


def running_programs(proxy: Any) -> dict[str, str]:
    return {p["name"]: p["statename"] for p in _call(proxy, "getAllProcessInfo")}


def apply(proxy: Any, out: Path, plan: Plan, say: Callable[[str], None]) -> set[str]:
    """Have supervisord load the new supervisord.conf (already written) and carry it
    out: stop everything that goes or changes first (freeing GPU memory), then
    add and start. supervisord's own diff decides the groups; `plan` adds the
    launch-script restarts. An on-demand engine (``autostart=false``) that is added
    or whose program changes is left stopped, and said so. Returns the programs (re)started.

    Each program it adds or restarts is marked as applied first (supervisord's pid in
    `applied_marker`), so its launch script does not wait its launch_order turn: that
    wait is for a node booting, not for one engine joining a stack that already runs."""
    added, changed, removed = _call(proxy, "reloadConfig")[0]
    scripts = [n for n, why in plan.restart.items() if why == SCRIPT_CHANGED and n not in added + changed]
    pid = str(_call(proxy, "getPID"))
    for name in added + changed + scripts:
        marker = applied_marker(out, name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(pid)
    for name in removed + changed + scripts:
        _call(proxy, "stopProcessGroup", name, True)
    for name in removed:
        _call(proxy, "removeProcessGroup", name)
        say(f"  stopped and removed {name}")
    for name in changed:
        _call(proxy, "removeProcessGroup", name)
        _call(proxy, "addProcessGroup", name)
        say(f"  reloaded {name} ({PROGRAM_CHANGED}; {ON_DEMAND_LEFT})" if name in plan.on_demand
            else f"  restarted {name} ({PROGRAM_CHANGED})")
    for name in added:
        _call(proxy, "addProcessGroup", name)
        say(f"  added {name} ({ON_DEMAND_LEFT})" if name in plan.on_demand else f"  started {name}")
    for name in scripts:
        _call(proxy, "startProcess", name, False)
        say(f"  restarted {name} ({SCRIPT_CHANGED})")
    if not removed + changed + added + scripts:
        say("  nothing to change")
    return {n for n in added + changed if n not in plan.on_demand} | set(scripts)


def _call(proxy: Any, method: str, *args: Any) -> Any:
    """supervisor.`method`(*args), its refusals and a lost connection as ApplyError."""
    try:
        return getattr(proxy.supervisor, method)(*args)
    except xmlrpc.client.Fault as e:
        raise ApplyError(f"supervisord refused {method}{args!r}: {e.faultString}") from None
    except (OSError, xmlrpc.client.ProtocolError) as e:
        raise ApplyError(f"lost supervisord while applying ({method}): {e}") from None


def router_step(cfg: Config, restarted: set[str], dry_run: bool) -> tuple[bool, str]:
    """The router's part of applying: (succeeded, what to print). A router that
    supervisord just (re)started reads the new YAML by itself."""
    if not cfg.router.enable_router:
        return True, "router: disabled in the config; nothing to reload"
    if ROUTER_PROGRAM in restarted:
        return True, "router: (re)started, so it reads the new config"
    if dry_run:
        return True, f"router: reload with POST {reload_url(cfg)}"
    return reload_router(cfg)


def reload_url(cfg: Config) -> str:
    host = connect_host(cfg.router.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.router.port}/action/reload"


def reload_router(cfg: Config) -> tuple[bool, str]:
    """POST /action/reload to the running router: (succeeded, what to print).

    A router that is not running is no failure: it reads the new YAML when it
    starts. Proxies from the environment are bypassed: the router is ours.
    """
    headers = {"Authorization": f"Bearer {cfg.router.admin_api_key}"} if cfg.router.admin_api_key else {}
    url = reload_url(cfg)
    request = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=RELOAD_TIMEOUT_SECONDS) as r:
            answer = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return False, f"router: reload failed ({e.code}): {_error_message(e.read())}"
    except (OSError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", e)
        return True, f"router: not reachable at {url} ({reason}); it reads the new config when it starts"
    except ValueError:
        return False, f"router: {url} answered something that is not JSON"
    if not isinstance(answer, dict) or not answer.get("changed"):
        return True, "router: reloaded, no model changed"
    models = answer.get("models") or {}
    parts = [f"{what} {', '.join(map(str, models[what]))}" for what in ("added", "removed", "changed") if models.get(what)]
    return True, f"router: reloaded; models {'; '.join(parts) or 'changed'}"


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body itself (one line, cut short)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return " ".join(body.decode(errors="replace").split())[:300] or "(empty answer)"
