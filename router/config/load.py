"""YAML -> `Config`: the one parser of the project's configuration file.

The renderer, the router and the benchmark all read the YAML through
`load_config`, so they can never disagree about what it says. The format is
the kvcached controller's (``kvcached``, ``router``, ``sleep_manager``,
``instances``) plus a few keys of our own; every key is documented in
README.md. Validation collects every problem before failing, and each message
names the file and the field path (``instances[1].engine_args``) with a fix.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from router.engines import ENGINE_ALIASES, ENGINES, EngineSpec, flag_values, last_flag_value, split_args

#: Instance names that would collide with programs, tmux sessions or log files we render.
RESERVED_NAMES = frozenset({"router", "frontend", "logs", "supervisord"})
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
WILDCARD_HOSTS = {"0.0.0.0", "::", "", "*"}
#: Environment variables whose values repr() hides (HF_TOKEN, VLLM_API_KEY, ...).
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSW", re.IGNORECASE)


def one_line(text: str) -> str:
    """`text` with control characters escaped: a YAML key holding a newline or a terminal
    escape sequence cannot split a message or drive the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason, one line each.

    `warnings` holds the warnings found before the failure, each naming the
    file like `Config.warnings`, so a caller can show them beside the errors:
    a did-you-mean on a misspelt key often explains the error it caused.
    """

    def __init__(self, path: str, problems: list[str], warnings: tuple[str, ...] = ()):
        self.path = path
        self.problems = [one_line(p) for p in problems]
        self.warnings = tuple(warnings)
        super().__init__("\n".join(one_line(f"{path}: {p}") for p in problems))


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
    #: Longest wait for a start to pass its health check (None: residency.start_timeout_seconds).
    start_timeout_seconds: Optional[float] = None
    #: This engine's own limits, where they differ from the router's (a 70B model's first token).
    request_timeout_seconds: Optional[float] = None
    stream_idle_timeout_seconds: Optional[float] = None
    #: A DNS name (a headless Service) whose every address is a replica of `model` on `port`; the
    #: router resolves it every `router.dns_refresh_seconds` (`host` is then the name itself).
    dns_name: Optional[str] = None

    @property
    def spec(self) -> EngineSpec:
        return ENGINES[self.engine]

    @property
    def gpus(self) -> tuple[str, ...]:
        """The GPUs the engine uses, from its CUDA_VISIBLE_DEVICES (GPU 0 when none is given)."""
        devices = dict(self.env).get("CUDA_VISIBLE_DEVICES", "")
        return tuple(d.strip() for d in devices.split(",") if d.strip()) or ("0",)

    def __repr__(self) -> str:
        """The dataclass repr with the engine's own key and secret-looking env values
        masked, so a logged config or a traceback shows no secret."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
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
    def python(self) -> str:
        return f"{self.venv_path}/bin/python" if self.venv_path else "python"


@dataclass(frozen=True)
class RouterSettings:
    enable_router: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    connect_timeout_seconds: float = 5.0
    #: Total time for a non-streaming request.
    request_timeout_seconds: float = 600.0
    #: Longest silence between two chunks of a stream.
    stream_idle_timeout_seconds: float = 120.0
    health_check_interval_seconds: float = 5.0
    health_check_timeout_seconds: float = 2.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    eject_seconds: float = 10.0
    max_request_bytes: int = 16 * 1024 * 1024
    queue_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 30.0
    access_log: bool = True
    log_level: str = "info"
    #: Router pods in Kubernetes (each keeps its own state; see README "More than one node").
    replicas: int = 1
    #: Proxy processes sharing the port beside one controller process (1: one process does all).
    workers: int = 1
    #: The node whose `render --node` renders the router; None: every node's.
    node: Optional[str] = None
    #: Secrets: kept out of repr() (and so out of logged configs and tracebacks).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_api_key: Optional[str] = field(default=None, repr=False)
    #: Where a request without `model` goes when more than one model is served.
    default_model: Optional[str] = None
    #: Tries on other replicas for a request whose engine failed before any byte reached the client.
    retries: int = 2
    #: The longest a replica's circuit breaker stays open (eject_seconds doubles on each reopening).
    breaker_max_seconds: float = 300.0
    #: A streamed request waiting for a start or wake gets SSE comment lines every few seconds.
    loading_progress: bool = False
    #: Nameservers ((address, port)) that resolve instances' `dns_name`; none: the system's (/etc/resolv.conf).
    dns_servers: tuple[tuple[str, int], ...] = ()
    #: How often each `dns_name` is resolved again.
    dns_refresh_seconds: float = 5.0


@dataclass(frozen=True)
class SleepSettings:
    auto_sleep_enabled: bool = False
    #: A model is idle when its last request ended this long ago.
    idle_threshold_seconds: float = 300.0
    check_interval_seconds: float = 60.0
    wakeup_on_request: bool = True
    #: Least time a model stays awake after a wake before the idle loop may
    #: put it to sleep again (the kvcached key, used against thrashing).
    min_sleep_duration: float = 80.0
    wake_timeout_seconds: float = 120.0
    #: Longest wait for in-flight requests to finish before a manual sleep
    #: gives up (the idle loop only sleeps models with none in flight).
    drain_timeout_seconds: float = 60.0
    #: vLLM's sleep ``mode``: ``wait`` lets running requests finish, ``abort`` ends them.
    vllm_sleep_mode: str = "wait"
    #: How long vLLM's sleep call may take (with ``wait``, as long as its requests);
    #: None: ``wake_timeout_seconds``.
    vllm_sleep_timeout_seconds: Optional[float] = None


@dataclass(frozen=True)
class Group:
    """Instances that share a GPU in turns: with `exclusive`, at most one member is awake."""

    name: str
    members: tuple[str, ...]
    exclusive: bool = True


@dataclass(frozen=True)
class ResidencySettings:
    """Memory budgets that decide which models are awake, asleep or stopped (top-level ``residency``)."""

    #: GPU memory per GPU (by CUDA device index/UUID, "*" for every GPU not named); None: no GPU budget.
    gpu_memory_gb: Optional[tuple[tuple[str, float], ...]] = None
    #: Host RAM for the weights of sleeping engines; None: no host budget.
    host_memory_gb: Optional[float] = None
    #: Longest wait for a started engine to pass its health check.
    start_timeout_seconds: float = 900.0
    groups: tuple[Group, ...] = ()

    def gpu_budget(self, gpu: str) -> Optional[float]:
        if self.gpu_memory_gb is None:
            return None
        budgets = dict(self.gpu_memory_gb)
        return budgets.get(gpu, budgets.get("*"))


