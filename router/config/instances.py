"""The ``instances`` list: each entry's keys declared once, then read into an `Instance`.

The keys do not map one to one on `Instance` (``command`` is its program and arguments,
``engine_env`` and ``kvcached_env`` make its env), so they are declared as a tuple of
`Key`. Each value is checked by its kind first; what one key means for another (the
engine decides between ``engine_args`` and ``command``, the address comes from the
flags or the keys) is checked here.
"""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from router.config.adapters import ADAPTERS, LoraAdapter, instance_adapters
from router.config.instance import RESERVED_NAMES, ROUTINGS, SAFE_NAME, Instance
from router.config.kinds import COUNT, HOST, NON_NEGATIVE, PORT, POSITIVE, Choice, EnvList, Flag, Number, Strings, Text, Words
from router.config.problems import Reading
from router.config.schema import REQUIRED, Key, Kind, read_keys
from router.config.shaping import Fields, read_shaping
from router.config.venvs import SETUP_HINT, PinnedRequirement
from router.engines import ENGINE_ALIASES, ENGINES, EngineSpec, flag_values, last_flag_value

#: A DNS name to resolve: labels of letters, digits and '-', dot-separated, an optional final dot.
DNS_NAME = r"(?=.{1,253}\.?$)([A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?)*\.?"
#: Text with no space at either end.
TRIMMED = r"(?s)\S(.*\S)?"

