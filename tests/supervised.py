"""A real supervisord running a rendered output folder, owned by one test.

It runs in the foreground (``-n``) in its own process group, or, with
``start(daemon_from=folder)``, daemonized from that folder with a relative
``-c`` as the README's Quick start does; either way with a private tmux server (``TMUX_TMPDIR``) so the rendered ``kvcached-*`` sessions never
meet another suite's or the user's. `close` always leaves nothing behind:
``supervisorctl shutdown``, then SIGKILL to every process it was seen to own.
With ``watch`` set, a background thread also records that tree every ``watch``
seconds, so a process that is orphaned between two explicit snapshots is
still found and killed.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
from helpers import render, wait_for

PY = sys.executable


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Supervised:
    def __init__(self, out: Path, tmux_dir: Path, *, ctl_timeout: float = 30, shutdown_timeout: float = 60,
                 watch: Optional[float] = None, python: str = PY):
        self.out = out
        #: The interpreter supervisord and supervisorctl run with (an installed wheel's venv, say).
        self.python = python
        self.conf = out / "supervisord.conf"
        tmux_dir.mkdir(exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        self.env["TMUX_TMPDIR"] = str(tmux_dir)
        #: Every process seen under supervisord (and the tmux server), by (pid, start time).
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.proc: Optional[subprocess.Popen] = None
        #: supervisord as psutil sees it, taken while it is surely ours (a pid reused later is not).
        self._root: Optional[psutil.Process] = None
        self.ctl_timeout = ctl_timeout
        self.shutdown_timeout = shutdown_timeout
        self._watch = watch
        self._watch_stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def start(self, daemon_from: Optional[Path] = None) -> None:
        if daemon_from is None:
            log = open(self.out / "supervisord.stdout", "wb")
            self.proc = subprocess.Popen([self.python, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self._root = psutil.Process(self.proc.pid)
        else:
            pidfile = self.out / "supervisord.pid"
            pidfile.unlink(missing_ok=True)
            subprocess.run([self.python, "-m", "supervisor.supervisord", "-c", os.path.relpath(self.conf, daemon_from)],
                           cwd=daemon_from, env=self.env, check=True, capture_output=True, timeout=30)
            pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, f"supervisord to write {pidfile}")
            self._root = psutil.Process(int(pid))
        if self._watch:
            self._watcher = threading.Thread(target=self._watch_tree, daemon=True)
            self._watcher.start()

    def _watch_tree(self) -> None:
        while not self._watch_stop.is_set():
            self.snapshot()
            self._watch_stop.wait(self._watch)

    def ctl(self, *args: str, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout or self.ctl_timeout)

    def tmux(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", *args], env=self.env, capture_output=True, text=True, timeout=10)

    def status(self) -> dict[str, str]:
        return {p[0]: p[1] for p in (ln.split() for ln in self.ctl("status").stdout.splitlines()) if len(p) >= 2}

    def pid(self, program: str) -> int:
        return int(self.ctl("pid", program).stdout.strip())

    def running(self) -> bool:
        """Whether supervisord (foreground or daemonized) is still up."""
        if self.proc is not None:
            return self.proc.poll() is None
        return self._root is not None and alive(self._root)

    def wait_running(self, programs: list[str], timeout: float = 30) -> None:
        def all_running() -> bool:
            assert self.running(), f"supervisord exited: {self.log('supervisord')}"
            states = self.status()
            bad = {p: s for p, s in states.items() if s in ("FATAL", "BACKOFF", "EXITED")}
            assert not bad, f"{bad}\n" + "\n".join(self.log(p) for p in bad)
            return sorted(states) == sorted(programs) and set(states.values()) == {"RUNNING"}
        wait_for(all_running, timeout, f"{programs} RUNNING (now {self.status()})", interval=0.3)

    def log(self, name: str, tail: int = 3000) -> str:
        """The last `tail` characters of program `name`'s log, under a line naming the file."""
        path = self.out / "logs" / f"{name}.log"
        return f"--- {path}\n" + (path.read_text(errors="replace")[-tail:] if path.exists() else "(none)")

    def tmux_server(self) -> Optional[int]:
        done = self.tmux("display-message", "-p", "#{pid}")
        return int(done.stdout) if done.returncode == 0 and done.stdout.strip() else None

    def snapshot(self) -> list[psutil.Process]:
        """Record and return supervisord, its descendants, and the tmux server with its children."""
        found: list[psutil.Process] = []
        for root in (self._root, self.tmux_server()):
            try:
                root = psutil.Process(root) if isinstance(root, int) else root
                if root is not None and alive(root):
                    found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for p in found:
            try:
                self.seen.setdefault((p.pid, p.create_time()), p)
            except psutil.NoSuchProcess:
                pass
        return found

    def shutdown(self, timeout: Optional[float] = None) -> float:
        """`supervisorctl shutdown` and wait until supervisord has exited; the seconds that took."""
        assert self._root is not None
        timeout = timeout or self.shutdown_timeout
        self.snapshot()
        t0 = time.monotonic()
        self.ctl("shutdown", timeout=timeout)
        if self.proc is not None:
            self.proc.wait(timeout)
        else:
            wait_for(lambda: not alive(self._root), timeout, "the daemonized supervisord to exit")
        return time.monotonic() - t0

    def close(self) -> None:
        """Whatever state the test left: stop supervisord, then kill anything it owned."""
        if self.running():
            try:
                self.shutdown()
            except (subprocess.TimeoutExpired, AssertionError, OSError):
                assert self._root is not None
                os.killpg(self._root.pid, signal.SIGKILL)  # its own group: -n runs in a new session, a daemon calls setsid
                if self.proc is not None:
                    self.proc.wait(10)
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        leftovers = [p for p in list(self.seen.values()) if alive(p)]
        for p in leftovers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        self.tmux("kill-server")


@contextlib.contextmanager
def sim_stack(doc: dict[str, Any], *, prefix: str = "kvr", start: bool = True,
              before_start: Optional[Callable[[Path], None]] = None, **supervised: Any) -> Iterator[Supervised]:
    """The one builder of the supervised test stacks: `doc` rendered with ``--sim`` by the real CLI
    into a short temporary folder (unix socket paths must stay under 108 bytes), then run by a real
    supervisord with a private tmux server. `before_start` may edit the output folder first (e.g.
    `give_up_sooner`). On exit, whatever the test did, nothing of the stack is left: no process, no file."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        out = render(tmp, doc, "--sim")
        if before_start is not None:
            before_start(out)
        stack = Supervised(out, tmp / "tmux", **supervised)
        try:
            if start:
                stack.start()
            yield stack
        finally:
            stack.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def give_up_sooner(out: Path, retries: int = 1) -> None:
    """Let supervisord give up on a program that cannot start after `retries` retries (FATAL in about
    2 s) rather than the rendered count, whose back-off takes 15 s: the tests are about what the router
    and the tools make of FATAL, not about supervisord's patience."""
    conf = out / "supervisord.conf"
    text, n = re.subn(r"(?m)^startretries=\d+$", f"startretries={retries}", conf.read_text())
    assert n, f"no startretries in {conf}"
    conf.write_text(text)


def render_cli(config: Path, out: Path | str, *flags: str, cwd: Optional[Path] = None,
               env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m router.render --config config --out out *flags`` as a user runs it, from `cwd`
    (a relative `out` is relative to it) and with `env` (e.g. a stack's private TMUX_TMPDIR)."""
    return subprocess.run([PY, "-m", "router.render", "--config", str(config), "--out", str(out), *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