@dataclass(frozen=True)
class KubernetesSettings:
    """Where `render --target kubernetes` puts the stack and which images run it (top-level ``kubernetes``);
    the renderer has defaults for every image not named here."""

    namespace: str = "kvrouter"
    #: Engine kind -> container image, for the kinds the YAML names.
    images: tuple[tuple[str, str], ...] = ()
    router_image: Optional[str] = None
    #: One router replica leads (idle sleep, residency), chosen by the Lease `lease_name` in
    #: `lease_namespace` (None: `namespace`); on by default when router.replicas > 1.
    leader_election: bool = False
    lease_name: str = "kvrouter-leader"
    lease_namespace: Optional[str] = None
    #: A leader that has not renewed for this long is replaced...
    lease_seconds: float = 15.0
    #: ...it stops leading this long after its last successful renewal (< lease_seconds)...
    renew_deadline_seconds: float = 10.0
    #: ...and renews (a follower retries) this often (< renew_deadline_seconds).
    retry_period_seconds: float = 2.0

    @property
    def lease_ns(self) -> str:
        return self.lease_namespace or self.namespace


@dataclass(frozen=True)
class Config:
    path: str
    instances: tuple[Instance, ...]
    router: RouterSettings = RouterSettings()
    sleep: SleepSettings = SleepSettings()
    kvcached_env: tuple[tuple[str, str], ...] = ()
    launch_delay_seconds: float = 0.0
    #: Start of every tmux session name the renderer makes (`<prefix><name>`).
    tmux_session_prefix: str = "kvcached-"
    residency: ResidencySettings = ResidencySettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    warnings: tuple[str, ...] = ()
    #: What each instance's `dns_name` resolved to last (name -> addresses), set by the router at run
    #: time (`with_addresses`); not from the YAML.
    resolved: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def models(self) -> dict[str, tuple[Instance, ...]]:
        """Model -> its replicas, in config order. An instance with a `dns_name` is one replica per
        address the name resolved to (named ``<instance>@<address>``), or, until it resolves to
        any, the name itself."""
        addresses = dict(self.resolved)
        out: dict[str, list[Instance]] = {}
        for inst in self.instances:
            found = addresses.get(inst.dns_name) if inst.dns_name else None
            if found:
                out.setdefault(inst.model, []).extend(replace(inst, name=f"{inst.name}@{a}", host=a) for a in found)
            else:
                out.setdefault(inst.model, []).append(inst)
        return {m: tuple(v) for m, v in out.items()}

    def with_addresses(self, addresses: Mapping[str, tuple[str, ...]]) -> "Config":
        """This config with `dns_name` -> addresses as resolved (each address list sorted, so the
        same answer in another order is the same config)."""
        return replace(self, resolved=tuple(sorted((n, tuple(sorted(set(a)))) for n, a in addresses.items())))

    @property
    def routes(self) -> dict[str, str]:
        """Every routable name (model, alias, served name) -> its model."""
        out: dict[str, str] = {}
        for inst in self.instances:  # names the config gives win over engine-served ones
            for n in (inst.model, *inst.aliases):
                out.setdefault(n, inst.model)
        for inst in self.instances:
            for n in inst.served_names:
                out.setdefault(n, inst.model)
        return out

    @property
    def launched(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.launch)


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


def env_value(value: Any) -> str:
    """YAML scalar -> env var text; booleans as lower-case true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------
# Loading

TOP_KEYS = ("kvcached", "router", "sleep_manager", "residency", "launch_delay_seconds", "tmux_session_prefix",
            "instances", "kubernetes")
KUBERNETES_KEYS = ("namespace", "images", "router_image", "leader_election", "lease_name", "lease_namespace",
                   "lease_seconds", "renew_deadline_seconds", "retry_period_seconds")
#: A Lease name (an RFC 1123 subdomain).
K8S_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: A DNS name to resolve: labels of letters, digits and '-', dot-separated, an optional final dot.
DNS_NAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?)*\.?")
#: A Kubernetes namespace name (an RFC 1123 label).
K8S_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
RESIDENCY_KEYS = ("gpu_memory_gb", "host_memory_gb", "start_timeout_seconds", "groups")
GROUP_KEYS = ("name", "members", "exclusive")
#: tmux session name prefixes: tmux itself turns '.' into '_' in session names.
TMUX_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,40}")
#: Instance keys of engines we launch from their Python module (vLLM, SGLang); the others
#: take COMMAND_KEYS instead of engine_args.
INSTANCE_KEYS = (
    "name", "model", "engine", "engine_args", "engine_env", "kvcached_env", "using_venv",
    "venv_path", "aliases", "launch", "sleep", "max_concurrency", "max_queue", "sim_args",
    "on_demand", "idle_stop_seconds", "pin", "node", "gpu_memory_gb", "host_memory_gb", "start_timeout_seconds",
    "request_timeout_seconds", "stream_idle_timeout_seconds", "dns_name",
)
#: Instance keys of engines started by their own `command` only (EngineSpec.launcher is None).
COMMAND_KEYS = ("command", "host", "port", "health_path")
ROUTER_KEYS = {
    # YAML key: (RouterSettings field, kind)
    "enable_router": ("enable_router", "bool"),
    "router_host": ("host", "host"),
    "router_port": ("port", "port"),
    "connect_timeout_seconds": ("connect_timeout_seconds", "posfloat"),
    "request_timeout_seconds": ("request_timeout_seconds", "posfloat"),
    "stream_idle_timeout_seconds": ("stream_idle_timeout_seconds", "posfloat"),
    "health_check_interval_seconds": ("health_check_interval_seconds", "posfloat"),
    "health_check_timeout_seconds": ("health_check_timeout_seconds", "posfloat"),
    "unhealthy_threshold": ("unhealthy_threshold", "posint"),
    "healthy_threshold": ("healthy_threshold", "posint"),
    "eject_seconds": ("eject_seconds", "nonnegfloat"),
    "max_request_bytes": ("max_request_bytes", "posint"),
    "queue_timeout_seconds": ("queue_timeout_seconds", "posfloat"),
    "shutdown_grace_seconds": ("shutdown_grace_seconds", "nonnegfloat"),
    "access_log": ("access_log", "bool"),
    "log_level": ("log_level", "loglevel"),
    "replicas": ("replicas", "posint"),
    "workers": ("workers", "posint"),
    "node": ("node", "host"),
    "api_keys": ("api_keys", "keys"),
    "admin_api_key": ("admin_api_key", "key"),
    "default_model": ("default_model", "name"),
    "retries": ("retries", "nonnegint"),
    "breaker_max_seconds": ("breaker_max_seconds", "posfloat"),
    "loading_progress": ("loading_progress", "bool"),
    "dns_servers": ("dns_servers", "nameservers"),
    "dns_refresh_seconds": ("dns_refresh_seconds", "posfloat"),
}
SLEEP_KEYS = {
    "auto_sleep_enabled": ("auto_sleep_enabled", "bool"),
    "idle_threshold_seconds": ("idle_threshold_seconds", "nonnegfloat"),
    "check_interval_seconds": ("check_interval_seconds", "posfloat"),
    "wakeup_on_request": ("wakeup_on_request", "bool"),
    "min_sleep_duration": ("min_sleep_duration", "nonnegfloat"),
    "wake_timeout_seconds": ("wake_timeout_seconds", "posfloat"),
    "drain_timeout_seconds": ("drain_timeout_seconds", "posfloat"),
    "vllm_sleep_mode": ("vllm_sleep_mode", "sleepmode"),
    "vllm_sleep_timeout_seconds": ("vllm_sleep_timeout_seconds", "posfloat"),
}
#: What vLLM's sleep call does with running requests (kvcached's sleep_manager.vllm_sleep_mode).
VLLM_SLEEP_MODES = ("abort", "wait")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class _Problems:
    """Collects errors and warnings while walking the YAML."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}" if where else msg)

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}" if where else msg)

    def warning_lines(self, path: str) -> tuple[str, ...]:
        return tuple(one_line(f"{path}: {w}") for w in self.warnings)

    def fail(self, path: str) -> ConfigError:
        """The error to raise for what was collected, warnings included."""
        return ConfigError(path, self.errors, self.warning_lines(path))

    def unknown_keys(self, where: str, keys: Any, known: tuple[str, ...] | Mapping[str, Any]) -> None:
        for key in keys:
            if key in known:
                continue
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"
            self.warn(_join(where, str(key)), f"unknown key, ignored; {fix}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def load_config(path: str | os.PathLike, sim: bool = False) -> Config:
    """Read and validate the YAML at `path`.

    `sim` relaxes checks that only matter on a real GPU host (a missing venv
    is then a warning, since the simulated engine does not use it).
    Raises ConfigError listing every problem.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot read the config file: {e.strerror or e}"]) from None
    return parse_config(text, path, sim=sim)


#: Text PyYAML quotes from the file (an alias or anchor name), but not token names like '<scalar>'.
YAML_QUOTED = re.compile(r"'(?!<)[^']{2,}'")


def yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint with its line and column, but none of the file's text that
    PyYAML quotes with it (the line's snippet, a name): that text may be an API key."""
    if not isinstance(e, yaml.MarkedYAMLError):  # a bad byte or character: its code and position only
        return " ".join(str(e).split())
    parts = []
    for text, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)):
        if text:
            text = YAML_QUOTED.sub("'...'", text)
            parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text)
    return "; ".join(parts) or "cannot be parsed"


