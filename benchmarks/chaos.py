"""Chaos soak: a supervised ``--sim`` stack under steady load while faults are injected at random.

Run from the project root: ``python benchmarks/chaos.py --minutes M [--seed S] [--json FILE]``.

It renders and starts (under a real supervisord) a stack with a model on two
replicas, a model that is slept and woken by hand, one the sleep manager
puts to sleep whenever it is idle for 2 s, and an on-demand model (stopped
until asked, 1 s to load, stopped again after 4 s idle). A few asyncio
clients send streamed and whole, chat and completion requests to all of them
over loopback, and every answer that completes is compared word for word with
the simulator's deterministic text (``router.sim.textgen``). Every few seconds
one fault is drawn: SIGKILL an engine, SIGKILL or SIGTERM the router
(supervisord restarts both), a manual sleep or wake, a reload of an edited
YAML, ``render --apply`` of an edited YAML, starting or stopping the
on-demand model. The injector waits until the stack is healthy again before
the next draw, so each fault has one window: from its injection until the
process it hit is back and the router reports it healthy, plus a margin.

Why windows: the router promises that a kill costs only the requests it can
reach (those in flight at the kill, those sent into an engine before the
router notices it is gone, those refused while the router itself is down) and
that sleep, wake, reload, apply, start and stop cost nothing. So a failure is
tolerated only inside the window of a kill that could have caused it, and is
classified by what it was; anything else, any corrupted answer, or the
router's descriptors growing across the life of one router process fails the
run (exit status 1). The router's RSS and descriptors are sampled throughout,
per router process (its pid from supervisord, which changes after each kill).

With ``--workers N`` one answer needs its own rule: a proxy worker's 503 "the
router's controller went away". A worker gives it to the requests waiting on
its controller (for a slot, a start, a wake, an answer) when its link to the
controller closes, and only then; the worker then stops. Since the link closes
when the controller's process ends, it is the answer to a request in flight at
a SIGKILL of the router (class "in flight at a kill"; or "refused ... while the
router was down" for one that reached the worker after the kill, before the
worker saw it). It is counted so only when it came within
CONTROLLER_GONE_WITHIN seconds of a SIGKILL of the router: the dying worker
answers at once and is gone after its shutdown grace, so a later one, one in a
SIGTERM's window (a graceful stop keeps the controller until its workers have
drained), in an engine kill's window or outside every window means the link
broke with the controller alive (a protocol error, a crash) and fails the run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any, Awaitable, Iterator, Optional

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chaos_stack import ENGINES, FAULT_KINDS, HOMES, ON_DEMAND, RECOVERY_TIMEOUT, SLEEPABLE, Stack  # noqa: E402
from chaos_verdict import Fault, Report, Request, RouterWatch, table, verdict  # noqa: E402
from helpers import Streamed, post_json, stream_request  # noqa: E402
from supervised import render_cli, wait_for  # noqa: E402

from router.sim import textgen  # noqa: E402

# --------------------------------------------------------------------------
# Load


def expected_text(body: dict[str, Any]) -> str:
    prompt = textgen.chat_prompt(body["messages"]) if "messages" in body else body["prompt"]
    return textgen.generate(prompt, body["max_tokens"])


def answer_text(r: Streamed, chat: bool) -> str:
    """The text of a whole (non-streamed) answer."""
    choice = json.loads(r.body)["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def judge(r: Streamed, body: dict[str, Any]) -> tuple[bool, str, str]:
    """(ok, what, detail) of one finished request against the simulator's text."""
    if r.failure is not None:
        return False, r.failure, ""
    if r.status != 200:
        return False, str(r.status), r.body[:300].decode(errors="replace")
    chat = "messages" in body
    if body["stream"]:
        error = r.error_event()
        if error is not None:
            return False, f"stream_error {error.get('code')}", str(error.get("message"))[:300]
        if not r.done:
            return False, "truncated", f"{len(r.events)} events"
        try:
            text = r.text()
        except (ValueError, KeyError) as e:
            return False, "corrupt", f"bad chunk: {e}"
    else:
        try:
            text = answer_text(r, chat)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return False, "corrupt", f"bad body: {e}: {r.body[:200]!r}"
    want = expected_text(body)
    if text != want:
        return False, "corrupt", f"got {text!r}, want {want!r}"
    return True, "ok", ""


