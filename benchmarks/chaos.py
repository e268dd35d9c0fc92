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
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Iterator, Optional

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import Streamed, distinct_ports, post_json, render, stream_request  # noqa: E402
from supervised import Supervised, render_cli, wait_for  # noqa: E402

from router.sim import textgen  # noqa: E402
from router.supervision.supervisord import connect  # noqa: E402

#: Instance name -> (model, simulator flags, more instance keys).
ENGINES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rep1": ("m/rep", "--ttft-ms 5 --itl-ms 10", {}),
    "rep2": ("m/rep", "--ttft-ms 5 --itl-ms 10", {}),
    "solo": ("m/solo", "--ttft-ms 5 --itl-ms 10", {}),
    "nap": ("m/nap", "--ttft-ms 5 --itl-ms 10", {}),
    "od": ("m/od", "--startup-s 1 --ttft-ms 5 --itl-ms 10", {"on_demand": True, "idle_stop_seconds": 4}),
}
#: Each client's model, in turn (client i takes HOMES[i % len]), and its pause range between requests:
#: the busy models are never idle, `m/nap` and `m/od` are idle long enough to be slept or stopped.
HOMES: tuple[tuple[str, float, float], ...] = (
    ("m/rep", 0.01, 0.1), ("m/solo", 0.01, 0.1), ("m/nap", 0.5, 5.0), ("m/rep", 0.01, 0.1),
    ("m/od", 0.5, 7.0), ("m/solo", 0.01, 0.1), ("m/rep", 0.01, 0.1), ("m/nap", 0.5, 5.0),
)
#: Faults and the models a manual action may name.
KILLS = ("engine_kill", "router_kill", "router_term")
FAULT_KINDS = (*KILLS, "sleep", "wake", "reload", "apply", "start", "stop")
SLEEPABLE = ("m/rep", "m/solo", "m/nap")
ON_DEMAND = "m/od"
#: How long the stack may take to be healthy again after a fault before the run fails.
RECOVERY_TIMEOUT = 40.0
#: Shortest life of a router process whose descriptors are compared (start vs end), and the span of each end.
FD_MIN_LIFE = 12.0
FD_SPAN = 3.0
#: Seconds after a router process starts before its samples count (its pools fill first).
FD_WARMUP = 3.0

#: What a proxy worker answers (503) to a request that was waiting on its controller when the controller died.
CONTROLLER_GONE = "the router's controller went away"
#: The router's shutdown_grace_seconds in this stack (stack_config).
SHUTDOWN_GRACE = 5
#: Latest a CONTROLLER_GONE answer may come after a SIGKILL of the router and still be the kill's: a worker
#: answers so when it reads the end of its controller's link, then stops within its shutdown grace.
CONTROLLER_GONE_WITHIN = SHUTDOWN_GRACE + 1.0
CLASS_KILL = "in flight at a kill"
CLASS_DOWN = "refused/connection error while the router was down"
CLASS_OTHER = "other"
CLASS_CORRUPT = "corrupted answer"


# --------------------------------------------------------------------------
# The stack


def stack_config(router_port: int, ports: dict[str, int], variant: int = 0, workers: int = 1) -> dict[str, Any]:
    """The YAML (as JSON) of the stack; `variant` is what reload and apply edit: an alias and a
    replica's max_concurrency (which replaces that replica with a fresh one). `workers` > 1 runs the
    router as a controller and that many proxy workers."""
    instances = []
    for name, (model, sim, keys) in ENGINES.items():
        inst: dict[str, Any] = {"name": name, "model": model, "engine": "vllm", "sim_args": [sim], **keys,
                                "engine_args": [f"--port={ports[name]}", "--enable-sleep-mode",
                                                "--gpu-memory-utilization 0.15"],
                                "engine_env": ["VLLM_SERVER_DEV_MODE=1"]}
        if name == "solo":
            inst["aliases"] = [f"solo-v{variant}"]
        if name == "rep1" and variant % 2:
            inst["max_concurrency"] = 16
        instances.append(inst)
    return {
        "router": {"router_port": router_port, "health_check_interval_seconds": 0.5, "eject_seconds": 1,
                   "connect_timeout_seconds": 2, "request_timeout_seconds": 30, "stream_idle_timeout_seconds": 10,
                   "shutdown_grace_seconds": SHUTDOWN_GRACE, "workers": workers},
        "sleep_manager": {"auto_sleep_enabled": True, "idle_threshold_seconds": 2, "check_interval_seconds": 0.5,
                          "min_sleep_duration": 3, "wake_timeout_seconds": 20, "drain_timeout_seconds": 10},
        "instances": instances,
    }