def parse_config(text: str | bytes, path: str = "<config>", sim: bool = False) -> Config:
    """Validate YAML `text` as if read from `path` (relative paths resolve beside it)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, [f"not valid YAML: {yaml_problem(e)}"]) from None
    except (ValueError, TypeError, RecursionError) as e:  # odd scalars, deep nesting
        raise ConfigError(path, [f"not valid YAML: {e}"]) from None
    p = _Problems()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the file must be a YAML mapping with an 'instances:' list"])
    base = Path(path).resolve().parent if not path.startswith("<") else Path.cwd()
    p.unknown_keys("", raw.keys(), TOP_KEYS)

    kv_env = _kvcached_block(raw.get("kvcached"), p)
    router = _settings(raw.get("router"), "router", ROUTER_KEYS, RouterSettings, p, base)
    sleep = _settings(raw.get("sleep_manager"), "sleep_manager", SLEEP_KEYS, SleepSettings, p, base)
    delay = _number(raw.get("launch_delay_seconds", 0), "launch_delay_seconds", "nonnegfloat", p)
    prefix = _session_prefix(raw.get("tmux_session_prefix", Config.tmux_session_prefix), p)
    residency = _residency(raw.get("residency"), p)
    kubernetes = _kubernetes(raw.get("kubernetes"), p, router.replicas)
    instances = _instances(raw.get("instances"), kv_env, base, sim, p)
    if p.errors:
        raise p.fail(path)
    cfg = Config(
        path=path if path.startswith("<") else str(Path(path).resolve()),
        instances=tuple(instances),
        router=router,
        sleep=sleep,
        kvcached_env=tuple(kv_env),
        launch_delay_seconds=delay if delay is not None else 0.0,
        tmux_session_prefix=prefix,
        residency=residency,
        kubernetes=kubernetes,
    )
    _cross_checks(cfg, p)
    if p.errors:
        raise p.fail(path)
    return replace(cfg, warnings=p.warning_lines(path))


def _residency(block: Any, p: _Problems) -> ResidencySettings:
    if block is None:
        return ResidencySettings()
    if not isinstance(block, dict):
        p.error("residency", "must be a mapping (gpu_memory_gb, host_memory_gb, start_timeout_seconds, groups)")
        return ResidencySettings()
    p.unknown_keys("residency", block.keys(), RESIDENCY_KEYS)
    gpu: Optional[tuple[tuple[str, float], ...]] = None
    raw_gpu = block.get("gpu_memory_gb")
    if isinstance(raw_gpu, dict):
        items = []
        for k, v in raw_gpu.items():
            n = _number(v, f"residency.gpu_memory_gb.{k}", "posfloat", p)
            if n is not None:
                items.append((str(k), n))
        gpu = tuple(items)
    elif raw_gpu is not None:
        n = _number(raw_gpu, "residency.gpu_memory_gb", "posfloat", p)
        gpu = (("*", n),) if n is not None else None
    host = _number(block["host_memory_gb"], "residency.host_memory_gb", "posfloat", p) if "host_memory_gb" in block else None
    start = _number(block.get("start_timeout_seconds", 900.0), "residency.start_timeout_seconds", "posfloat", p)
    groups = []
    raw_groups = block.get("groups", [])
    if not isinstance(raw_groups, list):
        p.error("residency.groups", "must be a list of {name, members: [instance names], exclusive: true}")
        raw_groups = []
    for i, g in enumerate(raw_groups):
        where = f"residency.groups[{i}]"
        if not isinstance(g, dict):
            p.error(where, "must be a mapping {name, members, exclusive}")
            continue
        p.unknown_keys(where, g.keys(), GROUP_KEYS)
        name, members = g.get("name"), g.get("members")
        if not isinstance(name, str) or not name.strip():
            p.error(f"{where}.name", "must be a name for the group")
            continue
        if not (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) for m in members)):
            p.error(f"{where}.members", "must list at least two instance names")
            continue
        exclusive = _value(g.get("exclusive", True), f"{where}.exclusive", "bool", p, Path.cwd())
        groups.append(Group(name, tuple(members), exclusive is not False))
    return ResidencySettings(gpu_memory_gb=gpu, host_memory_gb=host,
                             start_timeout_seconds=start if start is not None else 900.0, groups=tuple(groups))


def _kubernetes(block: Any, p: _Problems, replicas: int = 1) -> KubernetesSettings:
    """The top-level ``kubernetes`` block: read by `render --target kubernetes`, and by the router
    for its leader election."""
    if block is None:
        return KubernetesSettings(leader_election=replicas > 1)
    if not isinstance(block, dict):
        p.error("kubernetes", "must be a mapping (namespace, images: {vllm: IMAGE, ...}, router_image, "
                              "leader_election, lease_name, ...)")
        return KubernetesSettings(leader_election=replicas > 1)
    p.unknown_keys("kubernetes", block.keys(), KUBERNETES_KEYS)
    namespace = block.get("namespace", KubernetesSettings.namespace)
    if not (isinstance(namespace, str) and K8S_NAMESPACE.fullmatch(namespace)):
        p.error("kubernetes.namespace", f"{namespace!r} is not a Kubernetes namespace name: use lower-case letters, "
                                        "digits and '-' (at most 63, e.g. kvrouter)")
        namespace = KubernetesSettings.namespace
    images = block.get("images") or {}
    if not isinstance(images, dict):
        p.error("kubernetes.images", "must map engine kinds to images, e.g. {vllm: vllm/vllm-openai:v0.11.0}")
        images = {}
    for kind in images:
        if kind not in ENGINES:
            p.error(f"kubernetes.images.{kind}", f"not an engine kind; use one of: {', '.join(ENGINES)}")
    named = {"router_image": block.get("router_image"), **{f"images.{k}": v for k, v in images.items()}}
    for key, image in named.items():
        if image is not None and not (isinstance(image, str) and image and not any(c.isspace() for c in image)):
            p.error(f"kubernetes.{key}", f"{image!r} is not a container image reference (e.g. registry/name:tag)")
    return KubernetesSettings(
        namespace=namespace,
        images=tuple((str(k), str(v)) for k, v in images.items() if k in ENGINES and isinstance(v, str)),
        router_image=named["router_image"] if isinstance(named["router_image"], str) else None,
        **_lease(block, p, replicas),
    )


def _lease(block: dict, p: _Problems, replicas: int) -> dict[str, Any]:
    """The leader election keys of the ``kubernetes`` block, as KubernetesSettings fields."""
    out: dict[str, Any] = {"leader_election": replicas > 1}
    if "leader_election" in block:
        on = _value(block["leader_election"], "kubernetes.leader_election", "bool", p, Path.cwd())
        if on is not None:
            out["leader_election"] = on
    for key, default in (("lease_name", KubernetesSettings.lease_name), ("lease_namespace", None)):
        value = block.get(key, default)
        pattern = K8S_OBJECT_NAME if key == "lease_name" else K8S_NAMESPACE
        if value is not None and not (isinstance(value, str) and len(value) <= 253 and pattern.fullmatch(value)):
            p.error(f"kubernetes.{key}", f"{value!r} is not a Kubernetes {'object' if key == 'lease_name' else 'namespace'} "
                                         "name: use lower-case letters, digits and '-' (e.g. kvrouter-leader)")
        else:
            out[key] = value
    lease = _number(block.get("lease_seconds", KubernetesSettings.lease_seconds), "kubernetes.lease_seconds",
                    "posfloat", p) or KubernetesSettings.lease_seconds
    # Unset, the other two keep client-go's proportions to the lease (15 s: 10 s and 2 s).
    renew = _number(block.get("renew_deadline_seconds", lease * 2 / 3), "kubernetes.renew_deadline_seconds",
                    "posfloat", p)
    retry = _number(block.get("retry_period_seconds", lease * 2 / 15), "kubernetes.retry_period_seconds",
                    "posfloat", p)
    if renew is not None and renew >= lease:
        p.error("kubernetes.renew_deadline_seconds", f"{renew:g} must be less than lease_seconds ({lease:g}): a "
                                                     "leader must stop leading before another may take the Lease; "
                                                     f"lower it (e.g. {lease * 2 / 3:.3g}) or raise lease_seconds")
    elif renew is not None and retry is not None and retry >= renew:
        p.error("kubernetes.retry_period_seconds", f"{retry:g} must be less than renew_deadline_seconds ({renew:g}), "
                                                   "or the leader could not renew in time; lower it "
                                                   f"(e.g. {renew / 5:.3g})")
    out.update(lease_seconds=lease, renew_deadline_seconds=renew or lease * 2 / 3,
               retry_period_seconds=retry or lease * 2 / 15)
    return out


def _session_prefix(v: Any, p: _Problems) -> str:
    if isinstance(v, str) and TMUX_PREFIX.fullmatch(v):
        return v
    p.error("tmux_session_prefix", f"{v!r} is not a usable tmux session prefix: use 1 to 40 letters, digits, '-', '_' or '.' (e.g. 'kvcached-')")
    return Config.tmux_session_prefix


def _kvcached_block(block: Any, p: _Problems) -> list[tuple[str, str]]:
    if block is None:
        return []
    if not isinstance(block, dict):
        p.error("kvcached", "must be a mapping of kvcached settings, e.g. 'kvcached_gpu_utilization: 0.95'")
        return []
    out = []
    for key, value in block.items():
        name = str(key).upper()
        if not ENV_NAME.match(name):
            p.error(f"kvcached.{key}", "not a valid environment variable name (letters, digits, '_')")
        elif isinstance(value, (dict, list)) or value is None:
            p.error(f"kvcached.{key}", "must be a single value (number, true/false or text)")
        else:
            out.append((name, env_value(value)))
    return out


def _settings(block: Any, where: str, keys: Mapping[str, tuple[str, str]], cls: type, p: _Problems, base: Path) -> Any:
    if block is None:
        return cls()
    if not isinstance(block, dict):
        p.error(where, "must be a mapping")
        return cls()
    p.unknown_keys(where, block.keys(), keys)
    values = {}
    for key, (attr, kind) in keys.items():
        if key in block:
            v = _value(block[key], _join(where, key), kind, p, base)
            if v is not None:
                values[attr] = v
    return cls(**values)


def _value(v: Any, where: str, kind: str, p: _Problems, base: Path) -> Any:
    if kind == "bool":
        if isinstance(v, bool):
            return v
        p.error(where, f"must be true or false, not {v!r}")
        return None
    if kind == "host":
        if isinstance(v, str) and v and not any(c.isspace() for c in v):
            return v
        p.error(where, f"must be a host name or address, not {v!r}")
        return None
    if kind == "loglevel":
        if isinstance(v, str) and v.lower() in LOG_LEVELS:
            return v.lower()
        p.error(where, f"must be one of {', '.join(LOG_LEVELS)}")
        return None
    if kind == "sleepmode":
        if isinstance(v, str) and v.lower() in VLLM_SLEEP_MODES:
            return v.lower()
        p.error(where, f"must be one of {', '.join(VLLM_SLEEP_MODES)}, not {v!r}")
        return None
    if kind == "name":
        if isinstance(v, str) and v.strip():
            return v.strip()
        p.error(where, f"must be a model name, not {v!r}")
        return None
    if kind == "nameservers":
        return _nameservers(v, where, p)
    if kind == "keys":
        return _secrets(v, where, p, base, many=True)
    if kind == "key":
        keys = _secrets(v, where, p, base, many=False)
        return keys[0] if keys else None
    return _number(v, where, kind, p)


def _nameservers(v: Any, where: str, p: _Problems) -> Optional[tuple[tuple[str, int], ...]]:
    """``["10.96.0.10", "127.0.0.1:5353", "[fd00::a]:53"]`` -> ((address, port), ...), port 53 by default."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        p.error(where, f"must be a list of nameserver addresses, each an IP with an optional port "
                       f"(e.g. [\"10.96.0.10\", \"127.0.0.1:5353\"]), not {v!r}")
        return None
    out = []
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else ""
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([0-9.]+)(?::(\d+))?|([0-9A-Fa-f:]+)", text.strip())
        address, port = (m.group(1) or m.group(3) or m.group(5), m.group(2) or m.group(4) or "53") if m else ("", "")
        try:
            ipaddress.ip_address(address)
            ok = 1 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            p.error(f"{where}[{i}]", f"{item!r} is not a nameserver: give an IP address with an optional port "
                                     "(10.96.0.10, 127.0.0.1:5353, [fd00::a]:53); names are not resolved here")
            continue
        out.append((address, int(port)))
    return tuple(out) if len(out) == len(items) else None