INSTANCE: tuple[Key[object], ...] = (
    Key(Text("a model name or path", TRIMMED, "missing or not a model name/path (e.g. 'meta-llama/Llama-3.2-1B')"), REQUIRED,
        "the model path or name clients ask for, passed to the engine: `meta-llama/Llama-3.2-1B`", name="model"),
    Key(Choice(tuple(ENGINES), tuple(ENGINE_ALIASES.items()), "unknown engine {value!r}; use one of: {choices}"), REQUIRED,
        "`vllm`, `sglang` (any case; `sgl` means sglang) or `openai`: any OpenAI-compatible server, started by its own "
        "`command`", name="engine"),
    Key(Words(), (), "the server's command line, the program first: a list split like `engine_args`, or one string "
        "(`\"llama-server -m model.gguf --port 8001\"`). Run as given (with `using_venv`, the venv's `bin` first on `PATH`); "
        "under `--sim` the simulated engine takes its place on the same host and port. `openai` only; `engine_args` is an "
        "error there", name="command", shown="required for `openai` when launched"),
    Key(PORT, None, "`openai` only: the port the router reaches the server on, when the command has no `--port` (one of "
        "the two is required; if both are given they must agree)", name="port", shown="`--port` in `command`"),
    Key(Text("a host name or address", TRIMMED, "{value!r} is not a host name or address (e.g. 127.0.0.1)"), None,
        "`openai` only: the address the router reaches the server on", name="host",
        shown="`--host` in `command`, else `127.0.0.1`"),
    Key(Text("a URL path", r"/[!-~]*", "{value!r} is not a URL path: start it with '/' and use no spaces (e.g. /health)"),
        None, "`openai` only: the GET path that answers 200 while the server can serve (e.g. `/v1/models`)",
        name="health_path", shown="`/health`"),
    Key(Text("a safe name", SAFE_NAME.pattern.strip("^$"), "{value!r} is not a safe name: use letters, digits, '-' and '_' "
             "(at most 63, starting with a letter or digit)"), None,
        "letters, digits, `-`, `_` (at most 63); names the supervisord program, the launch script `engines/<name>.sh`, "
        "the log `logs/<name>.log` and the tmux session `kvcached-<name>`. Unique; `router`, `frontend`, `logs` and "
        "`supervisord` (in any case) are reserved", name="name", shown="last part of `model` (`Llama-3.2-1B`)"),
    Key(Words(), (), "the engine's flags: a list whose items are split like a shell would (`\"--gpu-memory-utilization "
        "0.5\"` is two arguments; quote to keep spaces: `\"--served-model-name 'a b'\"`), or one string. Must contain "
        "`--port` (`--port 8001` or `--port=8001`): the router reaches the engine at `--host` (default `127.0.0.1`) and "
        "that port. No two instances may share a host:port", name="engine_args"),
    Key(EnvList(), (), "more environment for this engine: `[\"VLLM_USE_V1=1\"]` (or a `KEY: value` mapping)",
        name="engine_env"),
    Key(EnvList(), (), "kvcached environment for this engine, same form: `[\"ENABLE_KVCACHED=true\"]`. Exported after the "
        "global `kvcached` block and before `engine_env`, so later ones win", name="kvcached_env"),
    Key(Flag(), False, "run the engine with `venv_path`'s python (and that venv first on `PATH`)", name="using_venv"),
    Key(Text("a path", r"(?s).*", "must be a path"), None, "the virtualenv folder; `~` and paths relative to the config "
        "file's folder work. Must contain `bin/python` when `using_venv` is true and the instance is launched (only a "
        "warning under `--sim`, which does not use it)", name="venv_path"),
    Key(PinnedRequirement(), None, "the engine `python -m router.engines setup` installs into `venv_path`, pinned: "
        "`\"vllm==0.11.2\"` (extras allowed: `\"sglang[all]==0.5.3\"`). A venv holding another version is a warning; "
        "instances sharing a venv must declare the same. Needs `using_venv: true`", name="engine_package"),
    Key(Text("a path", r"(?s).*\S.*", "must be a path"), None, "instead of `engine_package`: a requirements file for "
        "`setup` to install (relative paths are from the config file's folder)", name="engine_requirements"),
    Key(Text("a Python module name", r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*",
             "{value!r} is not a Python module name (e.g. vllm)"), None,
        "the module `setup` imports to prove the engine works", name="engine_import",
        shown="the engine's own (`vllm`, `sglang`)"),
    Key(Strings(named=True), (), "more names clients may use for this model: `[llama, llama-1b]`", name="aliases"),
    Key(Flag(), True, "`false`: an engine started elsewhere (maybe another host); routed to, never rendered", name="launch",
        shown="`true` (`false` with a `dns_name`)"),
    Key(Flag(), True, "`false`: never put this model to sleep", name="sleep"),
    Key(Number(1, 2, whole=True), 1, "the tier this model sleeps at. `1`: the weights wait in host RAM (`host_memory_gb`) "
        "and come back in seconds; SGLang needs `--enable-weights-cpu-backup` for it. `2`: the weights are dropped "
        "(no host RAM held) and the wake reads them again from disk: vLLM `wake_up?tags=weights`, `collective_rpc "
        "reload_weights`, `wake_up?tags=kv_cache`, `reset_prefix_cache`; SGLang resume, `update_weights_from_disk`, "
        "`flush_cache` (see \"Sleep tiers\")", name="sleep_level"),
    Key(COUNT, None, "requests in flight to this instance at most; more wait in a queue", name="max_concurrency",
        shown="none (no limit)"),
    Key(Number(0, whole=True), None, "how many may wait; beyond it the router answers 429", name="max_queue",
        shown="`max_concurrency`"),
    Key(Choice(ROUTINGS), "least_outstanding", "which replica of the model takes a request: the least loaded, the same "
        "one per session (`x-session-id` header, else the body's `user`) or per prompt prefix, with bounded load. "
        "The same on every instance of a model (see \"Replica routing\")", name="routing"),
    Key(COUNT, 2048, "`prefix` routing: how many characters of the prompt or messages (their JSON text) make the key",
        name="routing_prefix_chars"),
    Key(Words(), (), "extra flags for the simulated engine under `--sim` only: `[\"--ttft-ms 50 --itl-ms 20\"]`",
        name="sim_args"),
    Key(Flag(), False, "rendered `autostart=false`: the first request for the model starts it through supervisord and "
        "waits for its health check (see \"Residency\")", name="on_demand"),
    Key(POSITIVE, None, "stop the engine after this long idle (in-flight aware; an engine that can sleep sleeps first, at "
        "`idle_threshold_seconds`)", name="idle_stop_seconds"),
    Key(Flag(), False, "never slept or stopped by any policy (idle loop, budgets, idle stop)", name="pin"),
    Key(POSITIVE, None, "what the engine holds on each of its GPUs while awake (required when `residency.gpu_memory_gb` is "
        "set, unless the engine's own share flag gives it). A declared value more than 10% from what the flag gives is a "
        "warning; under kvcached nothing is derived", name="gpu_memory_gb",
        shown="`--gpu-memory-utilization` or `--mem-fraction-static` × the GPU's `residency.gpu_memory_gb`, when given"),
    Key(POSITIVE, None, "what its weights hold in host RAM while asleep at level 1 (required for sleepable engines "
        "when `residency.host_memory_gb` is set; a level-2 sleeper holds none)", name="host_memory_gb"),
    Key(NON_NEGATIVE, 0.0, "what a sleeper still holds on each of its GPUs (its CUDA context), counted against "
        "`residency.gpu_memory_gb` while asleep", name="gpu_sleeping_gb"),
    Key(POSITIVE, None, "this engine's longest start (a 70B model loads longer)", name="start_timeout_seconds",
        shown="`residency.start_timeout_seconds`"),
    Key(POSITIVE, None, "this engine's own limit on a whole non-streaming request, where it differs from the router's (a "
        "70B model's first token)", name="request_timeout_seconds", shown="`router.request_timeout_seconds`"),
    Key(POSITIVE, None, "this engine's own longest silence between two chunks of a stream, where it differs from the "
        "router's", name="stream_idle_timeout_seconds", shown="`router.stream_idle_timeout_seconds`"),
    Key(HOST, None, "the machine that runs this engine (see \"More than one node\")", name="node"),
    Key(Text("a DNS name", DNS_NAME, "{value!r} is not a DNS name; give the headless Service's name "
             "(e.g. engine-a.default.svc.cluster.local)"), None,
        "a DNS name whose every address is a replica of this model (a Kubernetes headless Service: "
        "`engine-a.default.svc.cluster.local`), on `port:` (or the engine's `--port`). Resolved every "
        "`router.dns_refresh_seconds`; the replicas are named `<name>@<address>`. Such an instance runs elsewhere "
        "(`launch` defaults to `false`; `true` is an error) and has no host (see \"More than one node\")", name="dns_name"),
    Key(ADAPTERS, (), "LoRA adapters served as models of their own on this instance's engine: `[{name: sql-expert, path: "
        "/models/loras/sql}]`. Loaded on demand, listed in `/v1/models` with `parent` (see \"LoRA adapters\"); adapters the "
        "engine's `--lora-modules` (vLLM) or `--lora-paths` (SGLang) name are known too, as loaded at start",
        name="lora_adapters"),
    Key(Fields(), {}, "fields set in the model's chat, completions, responses and messages bodies when the client gave "
        "none (missing or null): `{temperature: 0.2}`. Top-level only: a value replaces the client's whole field. Not "
        "`model` or `stream` (see \"Shaping and fallbacks\")", name="request_defaults", shown="none"),
    Key(Fields(), {}, "fields always set in those bodies, replacing the client's: `{max_tokens: 512}`",
        name="request_overrides", shown="none"),
    Key(Strings(named=True), (), "top-level fields removed from those bodies: `[logit_bias, seed]`", name="request_strip"),
    Key(Strings(named=True), (), "models (or aliases) that answer, first that can, a request every replica of this "
        "model failed before its first byte: `[llama-small]`. Every replica of a model declares the same",
        name="fallbacks"),
)
#: Keys of engines started by their own `command` only (EngineSpec.launcher is None).
COMMAND_KEYS = ("command", "host", "port", "health_path")
#: Keys of engines we launch from their Python module (vLLM, SGLang).
INSTANCE_KEYS = tuple(k.name for k in INSTANCE if k.name not in COMMAND_KEYS)
SIZES = ("idle_stop_seconds", "gpu_memory_gb", "host_memory_gb", "start_timeout_seconds", "request_timeout_seconds",
         "stream_idle_timeout_seconds")


