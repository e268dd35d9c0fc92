"""The chaos soak's stack (benchmarks/chaos.py): its engines, its clients' models, its faults' kinds, and the
supervised ``--sim`` stack itself, rendered from one config and run under a real supervisord."""
from __future__ import annotations

import contextlib
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any, Optional

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import distinct_ports, render  # noqa: E402
from supervised import Supervised, wait_for  # noqa: E402

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
#: The router's shutdown_grace_seconds in this stack (stack_config).
SHUTDOWN_GRACE = 5



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