def _number(v: Any, where: str, kind: str, p: _Problems) -> Any:
    is_num = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind in ("posint", "nonnegint", "port"):
        ok = isinstance(v, int) and not isinstance(v, bool)
        lo, hi = {"posint": (1, 2**31), "nonnegint": (0, 100), "port": (1, 65535)}[kind]
        if ok and lo <= v <= hi:
            return v
        p.error(where, f"must be a whole number from {lo} to {hi}, not {v!r}")
        return None
    if is_num and math.isfinite(v) and (v > 0 or (kind == "nonnegfloat" and v == 0)):
        return float(v)
    need = "a number >= 0" if kind == "nonnegfloat" else "a number > 0"
    p.error(where, f"must be {need}, not {v!r}")
    return None


def _secrets(v: Any, where: str, p: _Problems, base: Path, many: bool) -> tuple[str, ...]:
    """Keys inline, or ``{env: NAME}`` / ``{file: PATH}`` so they need not sit in the YAML."""
    shape = "a list of keys" if many else "a key"
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("env", "file"):
        (src, ref), = v.items()
        if not isinstance(ref, str) or not ref:
            p.error(where, f"'{src}:' needs a name")
            return ()
        if src == "env":
            text = os.environ.get(ref)
            if text is None:
                p.error(where, f"environment variable {ref} is not set")
                return ()
            items = text.split(",")
        else:
            fp = Path(ref) if Path(ref).is_absolute() else base / ref
            try:
                mode = fp.stat().st_mode
                if not stat.S_ISREG(mode):  # a FIFO or device could block or never end
                    p.error(where, f"key file {fp} is not a regular file")
                    return ()
                items = fp.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                p.error(where, f"cannot read key file {fp}: {e.strerror or e}")
                return ()
            except UnicodeDecodeError:
                p.error(where, f"key file {fp} is not UTF-8 text")
                return ()
            if mode & 0o077:
                p.warn(where, f"key file {fp} is open to other users (mode {mode & 0o777:o}); run chmod 600 on it")
        keys = tuple(k.strip() for k in items if k.strip())
        if not keys:
            p.error(where, f"no key found in {src} {ref}")
        return keys if many else keys[:1]
    if many and isinstance(v, list) and all(isinstance(k, str) and k.strip() for k in v):
        return tuple(k.strip() for k in v)
    if not many and isinstance(v, str) and v.strip():
        return (v.strip(),)
    p.error(where, f"must be {shape}, or {{env: VAR}} or {{file: PATH}}")
    return ()