async def client(i: int, url: str, seed: int, stop: asyncio.Event, log: list[Request]) -> None:
    """One client: requests to its home model, one at a time, with its model's pauses between them."""
    rng = random.Random(seed * 1000 + i)
    model, pause_lo, pause_hi = HOMES[i % len(HOMES)]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        n = 0
        while not stop.is_set():
            n += 1
            stream, chat = rng.random() < 0.5, rng.random() < 0.5
            prompt = f"chaos {seed} {i} {n} {rng.choice(textgen.WORDS)}"
            body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(2, 16), "stream": stream}
            body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            path = "/v1/chat/completions" if chat else "/v1/completions"
            start = time.monotonic()
            r = await stream_request(http, url + path, body)
            good, what, detail = judge(r, body)
            log.append(Request(i, model, stream, chat, start, r.ended, good, what, r.status != 0, detail))
            # A refused connection comes back at once: pause a little even for the busy models.
            await asyncio.sleep(rng.uniform(pause_lo, pause_hi) if good else max(0.1, pause_lo))


# --------------------------------------------------------------------------
# Faults


def engines_of(model: str) -> list[str]:
    """The instances serving `model`; every instance for a fault that names no model (reload, apply)."""
    return [n for n, (m, _, _) in ENGINES.items() if m == model] or list(ENGINES)


class Injector:
    """Draws and injects one fault at a time and waits for the stack to be healthy again."""

    def __init__(self, stack: Stack, seed: int, kinds: tuple[str, ...]):
        self.stack = stack
        #: Draws the kinds and the pauses: the same seed gives the same sequence of faults.
        self.rng = random.Random(seed)
        #: Draws the targets, apart, since how many engines run at a kill depends on timing.
        self.targets = random.Random(seed + 1)
        self.kinds = kinds
        self.faults: list[Fault] = []

    async def run(self, stop: asyncio.Event, interval: tuple[float, float]) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*interval))
            if stop.is_set():
                return
            await self.inject(self.rng.choice(self.kinds))

    async def inject(self, kind: str) -> None:
        fault = Fault(kind, "", time.monotonic())
        self.faults.append(fault)
        try:
            engines = await getattr(self, kind)(fault)
        except Exception as e:  # noqa: BLE001 - whatever went wrong is the finding, reported with the fault
            fault.problem = f"{type(e).__name__}: {e}"
            engines = None
        try:
            await asyncio.to_thread(wait_for, lambda: self.stack.healthy(engines), RECOVERY_TIMEOUT,
                                    f"the stack healthy after {kind} {fault.target}", 0.2)
            fault.recovered = time.monotonic()
        except AssertionError as e:
            fault.problem = f"{fault.problem or e}; {await asyncio.to_thread(self.router_condition)}"

    def router_condition(self) -> str:
        """What the router is doing when the stack does not recover: a router busy at full CPU that answers
        nothing is stuck in a loop that never yields, an idle one is waiting on something."""
        try:
            proc = psutil.Process(self.stack.process("router")["pid"])
            cpu = proc.cpu_percent(1.0)
        except (OSError, psutil.Error) as e:
            return f"router process unknown ({e})"
        try:
            urllib.request.urlopen(f"{self.stack.url}/health", timeout=3).close()
            answers = "answers GET /health"
        except OSError as e:
            answers = f"GET /health fails ({e})"
        return f"router pid {proc.pid} at {cpu:.0f}% CPU, {answers}"

    async def _program_pid(self, program: str) -> int:
        return (await asyncio.to_thread(self.stack.process, program))["pid"]

    async def _respawned(self, program: str, old: int) -> None:
        def back() -> bool:
            info = self.stack.process(program)
            return info["statename"] == "STOPPED" or (info["statename"] == "RUNNING" and info["pid"] not in (0, old))
        await asyncio.to_thread(wait_for, back, RECOVERY_TIMEOUT, f"{program} restarted by supervisord", 0.1)

    async def engine_kill(self, fault: Fault) -> list[str]:
        running = [n for n in ENGINES if (await asyncio.to_thread(self.stack.process, n))["statename"] == "RUNNING"]
        fault.target = self.targets.choice(running)
        pid = await self._program_pid(fault.target)
        fault.injected = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        fault.outcome = f"pid {pid}"
        await self._respawned(fault.target, pid)
        return [fault.target]

    async def _router_signal(self, fault: Fault, sig: signal.Signals) -> None:
        fault.target = "router"
        pid = await self._program_pid("router")
        fault.injected = time.monotonic()
        os.kill(pid, sig)
        fault.outcome = f"pid {pid}"
        await self._respawned("router", pid)

    async def router_kill(self, fault: Fault) -> None:
        await self._router_signal(fault, signal.SIGKILL)

    async def router_term(self, fault: Fault) -> None:
        await self._router_signal(fault, signal.SIGTERM)

    async def _admin(self, fault: Fault, path: str) -> list[str]:
        status, answer = await asyncio.to_thread(post_json, self.stack.url + path, {})
        said = answer.get("message") or answer.get("error", {}).get("message") or json.dumps(answer.get("models"))
        fault.outcome = f"{status} {said}"[:200]
        if status >= 500 and status != 502:  # 502 is an engine's refusal, which a kill may cause
            fault.problem = f"POST {path}: {fault.outcome}"
        return engines_of(fault.target)

    async def sleep(self, fault: Fault) -> list[str]:
        fault.target = self.targets.choice(SLEEPABLE)
        return await self._admin(fault, f"/action/sleep/{fault.target}")

    async def wake(self, fault: Fault) -> list[str]:
        fault.target = self.targets.choice(SLEEPABLE)
        return await self._admin(fault, f"/action/wakeup/{fault.target}")

    async def start(self, fault: Fault) -> list[str]:
        fault.target = ON_DEMAND
        return await self._admin(fault, f"/action/start/{ON_DEMAND}")

    async def stop(self, fault: Fault) -> list[str]:
        fault.target = ON_DEMAND
        return await self._admin(fault, f"/action/stop/{ON_DEMAND}")

    async def reload(self, fault: Fault) -> list[str]:
        self.stack.edit()
        fault.target = f"variant {self.stack.variant}"
        return await self._admin(fault, "/action/reload")

    async def apply(self, fault: Fault) -> None:
        self.stack.edit()
        fault.target = f"variant {self.stack.variant}"
        done = await asyncio.to_thread(render_cli, self.stack.config, self.stack.out, "--sim", "--apply",
                                       env=self.stack.sup.env)
        fault.outcome = f"exit {done.returncode}"
        if done.returncode != 0:
            fault.problem = f"render --apply exit {done.returncode}: {(done.stderr or done.stdout)[-400:]}"