@dataclass(frozen=True)
class Instances(Kind[tuple[Instance, ...]]):
    """The ``instances`` list: the entries that could be read (each remembers its position)."""

    @property
    def label(self) -> str:
        return "non-empty list of engine instances"

    @property
    def keys(self) -> tuple[Key[object], ...]:
        return INSTANCE

    @property
    def many(self) -> bool:
        return True

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[Instance, ...]]:
        if not isinstance(value, list) or not value:
            reading.error(where, "must be a non-empty list of engine instances (each with at least 'model' and 'engine')")
            return None
        out = []
        for i, raw in enumerate(value):
            at = f"{where}[{i}]"
            if not isinstance(raw, dict):
                reading.error(at, "must be a mapping with 'model', 'engine' and 'engine_args'")
                continue
            inst = read_instance(raw, at, i, reading)
            if inst is not None:
                out.append(inst)
        return tuple(out)


def read_instance(raw: dict[object, object], where: str, position: int, reading: Reading) -> Optional[Instance]:
    """The instance `raw` declares, or None when a problem leaves no usable instance (each reported)."""
    v = read_keys(INSTANCE, raw, where, reading)
    model, engine = _text(v, "model"), _text(v, "engine")
    ok = model is not None and engine is not None
    name = _text(v, "name")
    if name is None and raw.get("name") is not None:
        ok = False
    elif name is None and model is not None:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", model.rstrip("/").rsplit("/", 1)[-1]).lstrip("_-")[:63] or "model"
    if name is not None and name.lower() in RESERVED_NAMES:
        reading.error(f"{where}.name", f"{name!r} is reserved for the router's own programs; pick another name")
        ok = False

    # An unknown engine's keys are still checked, as those of an engine launched the
    # same way (by `command` or from its module), so every problem shows at once.
    spec = ENGINES[engine] if engine is not None else next(
        (s for s in ENGINES.values() if (s.launcher is None) == ("command" in raw)), None)
    dns_name = _dns_name(_text(v, "dns_name"), where, reading)
    args: tuple[str, ...] = ()
    program: Optional[str] = None
    address: Optional[tuple[str, int]] = None
    health_path = ""
    if spec is not None:
        # With a dns_name, `port` is every engine's key (the addresses come from the name).
        ok = _keys_fit_engine([k for k in raw if not (k == "port" and "dns_name" in raw)], spec, where, reading) and ok
        ok = ok and not (spec.args_key in raw and spec.args_key not in v)
        words = _words(v, spec.args_key)
        if spec.launcher is not None:
            args = words
        elif words:
            program, args = words[0], words[1:]
        if "dns_name" in raw:
            address = _dns_address(raw, v, args, spec, dns_name, where, reading)
        else:
            address = _address(raw, v, args, spec, where, reading)
        health_path = (_text(v, "health_path") if spec.launcher is None else None) or spec.health_path

    flag = {key: v.get(key, default) is True for key, default in (
        ("launch", "dns_name" not in raw), ("sleep", True), ("using_venv", False), ("on_demand", False), ("pin", False))}
    if "dns_name" in raw and flag["launch"]:
        reading.error(f"{where}.launch", "an instance found by its dns_name runs elsewhere and is not launched here; "
                                         "remove 'launch: true' (or the dns_name)")
    if flag["on_demand"] and not flag["launch"]:
        reading.error(f"{where}.on_demand", "an engine started elsewhere (launch: false) cannot be started on demand; "
                                            "remove one of the two")
    if spec is not None and spec.launcher is None and program is None and flag["launch"]:
        reading.error(f"{where}.command", f"missing: engine '{spec.name}' is started by its own command; give the "
                                          "program and its arguments (e.g. command: 'llama-server -m model.gguf --port "
                                          "8001'), or set 'launch: false' for one started elsewhere")
        ok = False
    installs = "engine_package" in raw or "engine_requirements" in raw
    venv_path = _venv_path(raw.get("venv_path"), flag["using_venv"], flag["launch"], installs, where, reading)
    ok = ok and not (flag["using_venv"] and venv_path is None)
    requirements = _requirements(v, flag["using_venv"], where, reading)
    shaping = read_shaping(v, where, reading)

    if not ok or model is None or engine is None or name is None or spec is None or address is None:
        return None
    max_concurrency = v.get("max_concurrency")
    served = tuple(flag_values(args, spec.served_name_flag) if spec.served_name_flag else ()) or (model,)
    return Instance(
        name=name, model=model, engine=engine, engine_args=args, env=(*_env(v, "kvcached_env"), *_env(v, "engine_env")),
        venv_path=venv_path, host=address[0], port=address[1], health_path=health_path, aliases=_words(v, "aliases"),
        served_names=served, launch=flag["launch"], sleep=flag["sleep"],
        max_concurrency=max_concurrency if isinstance(max_concurrency, int) else None,
        max_queue=_int(v.get("max_queue", max_concurrency or 0)), sim_args=_words(v, "sim_args"), program=program,
        on_demand=flag["on_demand"], pin=flag["pin"], node=_text(v, "node"), dns_name=dns_name, position=position,
        sleep_level=_int(v.get("sleep_level", 1)), gpu_sleeping_gb=_float(v.get("gpu_sleeping_gb")) or 0.0,
        engine_package=_text(v, "engine_package"), engine_requirements=requirements,
        engine_import=_text(v, "engine_import"), routing=_text(v, "routing") or "least_outstanding",
        routing_prefix_chars=_int(v.get("routing_prefix_chars", 2048)), shaping=shaping, fallbacks=_words(v, "fallbacks"),
        lora_adapters=_adapters(v, spec, args, where, reading),
        **{key: _float(v.get(key)) for key in SIZES},
    )