def _str_list(v: Any, where: str, p: _Problems) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(_is_word(x) for x in v):
        return [str(x) for x in v]
    p.error(where, "must be a list of strings")
    return []


def _is_word(x: Any) -> bool:
    """A list item taken as text: a string, or a number YAML read from unquoted digits."""
    return isinstance(x, (str, int, float)) and not isinstance(x, bool)


def _env_list(v: Any, where: str, p: _Problems) -> list[tuple[str, str]]:
    """``["KEY=VALUE", ...]`` (the kvcached format) or a ``KEY: value`` mapping."""
    if v is None:
        return []
    if isinstance(v, dict):
        items = [(f"{where}.{k}", str(k), val) for k, val in v.items()]
    elif isinstance(v, list):
        items = []
        for i, entry in enumerate(v):
            if not isinstance(entry, str) or "=" not in entry:
                p.error(f"{where}[{i}]", f"must be a 'KEY=VALUE' string, not {entry!r}")
                continue
            k, _, val = entry.partition("=")
            items.append((f"{where}[{i}]", k.strip(), val))
    else:
        p.error(where, "must be a list of 'KEY=VALUE' strings")
        return []
    out = []
    for at, k, val in items:
        if not ENV_NAME.match(k):
            p.error(at, f"{k!r} is not a valid environment variable name (letters, digits, '_')")
        elif isinstance(val, (dict, list)) or val is None:
            p.error(at, "must have a single value")
        elif "\0" in env_value(val):
            p.error(at, "value must not contain a NUL character")
        else:
            out.append((k, env_value(val)))
    return out


def _instances(block: Any, kv_env: list[tuple[str, str]], base: Path, sim: bool, p: _Problems) -> list[Instance]:
    if not isinstance(block, list) or not block:
        p.error("instances", "must be a non-empty list of engine instances (each with at least 'model' and 'engine')")
        return []
    out = []
    for i, raw in enumerate(block):
        where = f"instances[{i}]"
        if not isinstance(raw, dict):
            p.error(where, "must be a mapping with 'model', 'engine' and 'engine_args'")
            continue
        inst = _instance(raw, where, kv_env, base, sim, p)
        if inst is not None:
            out.append(inst)
    return out