# --------------------------------------------------------------------------
# Main


@contextlib.contextmanager
def running_stack(keep: bool, workers: int = 1) -> Iterator[Stack]:
    tmp = Path(tempfile.mkdtemp(prefix="kvrchaos", dir="/tmp"))  # short: unix socket paths
    stack = Stack(tmp, workers)
    try:
        stack.start()
        yield stack
    finally:
        stack.sup.close()
        if keep:
            print(f"logs kept in {stack.out / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def soak(stack: Stack, seconds: float, seed: int, clients: int, interval: tuple[float, float],
               kinds: tuple[str, ...], margin: float, fd_bound: int) -> Report:
    stop_load, stop_faults, stop_watch = asyncio.Event(), asyncio.Event(), asyncio.Event()
    log: list[Request] = []
    injector = Injector(stack, seed, kinds)
    watch = RouterWatch(stack)
    started = time.monotonic()
    tasks: list[Awaitable[None]] = [asyncio.ensure_future(client(i, stack.url, seed, stop_load, log))
                                    for i in range(clients)]
    watching = asyncio.ensure_future(watch.run(stop_watch))
    faulting = asyncio.ensure_future(injector.run(stop_faults, interval))
    await asyncio.sleep(seconds)
    stop_faults.set()
    await faulting  # the last fault recovered, so the clients end on a healthy stack
    stop_load.set()
    await asyncio.gather(*tasks)
    run_end = watch.load_end = time.monotonic()
    await asyncio.sleep(2.0)  # quiet: the final descriptor sample sees no request in flight
    watch.sample()
    stop_watch.set()
    await watching
    return verdict(log, injector.faults, watch, margin, fd_bound, started, run_end)


def parse_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long the load and the faults run")
    p.add_argument("--seed", type=int, default=0, help="seeds the faults drawn and the clients' requests")
    p.add_argument("--json", type=Path, default=None, help="write the report (every fault and failure) here")
    p.add_argument("--clients", type=int, default=6, help="concurrent clients, one request in flight each")
    p.add_argument("--interval", type=parse_range, default=(2.0, 5.0), help="seconds between faults: LO:HI")
    p.add_argument("--faults", default=",".join(FAULT_KINDS), help="the kinds to draw from, comma-separated")
    p.add_argument("--margin", type=float, default=1.0, help="seconds a fault's window lasts past its recovery")
    p.add_argument("--fd-bound", type=int, default=16, help="most descriptors a router process may gain")
    p.add_argument("--keep-logs", action="store_true", help="keep the stack's folder and logs")
    p.add_argument("--workers", type=int, default=1,
                   help="router.workers: above 1, the router is a controller and that many proxy workers")
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    if not kinds or set(kinds) - set(FAULT_KINDS):
        p.error(f"--faults: choose from {', '.join(FAULT_KINDS)}")
    if args.workers < 1:
        p.error("--workers: 1 (one process) or more (a controller and that many proxy workers)")
    with running_stack(args.keep_logs, args.workers) as stack:
        rep = asyncio.run(soak(stack, args.minutes * 60, args.seed, args.clients, args.interval, kinds,
                               args.margin, args.fd_bound))
    print(table(rep))
    if args.json:
        args.json.write_text(json.dumps(asdict(rep), indent=1))
    return 1 if rep.problems else 0


if __name__ == "__main__":
    sys.exit(main())