# The values read_keys found, as their kinds made them.
def _text(values: dict[str, object], key: str) -> Optional[str]:
    value = values.get(key)
    return value if isinstance(value, str) else None


def _words(values: dict[str, object], key: str) -> tuple[str, ...]:
    value = values.get(key, ())
    return tuple(str(w) for w in value) if isinstance(value, tuple) else ()


def _env(values: dict[str, object], key: str) -> tuple[tuple[str, str], ...]:
    value = values.get(key, ())
    return tuple((str(k), str(x)) for k, x in value) if isinstance(value, tuple) else ()


def _adapters(values: dict[str, object], spec: EngineSpec, args: tuple[str, ...], where: str,
              reading: Reading) -> tuple[LoraAdapter, ...]:
    value = values.get("lora_adapters", ())
    declared = [a for a in value if isinstance(a, LoraAdapter)] if isinstance(value, tuple) else []
    return instance_adapters(declared, spec, args, where, reading)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _float(value: object) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def _venv_path(raw: object, using_venv: bool, launch: bool, installs: bool, where: str,
               reading: Reading) -> Optional[str]:
    """The virtualenv folder, resolved from the config file's folder, when `using_venv`; one that
    is missing is made by `setup` when the instance declares its engine (`installs`)."""
    if not using_venv:
        return None
    if not isinstance(raw, str) or not raw.strip():
        reading.error(f"{where}.venv_path", "using_venv is true but venv_path is missing; give the virtualenv directory "
                                            "or set using_venv: false")
        return None
    vp = Path(os.path.expanduser(raw.strip()))
    venv_path = os.path.normpath(str(vp if vp.is_absolute() else reading.base / vp))
    if not (Path(venv_path) / "bin" / "python").exists() and launch:
        fix = f"create it with {SETUP_HINT}" if installs else "create it"
        msg = (f"virtualenv {venv_path} has no bin/python; {fix} or fix the path (relative paths are from the config "
               "file's folder)")
        (reading.warn if reading.sim else reading.error)(f"{where}.venv_path", msg)
    return venv_path