def _instance(raw: dict, where: str, kv_env: list[tuple[str, str]], base: Path, sim: bool, p: _Problems) -> Optional[Instance]:
    p.unknown_keys(where, raw.keys(), INSTANCE_KEYS + COMMAND_KEYS)
    ok = True
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip() or model != model.strip():
        p.error(f"{where}.model", "missing or not a model name/path (e.g. 'meta-llama/Llama-3.2-1B')")
        ok = False
    engine_raw = raw.get("engine")
    engine = ENGINE_ALIASES.get(engine_raw.strip().lower()) if isinstance(engine_raw, str) else None
    if engine is None:
        p.error(f"{where}.engine", f"unknown engine {engine_raw!r}; use one of: {', '.join(ENGINES)}")
        ok = False

    if "name" in raw:
        name = raw["name"]
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            p.error(f"{where}.name", f"{name!r} is not a safe name: use letters, digits, '-' and '_' (at most 63, starting with a letter or digit)")
            ok = False
    elif ok:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", model.rstrip("/").rsplit("/", 1)[-1]).lstrip("_-")[:63] or "model"
    else:
        name = None
    if isinstance(name, str) and name.lower() in RESERVED_NAMES:
        p.error(f"{where}.name", f"{name!r} is reserved for the router's own programs; pick another name")
        ok = False

    # An unknown engine's arguments are still checked, as those of an engine launched the
    # same way (by `command` or from its module), so every problem shows at once.
    spec = ENGINES[engine] if engine is not None else next(
        (s for s in ENGINES.values() if (s.launcher is None) == ("command" in raw)), None)
    args: list[str] = []
    program: Optional[str] = None
    address: Optional[tuple[str, int]] = None
    health_path = ""
    dns_name = _dns_name(raw, where, p)
    if spec is not None:
        # With a dns_name, `port` is every engine's key (the addresses come from the name).
        fit = {k: v for k, v in raw.items() if not (k == "port" and "dns_name" in raw)}
        ok = _keys_fit_engine(fit, spec, where, p) and ok
        words = _words(raw.get(spec.args_key, []), f"{where}.{spec.args_key}", p)
        if words is None:
            ok = False
        elif spec.launcher is not None:
            args = words
        elif words:
            program, *args = words
        if "dns_name" in raw:
            address = _dns_address(raw, args, spec, dns_name, where, p)
        else:
            address = _address(raw, args, spec, where, p)
        health_path = _health_path(raw, spec, where, p) or spec.health_path

    env = list(kv_env) + _env_list(raw.get("kvcached_env"), f"{where}.kvcached_env", p) + _env_list(raw.get("engine_env"), f"{where}.engine_env", p)
    aliases = _str_list(raw.get("aliases"), f"{where}.aliases", p)
    for j, a in enumerate(aliases):
        if not a.strip():
            p.error(f"{where}.aliases[{j}]", "must not be empty")
    sim_args = []
    try:
        sim_args = split_args(_str_list(raw.get("sim_args"), f"{where}.sim_args", p))
    except ValueError as e:
        p.error(f"{where}.sim_args", f"cannot split into arguments ({e}); check the quotes")

    # An instance found by DNS runs elsewhere (a Deployment behind a headless Service): launch defaults to false.
    defaults = {"launch": "dns_name" not in raw, "sleep": True}
    flags = {key: _value(raw.get(key, defaults.get(key, False)), f"{where}.{key}", "bool", p, base) is True
             for key in ("launch", "sleep", "using_venv", "on_demand", "pin")}
    if "dns_name" in raw and flags["launch"]:
        p.error(f"{where}.launch", "an instance found by its dns_name runs elsewhere and is not launched here; "
                                   "remove 'launch: true' (or the dns_name)")
    sizes = {key: _number(raw[key], f"{where}.{key}", "posfloat", p) if raw.get(key) is not None else None
             for key in ("idle_stop_seconds", "gpu_memory_gb", "host_memory_gb", "start_timeout_seconds",
                         "request_timeout_seconds", "stream_idle_timeout_seconds")}
    if flags["on_demand"] and not flags["launch"]:
        p.error(f"{where}.on_demand", "an engine started elsewhere (launch: false) cannot be started on demand; "
                                      "remove one of the two")
    if spec is not None and spec.launcher is None and program is None and flags["launch"]:
        p.error(f"{where}.command", f"missing: engine '{spec.name}' is started by its own command; give the program "
                                    "and its arguments (e.g. command: 'llama-server -m model.gguf --port 8001'), "
                                    "or set 'launch: false' for one started elsewhere")
        ok = False

    venv_path = None
    venv_raw = raw.get("venv_path")
    if flags["using_venv"]:
        if not isinstance(venv_raw, str) or not venv_raw.strip():
            p.error(f"{where}.venv_path", "using_venv is true but venv_path is missing; give the virtualenv directory or set using_venv: false")
            ok = False
        else:
            vp = Path(os.path.expanduser(venv_raw.strip()))
            vp = vp if vp.is_absolute() else base / vp
            venv_path = os.path.normpath(str(vp))
            if not (Path(venv_path) / "bin" / "python").exists() and flags["launch"]:
                msg = f"virtualenv {venv_path} has no bin/python; create it or fix the path (relative paths are from the config file's folder)"
                (p.warn if sim else p.error)(f"{where}.venv_path", msg)
    elif venv_raw is not None and not isinstance(venv_raw, str):
        p.error(f"{where}.venv_path", "must be a path")

    max_conc = raw.get("max_concurrency")
    if max_conc is not None:
        max_conc = _number(max_conc, f"{where}.max_concurrency", "posint", p)
    max_queue = raw.get("max_queue", max_conc or 0)
    if not (isinstance(max_queue, int) and not isinstance(max_queue, bool) and max_queue >= 0):
        p.error(f"{where}.max_queue", f"must be a whole number >= 0, not {max_queue!r}")
        max_queue = 0

    if not ok or engine is None or spec is None or address is None:
        return None
    host, port = address
    served = tuple(flag_values(args, spec.served_name_flag) if spec.served_name_flag else ()) or (model,)
    return Instance(
        name=name, model=model, engine=engine, engine_args=tuple(args), env=tuple(env),
        venv_path=venv_path, host=host, port=port, health_path=health_path, aliases=tuple(aliases),
        served_names=served, launch=flags["launch"], sleep=flags["sleep"], max_concurrency=max_conc,
        max_queue=max_queue, sim_args=tuple(sim_args), program=program, on_demand=flags["on_demand"],
        pin=flags["pin"], node=_value(raw["node"], f"{where}.node", "host", p, base) if "node" in raw else None,
        dns_name=dns_name, **sizes,
    )


def _dns_name(raw: dict, where: str, p: _Problems) -> Optional[str]:
    """The instance's `dns_name`, if it is a DNS name."""
    value = raw.get("dns_name")
    if value is None:
        return None
    if not (isinstance(value, str) and DNS_NAME.fullmatch(value)):
        p.error(f"{where}.dns_name", f"{value!r} is not a DNS name; give the headless Service's name "
                                     "(e.g. engine-a.default.svc.cluster.local)")
        return None
    if ipaddress_or_none(value.rstrip(".")) is not None:
        p.error(f"{where}.dns_name", f"{value!r} is an address, not a name; put it in the engine's --host (or host:) "
                                     "and remove dns_name")
        return None
    return value


