"""One engine process as the config holds it, and where the router reaches it."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from typing import Optional

from router.config.adapters import LoraAdapter
from router.config.shaping import Shaping
from router.engines import ENGINES, EngineSpec

#: Instance names that would collide with programs, tmux sessions or log files we render.
RESERVED_NAMES = frozenset({"router", "frontend", "logs", "supervisord"})
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
WILDCARD_HOSTS = {"0.0.0.0", "::", "", "*"}
#: Environment variables whose values repr() hides (HF_TOKEN, VLLM_API_KEY, ...).
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)
#: `routing`: the least loaded replica; the same replica per session key; the same per prompt prefix.
ROUTINGS = ("least_outstanding", "session", "prefix")


@dataclass(frozen=True)
class Instance:
    """One engine process: a replica of `model` listening on host:port."""

    name: str
    model: str
    engine: str
    engine_args: tuple[str, ...]
    #: Environment for this engine, in the order it is exported: global
    #: kvcached vars, then the instance's kvcached_env, then its engine_env.
    env: tuple[tuple[str, str], ...]
    venv_path: Optional[str]
    host: str
    port: int
    #: GET path of the engine's health check: the engine's own, or the instance's
    #: ``health_path`` where the engine allows one (read this, not ``spec.health_path``).
    health_path: str
    aliases: tuple[str, ...] = ()
    #: Names the engine itself answers to (``--served-model-name``, else model).
    served_names: tuple[str, ...] = ()
    launch: bool = True
    sleep: bool = True
    max_concurrency: Optional[int] = None
    max_queue: int = 0
    #: Which replica of the model a request goes to (`ROUTINGS`), and how much of the prompt
    #: `prefix` routing hashes; the same on every instance of a model (router/config/checks.py).
    routing: str = "least_outstanding"
    routing_prefix_chars: int = 2048
    sim_args: tuple[str, ...] = ()
    #: The program of an engine started by its own ``command`` (whose other words are
    #: `engine_args`); None for engines launched from a Python module.
    program: Optional[str] = None
    #: Residency: started by the first request (supervisord autostart off), stopped after
    #: `idle_stop_seconds` idle, never slept or stopped by a policy when pinned.
    on_demand: bool = False
    idle_stop_seconds: Optional[float] = None
    pin: bool = False
    #: The machine that runs this engine: `render --node` renders the engines of one node, and in
    #: Kubernetes it is the pod's node (kubernetes.io/hostname); None: no particular node.
    node: Optional[str] = None
    #: What the engine holds on each of its GPUs while awake, and in host RAM while asleep.
    gpu_memory_gb: Optional[float] = None
    host_memory_gb: Optional[float] = None
    #: The tier its sleep uses: 1 keeps the weights in host RAM, 2 drops them (the wake reloads them).
    sleep_level: int = 1
    #: What a sleeper still holds on each of its GPUs (its CUDA context).
    gpu_sleeping_gb: float = 0.0
    #: Longest wait for a start to pass its health check (None: residency.start_timeout_seconds).
    start_timeout_seconds: Optional[float] = None
    #: This engine's own limits, where they differ from the router's (a 70B model's first token).
    request_timeout_seconds: Optional[float] = None
    stream_idle_timeout_seconds: Optional[float] = None
    #: A DNS name (a headless Service) whose every address is a replica of `model` on `port`; the
    #: router resolves it every `router.dns_refresh_seconds` (`host` is then the name itself).
    dns_name: Optional[str] = None
    #: What `python -m router.engines setup` installs into `venv_path`: a pinned requirement, or a
    #: requirements file (absolute); and the module that must then import (None: `engine_module`).
    engine_package: Optional[str] = None
    engine_requirements: Optional[str] = None
    engine_import: Optional[str] = None
    #: LoRA adapters clients may name as models: the engine flags' (loaded at start), then the declared ones.
    lora_adapters: tuple[LoraAdapter, ...] = ()
    #: What this model's request bodies get set, forced or lose (None: sent as the client's bytes).
    shaping: Optional[Shaping] = None
    #: Models (or their other names) that answer, in this order, what this model could not.
    fallbacks: tuple[str, ...] = ()
    #: Its place in the YAML's ``instances`` list, which messages name (``instances[2].port``);
    #: not part of what the instance is, so moving it in the file changes nothing.
    position: int = field(default=-1, compare=False, repr=False)

    @property
    def spec(self) -> EngineSpec:
        return ENGINES[self.engine]

    @property
    def adapter_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self.lora_adapters)

    @property
    def lora_env(self) -> tuple[tuple[str, str], ...]:
        """What the engine's adapter endpoints need in its environment, when it has adapters (set by the
        render before the instance's own env, which may override it)."""
        lora = self.spec.lora
        return tuple(lora.needs_env.items()) if lora is not None and self.lora_adapters else ()

    @property
    def gpus(self) -> tuple[str, ...]:
        """The GPUs the engine uses, from its CUDA_VISIBLE_DEVICES (GPU 0 when none is given)."""
        devices = dict(self.env).get("CUDA_VISIBLE_DEVICES", "")
        return tuple(d.strip() for d in devices.split(",") if d.strip()) or ("0",)

    def __repr__(self) -> str:
        """The dataclass repr with the engine's own key and secret-looking env values
        masked, so a logged config or a traceback shows no secret."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["engine_args"] = self.spec.redacted(self.engine_args)
        shown["sim_args"] = self.spec.redacted(self.sim_args)
        shown["env"] = tuple((k, "***" if SECRET_ENV.search(k) else v) for k, v in self.env)
        return f"Instance({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def url(self) -> str:
        """Where the router reaches this engine."""
        host = connect_host(self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """What the router sends to reach an engine started with its own API key."""
        key = self.spec.api_key(self.engine_args, dict(self.env))
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def kvcached(self) -> bool:
        """Whether kvcached manages the engine's KV cache (ENABLE_KVCACHED in its environment)."""
        return dict(self.env).get("ENABLE_KVCACHED", "").lower() in ("true", "1", "yes")

    @property
    def engine_module(self) -> Optional[str]:
        """The module whose import proves the venv's engine works: `engine_import`, else the top
        package of the engine's launcher (None for an engine started by its own command)."""
        launcher = self.spec.launcher
        return self.engine_import or (launcher.module.split(".")[0] if launcher is not None else None)

    @property
    def python(self) -> str:
        return f"{self.venv_path}/bin/python" if self.venv_path else "python"



def connect_host(host: str) -> str:
    """The address to dial for an engine bound to `host`."""
    if host in WILDCARD_HOSTS or host == "localhost":
        return "::1" if host == "::" else "127.0.0.1"
    return host


def loopback_ip(text: str) -> bool:
    """Whether `text` is a loopback IP address (IPv4, IPv6, or IPv4-mapped IPv6)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