def _requirements(v: dict[str, object], using_venv: bool, where: str, reading: Reading) -> Optional[str]:
    """The requirements file (absolute), after checking the engine's declaration fits a venv."""
    given = [key for key in ("engine_package", "engine_requirements") if key in v]
    if len(given) == 2:
        reading.error(f"{where}.engine_requirements", "give the engine once: engine_package or engine_requirements, "
                                                      "not both")
    if given and not using_venv:
        reading.error(f"{where}.{given[0]}", "setup installs the engine into venv_path; set using_venv: true and "
                                             "venv_path (or remove it)")
    text = _text(v, "engine_requirements")
    if text is None:
        return None
    path = Path(os.path.expanduser(text.strip()))
    path = path if path.is_absolute() else reading.base / path
    if not path.is_file():
        reading.warn(f"{where}.engine_requirements", f"{path} is not a file; {SETUP_HINT} needs it (relative paths "
                                                     "are from the config file's folder)")
    return os.path.normpath(str(path))


def _dns_name(value: Optional[str], where: str, reading: Reading) -> Optional[str]:
    """The instance's `dns_name`, if it is a name and not an address."""
    if value is None:
        return None
    try:
        ipaddress.ip_address(value.rstrip("."))
    except ValueError:
        return value
    reading.error(f"{where}.dns_name", f"{value!r} is an address, not a name; put it in the engine's --host (or host:) "
                                       "and remove dns_name")
    return None