def ipaddress_or_none(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _dns_address(raw: dict, args: list[str], spec: EngineSpec, dns_name: Optional[str], where: str,
                 p: _Problems) -> Optional[tuple[str, int]]:
    """(dns_name, port) of an instance found by DNS: the port from `port:` or the engine's port flag."""
    if "host" in raw or last_flag_value(args, spec.host_flag) is not None:
        key = "host" if "host" in raw else spec.args_key
        p.error(f"{where}.{key}", f"an instance with a dns_name is reached at each address the name resolves to; "
                                  f"remove its host ({'host:' if key == 'host' else spec.host_flag})")
        return None
    port_text = last_flag_value(args, spec.port_flag)
    port: Any = raw.get("port", int(port_text) if port_text is not None and port_text.isdigit() else port_text)
    if port is None:
        p.error(f"{where}.port", "missing: the router reaches each address of the dns_name on this port; "
                                 "add e.g. 'port: 8000'")
        return None
    if not (type(port) is int and 1 <= port <= 65535):
        p.error(f"{where}.port", f"{port!r} is not a port number (1-65535)")
        return None
    if "port" in raw and port_text is not None and str(raw["port"]) != port_text:
        p.error(f"{where}.port", f"{raw['port']!r} but {spec.args_key} says {spec.port_flag} {port_text}; give one")
        return None
    return (dns_name, port) if dns_name is not None else None


def _keys_fit_engine(raw: dict, spec: EngineSpec, where: str, p: _Problems) -> bool:
    """Whether `raw` has only keys for `spec`'s way of launching: `engine_args` for an
    engine we launch from its Python module, `command` and its keys for one that is not."""
    if spec.launcher is None:
        if "engine_args" in raw:
            p.error(f"{where}.engine_args", f"engine '{spec.name}' is started by its own command and takes no "
                                            "engine_args; put the program and all its arguments in 'command' "
                                            "(e.g. command: 'llama-server -m model.gguf --port 8001')")
            return False
        return True
    command_engines = ", ".join(s.name for s in ENGINES.values() if s.launcher is None)
    wrong = [key for key in COMMAND_KEYS if key in raw]
    for key in wrong:
        p.error(f"{where}.{key}", f"only for engines started by their own 'command' (engine: {command_engines}); "
                                  f"{spec.name} is given its address as '{spec.host_flag}'/'{spec.port_flag}' in "
                                  f"engine_args and answers health checks at {spec.health_path}; remove '{key}'")
    return not wrong


def _words(value: Any, where: str, p: _Problems) -> Optional[list[str]]:
    """A list of strings (each may hold several shell words) or one string -> the words; None if unusable."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(_is_word(a) for a in items):
        p.error(where, "must be a list of strings (each may hold several words) or one string")
        return None
    try:
        words = split_args([str(a) for a in items])
    except ValueError as e:
        p.error(where, f"cannot split into arguments ({e}); check the quotes")
        return None
    if any("\0" in a for a in words):
        p.error(where, "must not contain a NUL character")
        return None
    return words


def _address(raw: dict, args: list[str], spec: EngineSpec, where: str, p: _Problems) -> Optional[tuple[str, int]]:
    """Where the router reaches the engine: the host and port flags of its arguments, or for
    an engine started by its own command the `host:`/`port:` keys; the host defaults to 127.0.0.1."""
    at = f"{where}.{spec.args_key}"
    host = last_flag_value(args, spec.host_flag)
    port_text = last_flag_value(args, spec.port_flag)
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            p.error(at, f"{spec.port_flag} {port_text!r} is not a port number (1-65535)")
            return None
        port = int(port_text)
    if spec.launcher is None:
        given = {key: raw[key] for key in ("host", "port") if key in raw}
        if "host" in given and not (isinstance(given["host"], str) and given["host"].strip() == given["host"] != ""):
            p.error(f"{where}.host", f"{given['host']!r} is not a host name or address (e.g. 127.0.0.1)")
            return None
        if "port" in given and not (type(given["port"]) is int and 1 <= given["port"] <= 65535):
            p.error(f"{where}.port", f"{given['port']!r} is not a port number (1-65535)")
            return None
        for key, flag, from_args in (("host", spec.host_flag, host), ("port", spec.port_flag, port)):
            if key in given and from_args is not None and given[key] != from_args:
                p.error(f"{where}.{key}", f"{given[key]!r} but the command says {flag} {from_args}; give one of them")
                return None
        host = given.get("host", host)
        port = given.get("port", port)
        if port is None:
            p.error(f"{where}.port", f"no port: the router needs it to reach the engine; add '{spec.port_flag} 8001' "
                                     "to the command or a 'port: 8001' key")
            return None
    elif port is None:
        p.error(at, f"no '{spec.port_flag}' given; the router needs it to reach the engine (add e.g. '{spec.port_flag}=8001')")
        return None
    return host or "127.0.0.1", port


def _health_path(raw: dict, spec: EngineSpec, where: str, p: _Problems) -> Optional[str]:
    """The instance's own `health_path` (engines started by their own command only), if valid."""
    value = raw.get("health_path")
    if value is None or spec.launcher is not None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"/[!-~]*", value):
        p.error(f"{where}.health_path", f"{value!r} is not a URL path: start it with '/' and use no spaces (e.g. /health)")
        return None
    return value