class Stack:
    """The rendered stack under supervisord, and what the soak asks of it."""

    def __init__(self, tmp: Path, workers: int = 1):
        self.tmp = tmp
        self.workers = workers
        self.router_port, *engine_ports = distinct_ports(1 + len(ENGINES))
        self.ports = dict(zip(ENGINES, engine_ports))
        self.url = f"http://127.0.0.1:{self.router_port}"
        self.variant = 0
        self.out = render(tmp, stack_config(self.router_port, self.ports, workers=workers), "--sim")
        self.config = tmp / "config.yaml"
        self.sup = Supervised(self.out, tmp / "tmux", watch=2.0)

    def rpc(self) -> Any:
        return connect(self.out / "supervisor.sock").supervisor

    def process(self, program: str) -> dict[str, Any]:
        """supervisord's getProcessInfo of `program` (state, pid...)."""
        return self.rpc().getProcessInfo(program)

    def start(self) -> None:
        self.sup.start()
        wait_for(lambda: self._running("router"), 60, "the router RUNNING")
        wait_for(self.healthy, 60, "every engine healthy through the router")

    def _running(self, program: str) -> bool:
        with contextlib.suppress(OSError):
            return self.process(program)["statename"] == "RUNNING"
        return False

    def gauges(self) -> Optional[dict[tuple[str, str], float]]:
        """The router's model-state and backend gauges from one parse of /metrics: (sample, key) -> value,
        the key being `model:state` or the instance name; None when the router does not answer."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=3) as r:
                text = r.read().decode()
        except OSError:
            return None
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "router_model_state":
                    out[(sample.name, f"{sample.labels['model']}:{sample.labels['state']}")] = sample.value
                elif sample.name in ("router_backend_healthy", "router_backend_ejected"):
                    out[(sample.name, sample.labels["instance"])] = sample.value
        return out

    def healthy(self, engines: Optional[list[str]] = None) -> bool:
        """The router answers and reports every running engine (of `engines`) healthy or its model not awake.

        Read from /metrics, which changes nothing (GET /health/{model} would probe and so speed recovery up)."""
        gauges = self.gauges()
        if gauges is None:
            return False
        for name in engines or list(ENGINES):
            try:
                info = self.process(name)
            except OSError:
                return False
            if info["statename"] == "STOPPED" or not gauges.get(("router_model_state", f"{ENGINES[name][0]}:awake")):
                continue  # asleep, stopped or between states: nothing to serve from, nothing to be healthy
            if info["statename"] != "RUNNING" or gauges.get(("router_backend_healthy", name)) != 1 \
                    or gauges.get(("router_backend_ejected", name)):
                return False
        return True

    def edit(self) -> None:
        """Write the next variant of the YAML (an alias and a replica's max_concurrency change)."""
        self.variant += 1
        self.config.write_text(json.dumps(stack_config(self.router_port, self.ports, self.variant, self.workers)))


# --------------------------------------------------------------------------
# Records


@dataclass
class Request:
    client: int
    model: str
    stream: bool
    chat: bool
    start: float
    end: float
    ok: bool
    what: str  # "ok", a status, "stream_error <code>", "truncated", a connection error's name, "corrupt"
    got_status: bool  # an HTTP status arrived (so the router was up and answering)
    detail: str = ""
    klass: str = ""
    faults: str = ""  # for a failure no kill explains: the faults whose windows it overlaps


@dataclass
class Fault:
    kind: str
    target: str
    injected: float
    recovered: Optional[float] = None
    outcome: str = ""
    problem: str = ""  # the fault itself went wrong (not recovered, an internal error)
    failures: int = 0  # the failed requests it explains

    def window_end(self, margin: float, run_end: float) -> float:
        return (self.recovered if self.recovered is not None else run_end) + margin


@dataclass
class Sample:
    t: float
    rss: int
    fds: int


@dataclass
class RouterLife:
    pid: int
    created: float
    samples: list[Sample] = field(default_factory=list)


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
# The router's resources


class RouterWatch:
    """Samples the router's RSS and open descriptors, per router process (its pid from supervisord)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.lives: dict[tuple[int, float], RouterLife] = {}
        #: When the load stopped: descriptors are compared under load only (the quiet end has fewer sockets).
        self.load_end = float("inf")

    def sample(self) -> None:
        try:
            info = self.stack.process("router")
            if info["statename"] != "RUNNING":
                return
            proc = psutil.Process(info["pid"])
            created = proc.create_time()
            # With proxy workers, the controller and its workers together (they end with it), and only
            # once every worker is up: a worker spawned late on a loaded machine would look like growth.
            tree = [proc, *proc.children(recursive=True)]
            workers = sum("spawn_main" in " ".join(p.cmdline()) for p in tree)
            if self.stack.workers > 1 and workers < self.stack.workers:
                return
            s = Sample(time.monotonic(), sum(p.memory_info().rss for p in tree), sum(p.num_fds() for p in tree))
        except (OSError, psutil.Error):
            return  # between a kill and the restart
        self.lives.setdefault((proc.pid, created), RouterLife(proc.pid, created)).samples.append(s)

    async def run(self, stop: asyncio.Event, every: float = 0.5) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    def fd_growth(self) -> list[tuple[int, int, int]]:
        """(pid, descriptors early, descriptors late) of each router process that lived long enough.

        Each end is the median over FD_SPAN seconds (after FD_WARMUP): under load the count moves with the
        connections in flight, a leak moves it one way for good."""
        out = []
        for life in self.lives.values():
            if not life.samples:
                continue
            first = life.samples[0].t
            settled = [s for s in life.samples if first + FD_WARMUP <= s.t <= self.load_end]
            if not settled or settled[-1].t - settled[0].t < FD_MIN_LIFE:
                continue
            early = [s.fds for s in settled if s.t <= settled[0].t + FD_SPAN]
            late = [s.fds for s in settled if s.t >= settled[-1].t - FD_SPAN]
            out.append((life.pid, int(statistics.median(early)), int(statistics.median(late))))
        return out

    def final(self) -> Optional[RouterLife]:
        return max(self.lives.values(), key=lambda life: life.created, default=None)


# --------------------------------------------------------------------------
# Verdict


def overlaps(r: Request, f: Fault, margin: float, run_end: float) -> bool:
    return r.end >= f.injected and r.start <= f.window_end(margin, run_end)


def classify(r: Request, faults: list[Fault], margin: float, run_end: float) -> tuple[str, Optional[Fault]]:
    """Which failure class `r` is in, and the kill that explains it (None for CLASS_OTHER and CLASS_CORRUPT)."""
    if r.what == "corrupt":
        return CLASS_CORRUPT, None
    if r.what == "503" and CONTROLLER_GONE in r.detail:
        return controller_gone(r, faults)
    for f in faults:
        if f.kind not in KILLS or not overlaps(r, f, margin, run_end):
            continue
        if f.kind == "engine_kill":
            if ENGINES[f.target][0] == r.model and r.got_status:
                return CLASS_KILL, f  # the router answered: the engine it was sent to died under it
            continue
        if r.got_status and r.what.isdigit():
            continue  # a router that answers with an HTTP error is no gap of the router's
        if f.kind == "router_kill" and r.start <= f.injected:
            return CLASS_KILL, f
        if r.start > f.injected or (not r.got_status and r.end - f.injected < 1.0):
            # Sent while it was down, or (SIGTERM) a request racing the close of an idle keep-alive connection.
            return CLASS_DOWN, f
    return CLASS_OTHER, None


def controller_gone(r: Request, faults: list[Fault]) -> tuple[str, Optional[Fault]]:
    """A proxy worker's 503 for its lost controller (module docstring): the request was waiting on the
    controller a SIGKILL of the router ended (in flight at the kill), or reached the worker after the kill
    and before the worker read the end of the link (the router was down); anything else is unexplained."""
    for f in faults:
        if f.kind == "router_kill" and f.injected <= r.end <= f.injected + CONTROLLER_GONE_WITHIN:
            return (CLASS_KILL if r.start <= f.injected else CLASS_DOWN), f
    return CLASS_OTHER, None


@dataclass
class Report:
    seconds: float
    requests: int
    ok: int
    streamed: int
    failures: dict[str, int]
    failures_by_what: dict[str, dict[str, int]]
    faults: dict[str, int]
    fault_list: list[dict[str, Any]]
    router_processes: int
    final_router: dict[str, Any]
    peak_rss_mb: float
    peak_fds: int
    fd_growth: list[tuple[int, int, int]]
    unexplained: list[dict[str, Any]]
    problems: list[str]
    #: seconds from the SIGKILL of the router to each CONTROLLER_GONE answer it explains (workers only)
    controller_gone_after: list[float] = field(default_factory=list)


def verdict(log: list[Request], faults: list[Fault], watch: RouterWatch, margin: float, fd_bound: int,
            started: float, run_end: float) -> Report:
    by_class: Counter[str] = Counter()
    by_what: dict[str, Counter[str]] = {}
    gone_after: list[float] = []
    for r in log:
        if r.ok:
            continue
        r.klass, cause = classify(r, faults, margin, run_end)
        if cause is not None:
            cause.failures += 1
            if CONTROLLER_GONE in r.detail:
                gone_after.append(round(r.end - cause.injected, 3))
        else:  # what was going on, for whoever reads the report
            r.faults = ", ".join(f"{f.kind} {f.target} +{f.injected - started:.1f}s" for f in faults
                                 if overlaps(r, f, margin, run_end))
        by_class[r.klass] += 1
        by_what.setdefault(r.klass, Counter())[r.what] += 1
    bad = [r for r in log if r.klass in (CLASS_OTHER, CLASS_CORRUPT)]
    problems = [f"{len(bad)} failures outside the windows of their faults or corrupted"] if bad else []
    problems += [f"{f.kind} {f.target}: {f.problem}" for f in faults if f.problem]
    growth = watch.fd_growth()
    problems += [f"router pid {pid}: descriptors {a} -> {b} (more than +{fd_bound})" for pid, a, b in growth
                 if b - a > fd_bound]
    if not any(r.ok for r in log):
        problems.append("no request succeeded")
    final = watch.final()
    samples = [s for life in watch.lives.values() for s in life.samples]
    first, last = (final.samples[0], final.samples[-1]) if final and final.samples else (None, None)
    return Report(
        seconds=round(run_end - started, 1), requests=len(log), ok=sum(r.ok for r in log),
        streamed=sum(r.stream for r in log), failures=dict(by_class),
        failures_by_what={k: dict(v) for k, v in by_what.items()},
        faults=dict(Counter(f.kind for f in faults)),
        fault_list=[{**asdict(f), "injected": round(f.injected - started, 2),
                     "recovered": None if f.recovered is None else round(f.recovered - started, 2)} for f in faults],
        router_processes=len(watch.lives),
        final_router={"pid": final.pid if final else None,
                      "rss_mb": [round(s.rss / 2**20, 1) for s in (first, last) if s],
                      "fds": [s.fds for s in (first, last) if s]},
        peak_rss_mb=round(max((s.rss for s in samples), default=0) / 2**20, 1),
        peak_fds=max((s.fds for s in samples), default=0), fd_growth=growth,
        unexplained=[{**asdict(r), "start": round(r.start - started, 2), "end": round(r.end - started, 2)}
                     for r in bad[:50]],
        problems=problems, controller_gone_after=sorted(gone_after))


def table(rep: Report) -> str:
    rows: list[tuple[str, object]] = [
        ("seconds of load", rep.seconds), ("requests", rep.requests), ("  succeeded (answer checked)", rep.ok),
        ("  streamed", rep.streamed)]
    for klass in (CLASS_KILL, CLASS_DOWN, CLASS_OTHER, CLASS_CORRUPT):
        whats = ", ".join(f"{w} {n}" for w, n in sorted(rep.failures_by_what.get(klass, {}).items()))
        rows.append((f"failed: {klass}", f"{rep.failures.get(klass, 0)}" + (f"  ({whats})" if whats else "")))
    rows.append(("faults injected", sum(rep.faults.values())))
    rows += [(f"  {kind}", n) for kind, n in sorted(rep.faults.items())]
    rows += [("router processes seen", rep.router_processes),
             ("final router RSS MB start -> end", " -> ".join(map(str, rep.final_router["rss_mb"]))),
             ("final router descriptors start -> end", " -> ".join(map(str, rep.final_router["fds"]))),
             ("peak router RSS MB / descriptors", f"{rep.peak_rss_mb} / {rep.peak_fds}"),
             ("controller-gone 503s explained / latest after its kill",
              f"{len(rep.controller_gone_after)} / "
              f"{max(rep.controller_gone_after, default=0):.2f}s (at most {CONTROLLER_GONE_WITHIN:g}s)"),
             ("descriptors early -> late per process", ", ".join(f"{a}->{b}" for _, a, b in rep.fd_growth) or "-"),
             ("verdict", "PASS" if not rep.problems else "FAIL")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for f in rep.fault_list:
        back = "not healthy" if f["recovered"] is None else f"healthy {f['recovered'] - f['injected']:.1f}s later"
        lines.append(f"fault +{f['injected']}s {f['kind']} {f['target']} ({f['outcome']}): {back}, "
                     f"{f['failures']} failures explained")
    lines += [f"problem: {p}" for p in rep.problems]
    lines += [f"unexplained: +{r['start']}s..{r['end']}s client {r['client']} {r['model']} "
              f"{'stream' if r['stream'] else 'plain'} {r['what']} {r['detail'][:160]}"
              f" (during: {r['faults'] or 'no fault'})" for r in rep.unexplained[:15]]
    return "\n".join(lines)


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