def _dns_address(raw: dict[object, object], v: dict[str, object], args: tuple[str, ...], spec: EngineSpec,
                 dns_name: Optional[str], where: str, reading: Reading) -> Optional[tuple[str, int]]:
    """(dns_name, port) of an instance found by DNS: the port from `port:` or the engine's port flag."""
    if "host" in raw or last_flag_value(args, spec.host_flag) is not None:
        key = "host" if "host" in raw else spec.args_key
        reading.error(f"{where}.{key}", f"an instance with a dns_name is reached at each address the name resolves to; "
                                        f"remove its host ({'host:' if key == 'host' else spec.host_flag})")
        return None
    port_text = last_flag_value(args, spec.port_flag)
    if "port" in raw and "port" not in v:
        return None  # its kind said why
    port = v.get("port", int(port_text) if port_text is not None and port_text.isdigit() else port_text)
    if port is None:
        reading.error(f"{where}.port", "missing: the router reaches each address of the dns_name on this port; "
                                       "add e.g. 'port: 8000'")
        return None
    if not PORT.fits(port):
        reading.error(f"{where}.port", f"{port!r} is not a port number (1-65535)")
        return None
    if "port" in raw and port_text is not None and str(raw["port"]) != port_text:
        reading.error(f"{where}.port", f"{raw['port']!r} but {spec.args_key} says {spec.port_flag} {port_text}; give one")
        return None
    return (dns_name, int(port)) if dns_name is not None and isinstance(port, int) else None


def _keys_fit_engine(keys: list[object], spec: EngineSpec, where: str, reading: Reading) -> bool:
    """Whether `keys` are only those of `spec`'s way of launching: `engine_args` for an
    engine we launch from its Python module, `command` and its keys for one that is not."""
    if spec.launcher is None:
        if "engine_args" in keys:
            reading.error(f"{where}.engine_args", f"engine '{spec.name}' is started by its own command and takes no "
                                                  "engine_args; put the program and all its arguments in 'command' "
                                                  "(e.g. command: 'llama-server -m model.gguf --port 8001')")
            return False
        return True
    command_engines = ", ".join(s.name for s in ENGINES.values() if s.launcher is None)
    wrong = [key for key in COMMAND_KEYS if key in keys]
    for key in wrong:
        reading.error(f"{where}.{key}", f"only for engines started by their own 'command' (engine: {command_engines}); "
                                        f"{spec.name} is given its address as '{spec.host_flag}'/'{spec.port_flag}' in "
                                        f"engine_args and answers health checks at {spec.health_path}; remove '{key}'")
    return not wrong


def _address(raw: dict[object, object], v: dict[str, object], args: tuple[str, ...], spec: EngineSpec, where: str,
             reading: Reading) -> Optional[tuple[str, int]]:
    """Where the router reaches the engine: the host and port flags of its arguments, or for
    an engine started by its own command the `host:`/`port:` keys; the host defaults to 127.0.0.1."""
    at = f"{where}.{spec.args_key}"
    host = last_flag_value(args, spec.host_flag)
    port_text = last_flag_value(args, spec.port_flag)
    port: Optional[int] = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            reading.error(at, f"{spec.port_flag} {port_text!r} is not a port number (1-65535)")
            return None
        port = int(port_text)
    if spec.launcher is None:
        if any(key in raw and key not in v for key in ("host", "port")):
            return None  # their kinds said why
        for key, flag, from_args in (("host", spec.host_flag, host), ("port", spec.port_flag, port)):
            if key in v and from_args is not None and v[key] != from_args:
                reading.error(f"{where}.{key}", f"{v[key]!r} but the command says {flag} {from_args}; give one of them")
                return None
        host = _text(v, "host") or host
        given = v.get("port")
        port = given if isinstance(given, int) else port
        if port is None:
            reading.error(f"{where}.port", f"no port: the router needs it to reach the engine; add '{spec.port_flag} 8001' "
                                           "to the command or a 'port: 8001' key")
            return None
    elif port is None:
        reading.error(at, f"no '{spec.port_flag}' given; the router needs it to reach the engine (add e.g. "
                          f"'{spec.port_flag}=8001')")
        return None
    return host or "127.0.0.1", port