def _cross_checks(cfg: Config, p: _Problems) -> None:
    """Checks across instances: clashes are errors, risky combinations warnings."""
    names: dict[str, int] = {}
    #: (address dialled, port, bound to a wildcard, launched here) -> instance name
    binds: dict[tuple[str, int, bool, bool], str] = {}
    route_owner: dict[str, str] = {}
    for i, inst in enumerate(cfg.instances):
        where = f"instances[{i}]"
        if inst.name in names:
            p.error(f"{where}.name", f"duplicate instance name {inst.name!r} (also instances[{names[inst.name]}]); give each instance its own 'name'")
        names.setdefault(inst.name, i)
        host = connect_host(inst.host)
        wild = inst.host in WILDCARD_HOSTS
        for (h, port, other_wild, other_launch), other in binds.items():
            # A wildcard bind takes the port on every local address, but only
            # clashes with another engine on this machine, i.e. one launched here.
            if port == inst.port and (h == host or (inst.launch and other_launch and (wild or other_wild))):
                field, flag = _port_source(inst)
                p.error(f"{where}.{field}", f"{inst.host}:{inst.port} is already used by instance {other!r}; give each instance its own {flag}")
                break
        binds[(host, inst.port, wild, inst.launch)] = inst.name
        if cfg.router.enable_router and inst.port == cfg.router.port and (
                host in ("127.0.0.1", connect_host(cfg.router.host))
                or (inst.launch and (wild or cfg.router.host in WILDCARD_HOSTS))):
            field, flag = _port_source(inst)
            p.error(f"{where}.{field}", f"{flag} {inst.port} is the router's port (router.router_port); pick another")
        for n in (inst.model, *inst.aliases):
            owner = route_owner.setdefault(n, inst.model)
            if owner != inst.model:  # the alias is this instance's, or the earlier one's when n is this model
                key = "model" if n == inst.model else "aliases"
                p.error(f"{where}.{key}", f"model name {n!r} would route to both {owner!r} and {inst.model!r}; rename the alias")
    routes = cfg.routes
    for i, inst in enumerate(cfg.instances):
        where = f"instances[{i}]"
        for n in inst.served_names:
            if routes[n] != inst.model:
                p.warn(f"{where}.engine_args", f"--served-model-name {n!r} is also a name of model {routes[n]!r}, "
                       f"so requests for {n!r} go there; reach this instance as {inst.model!r}")
        if cfg.sleep.auto_sleep_enabled and inst.sleep and not inst.spec.has_sleep_api:
            p.warn(where, f"auto sleep is on but engine '{inst.engine}' has no sleep API, so model {inst.model!r} "
                          "is never put to sleep; set 'sleep: false' to say so")
        elif cfg.sleep.auto_sleep_enabled and inst.sleep:
            missing = inst.spec.sleep_api_missing(inst.engine_args, dict(inst.env))
            if missing:
                p.warn(where, f"auto sleep is on but this {inst.engine} engine lacks what its sleep API needs: "
                              f"{', '.join(missing)}; add them or set 'sleep: false'")
    _residency_checks(cfg, p)
    router = cfg.router
    if router.default_model is not None and router.default_model not in routes:
        p.error("router.default_model", f"{router.default_model!r} is not a model, alias or served name of any "
                                        f"instance; use one of: {', '.join(routes)}")
    if router.enable_router and not router.api_keys and not (router.host == "localhost" or loopback_ip(router.host)):
        p.warn("router.router_host", f"{router.host} lets other machines reach the router and router.api_keys is not "
                                     "set, so anyone who can connect may use every model; set api_keys")
    _gpu_checks(cfg, p)


def _port_source(inst: Instance) -> tuple[str, str]:
    """The field that gave `inst` its port and how it is spelt there, for messages."""
    spec = inst.spec
    if spec.launcher is None and last_flag_value(inst.engine_args, spec.port_flag) is None:
        return "port", "port:"
    return spec.args_key, spec.port_flag


def _residency_checks(cfg: Config, p: _Problems) -> None:
    """Groups name real instances once; budgets need every budgeted engine's size."""
    names = {i.name for i in cfg.instances}
    grouped: dict[str, str] = {}
    for gi, group in enumerate(cfg.residency.groups):
        for member in group.members:
            if member not in names:
                p.error(f"residency.groups[{gi}].members", f"{member!r} is not an instance name; use one of: "
                                                          f"{', '.join(sorted(names))}")
            elif member in grouped:
                p.error(f"residency.groups[{gi}].members", f"instance {member!r} is already in group "
                                                          f"{grouped[member]!r}; an instance may be in one group")
            grouped.setdefault(member, group.name)
    r = cfg.residency
    for i, inst in enumerate(cfg.instances):
        where = f"instances[{i}]"
        if r.gpu_memory_gb is not None and inst.gpu_memory_gb is None and inst.launch:
            p.error(f"{where}.gpu_memory_gb", "missing: residency.gpu_memory_gb sets a GPU budget, so every launched "
                                              "instance must say what it holds while awake (e.g. gpu_memory_gb: 20)")
        if r.host_memory_gb is not None and inst.host_memory_gb is None and inst.launch and inst.sleep \
                and inst.spec.has_sleep_api:
            p.error(f"{where}.host_memory_gb", "missing: residency.host_memory_gb sets a host budget, so every "
                                               "sleepable instance must say what its weights hold while asleep")
        for gpu in inst.gpus:
            budget = r.gpu_budget(gpu)
            if budget is not None and inst.gpu_memory_gb is not None and inst.gpu_memory_gb > budget:
                p.error(f"{where}.gpu_memory_gb", f"{inst.gpu_memory_gb:g} GB is more than GPU {gpu}'s whole "
                                                  f"budget of {budget:g} GB (residency.gpu_memory_gb)")


def _gpu_checks(cfg: Config, p: _Problems) -> None:
    groups: dict[str, list[tuple[int, Instance, float]]] = {}
    forms: dict[str, list[int]] = {}
    for i, inst in enumerate(cfg.instances):
        if not inst.launch:
            continue  # on another machine, or sharing GPUs we do not see
        env = dict(inst.env)
        devices = env.get("CUDA_VISIBLE_DEVICES", "")
        if devices:
            form = "uuid" if "GPU-" in devices or "MIG-" in devices else "index"
            forms.setdefault(form, []).append(i)
        spec = inst.spec
        if spec.gpu_fraction_flag is None:
            continue  # the engine's memory use is its own business
        text = last_flag_value(inst.engine_args, spec.gpu_fraction_flag)
        try:
            frac = float(text) if text is not None else spec.gpu_fraction_default
        except ValueError:
            p.warn(f"instances[{i}].engine_args", f"{spec.gpu_fraction_flag} {text!r} is not a number")
            frac = None
        if frac is None or env.get("ENABLE_KVCACHED", "").lower() in ("true", "1", "yes"):
            continue
        for dev in (devices.split(",") if devices else ["default"]):
            groups.setdefault(dev.strip(), []).append((i, inst, frac))
    for dev, members in groups.items():
        total = sum(f for _, _, f in members)
        if len(members) > 1 and total > 1.0 + 1e-9:
            who = ", ".join(f"{inst.name} ({f:g})" for _, inst, f in members)
            p.warn("instances", f"GPU memory fractions on GPU {dev} add up to {total:g} > 1.0 without kvcached: {who}; "
                                "lower them or enable kvcached (ENABLE_KVCACHED=true)")
    if len(forms) > 1:
        p.warn("instances", "CUDA_VISIBLE_DEVICES is given as indexes for some instances and as UUIDs for others; use one form so GPU sharing can be checked")


def summary_table(cfg: Config) -> str:
    """The instance table printed by ``render --check``."""
    rows = [("NAME", "MODEL", "ENGINE", "HOST:PORT", "VENV", "LAUNCH")]
    for inst in cfg.instances:
        rows.append((inst.name, inst.model, inst.engine, f"{inst.host}:{inst.port}", inst.venv_path or "-", "yes" if inst.launch else "no (external)"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
