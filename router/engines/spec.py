"""What every engine module describes, and the flag helpers that read engine arguments.

An `EngineSpec` holds everything the rest of the project needs to know about
one kind of inference engine: how to launch it, which of its flags carry the
address, served names, GPU memory share and API key the router relies on,
where its health and sleep endpoints are, what its sleep API needs and which
client paths it serves. Each engine module (vllm.py, sglang.py, openai.py)
defines one as ``SPEC``; the package ``__init__`` collects them, so a new
engine is one new module.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Protocol, Sequence

#: A JSON value of a `Call` that stands for the instance's model path (SGLang's weight reload reads it).
MODEL_PATH = "{model_path}"


@dataclass(frozen=True)
class Call:
    """One HTTP call to an engine's control API."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    json: Optional[dict] = None

    def for_model(self, model: str) -> "Call":
        """This call with every `MODEL_PATH` value of its JSON body set to `model`."""
        if not self.json or MODEL_PATH not in self.json.values():
            return self
        return replace(self, json={k: model if v == MODEL_PATH else v for k, v in self.json.items()})

    def __str__(self) -> str:
        """How messages name the call: ``POST /wake_up?tags=weights``, ``POST /collective_rpc reload_weights``."""
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        method = self.json.get("method") if self.json else None
        return f"{self.method} {self.path}{'?' + query if query else ''}{' ' + method if isinstance(method, str) else ''}"


@dataclass(frozen=True)
class Tier:
    """One depth of sleep: the call that enters it and the calls that wake from it, in order.

    A wake that skips a step is the dangerous failure: the engine answers, with
    wrong text (weights dropped and not read again, or a prefix cache of KV
    computed from them), so the steps live here, next to the engine's other
    API knowledge, rather than in the code that runs them.
    """

    sleep: Call
    wake: tuple[Call, ...]
    #: Launch flags this tier needs, each with why, when every flag of `needs_when` is given
    #: (SGLang frees its weights only with its memory saver, so only then must it back them up).
    needs_args: Mapping[str, str] = field(default_factory=dict)
    needs_when: tuple[str, ...] = ()
    #: Whether its sleep call, sent to an engine asleep at a lighter level, deepens that sleep
    #: (vLLM drops the weights it had offloaded; SGLang's host backup is a launch flag and stays).
    deepens: bool = False


@dataclass(frozen=True)
class LoraApi:
    """An engine's run-time LoRA adapter API: where adapters are loaded and unloaded, and the
    launch flags that enable it, bound how many it holds and name the ones loaded at start.

    Both vLLM and SGLang take ``{"lora_name", "lora_path"}`` to load and ``{"lora_name"}`` to
    unload; a request then names the adapter as its ``model``.
    """

    load_path: str
    unload_path: str
    #: The flag without which the engine serves no adapter at all.
    enable_flag: str
    #: The flag bounding how many adapters the engine holds at once, and its default (None: no bound).
    max_flag: str
    max_default: Optional[int]
    #: The flag naming adapters loaded at start: ``name=path`` words, or JSON ``{"name"|"lora_name", "path"|"lora_path"}``.
    static_flag: str
    #: Whether the engine itself refuses a load beyond its bound (SGLang's --max-loaded-loras); vLLM 0.32
    #: loads beyond --max-loras (measured: tests/real_vllm/FINDINGS.md), so the router keeps the bound.
    bound_enforced: bool = False
    #: Whether `static_flag` alone enables adapters (SGLang), rather than needing `enable_flag` too (vLLM).
    static_enables: bool = False
    #: Words of the engine's refusal to load an adapter it already holds (the router then counts it as
    #: loaded: an engine that kept its adapters over a restart the router did not see).
    already_loaded: Optional[str] = None
    #: Environment the load and unload endpoints need (vLLM's runtime-updating switch).
    needs_env: Mapping[str, str] = field(default_factory=dict)

    def load(self, name: str, path: str) -> Call:
        return Call("POST", self.load_path, json={"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> Call:
        return Call("POST", self.unload_path, json={"lora_name": name})

    def capacity(self, args: Sequence[str]) -> Optional[int]:
        """How many adapters the engine launched with `args` holds at once (None: no bound)."""
        text = last_flag_value(args, self.max_flag)
        return int(text) if text is not None and text.isdigit() and int(text) > 0 else self.max_default

    def preloaded(self, args: Sequence[str]) -> list[tuple[str, str]]:
        """(name, path) of each adapter `args` loads at start; a bare path is its own name."""
        out = []
        for word in flag_values(args, self.static_flag):
            if word.startswith("{"):
                try:
                    entry = json.loads(word)
                except ValueError:
                    continue
                name = entry.get("name", entry.get("lora_name")) if isinstance(entry, dict) else None
                path = entry.get("path", entry.get("lora_path")) if isinstance(entry, dict) else None
                if isinstance(name, str) and isinstance(path, str):
                    out.append((name, path))
            elif "=" in word:
                name, path = word.split("=", 1)
                out.append((name, path))
            elif word:
                out.append((word, word))
        return out


@dataclass(frozen=True)
class PythonModule:
    """An engine started as ``python -m <module> <model_flag> MODEL <engine_args>``."""

    module: str
    #: The flag that names the model to load.
    model_flag: str


class EngineInstance(Protocol):
    """What launching one engine needs of its instance; `router.config.Instance` has it.

    A protocol rather than the config's class, so the engine modules do not
    depend on the config loader that depends on them.
    """

    @property
    def engine(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def engine_args(self) -> tuple[str, ...]: ...
    @property
    def env(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def program(self) -> Optional[str]: ...
    @property
    def python(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def health_path(self) -> str: ...
    @property
    def sim_args(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class EngineSpec:
    """One engine kind. Optional parts are None where the engine lacks them."""

    name: str
    #: Where the engine comes in lists shown to users (error messages, --help): common engines first.
    rank: int
    #: Other spellings users may write in `engine:` (any case), e.g. ``sgl``.
    spellings: tuple[str, ...]
    #: How it is launched; None: by the instance's own `command` (program first), run as given.
    launcher: Optional[PythonModule]
    #: Client paths the engine's OpenAI server answers, one per path.
    client_paths: tuple[str, ...]
    #: GET path answering 200 while the engine can serve (an instance may override it where allowed).
    health_path: str
    #: The simulator dialect (router/sim/dialects.py) that imitates this engine under ``--sim``.
    sim_dialect: str
    #: The port the engine listens on when no port flag is given (None: it has none).
    default_port: Optional[int] = None
    #: The flags giving the address the engine binds to; the router dials the same.
    host_flag: str = "--host"
    port_flag: str = "--port"
    #: The flag naming what the engine answers to besides the model (None: the model is its only name).
    served_name_flag: Optional[str] = None
    #: Whether `served_name_flag` takes just one name (SGLang) rather than several (vLLM).
    one_served_name: bool = False
    #: The flag giving the engine's share of GPU memory, and its default.
    gpu_fraction_flag: Optional[str] = None
    gpu_fraction_default: Optional[float] = None
    #: The sleep API by level (`sleep_level`): empty where the engine has none (its models are then
    #: never put to sleep).
    tiers: Mapping[int, Tier] = field(default_factory=dict)
    #: The sleep call's query parameter that says what happens to running requests
    #: (vLLM's ``mode``: ``abort`` or ``wait``), set from ``sleep_manager.vllm_sleep_mode``;
    #: such a call may last as long as the requests, so it gets ``vllm_sleep_timeout_seconds``.
    sleep_mode_param: Optional[str] = None
    #: GET path answering ``{"is_sleeping": bool}``, where the engine has one.
    is_sleeping_path: Optional[str] = None
    #: What the engine needs for its sleep API: env vars, and launch flags each
    #: with a note on when it applies (empty when always).
    sleep_needs_env: Mapping[str, str] = field(default_factory=dict)
    sleep_needs_args: Mapping[str, str] = field(default_factory=dict)
    #: The container image that runs this engine under Kubernetes, where there is a standard one.
    image: Optional[str] = None
    #: The flag giving the bearer key the engine's own OpenAI server requires.
    api_key_flag: str = "--api-key"
    #: The environment variable the engine takes its key from when the flag is not given.
    api_key_env: Optional[str] = None
    #: (flag, value) under which the engine orders its queue by the request body's integer `priority`,
    #: lower first (vLLM's ``--scheduling-policy priority``); the router then sends a key's class there.
    priority_policy: Optional[tuple[str, str]] = None
    #: Its run-time LoRA adapter API (None: the router cannot load adapters into it).
    lora: Optional[LoraApi] = None

    @property
    def has_sleep_api(self) -> bool:
        return bool(self.tiers)

    def sleep_request(self, level: int, mode: str, mode_timeout: float, timeout: float) -> tuple[Optional[Call], float]:
        """The call that puts the engine to sleep at `level` and how long to wait for it: with the
        engine's mode parameter set to `mode` (and `mode_timeout`) where it has one, else as declared
        (and `timeout`). None where the engine has no such tier."""
        tier = self.tiers.get(level)
        if tier is None or self.sleep_mode_param is None:
            return (tier.sleep if tier else None), timeout
        return replace(tier.sleep, params={**tier.sleep.params, self.sleep_mode_param: mode}), mode_timeout

    def wake_sequence(self, level: int, model: str) -> tuple[Call, ...]:
        """The calls that wake `model` from a sleep at `level`, in the order they must run (empty
        where the engine has no such tier)."""
        tier = self.tiers.get(level)
        return tuple(c.for_model(model) for c in tier.wake) if tier else ()

    def deepens_to(self, level: int) -> bool:
        """Whether a sleeping engine can be moved to `level` by that tier's sleep call."""
        tier = self.tiers.get(level)
        return tier is not None and tier.deepens

    def tier_missing(self, level: int, args: Sequence[str]) -> dict[str, str]:
        """The flags `args` lack for a sleep at `level` to keep the answers right, each with why."""
        tier = self.tiers.get(level)
        if tier is None or not all(has_flag(args, f) for f in tier.needs_when):
            return {}
        return {flag: why for flag, why in tier.needs_args.items() if not has_flag(args, flag)}

    @property
    def args_key(self) -> str:
        """The instance key holding this engine's arguments, for messages naming the field."""
        return "engine_args" if self.launcher is not None else "command"

    def launch_argv(self, inst: EngineInstance) -> list[str]:
        """The command that starts `inst`: its python running our module, or its own command."""
        if self.launcher is not None:
            return [inst.python, "-m", self.launcher.module, self.launcher.model_flag, inst.model, *inst.engine_args]
        if inst.program is None:
            raise ValueError(f"{self.name} engine for {inst.model!r} has no command to launch it; give 'command'")
        return [inst.program, *inst.engine_args]

    def sleep_api_missing(self, args: Sequence[str], env: Mapping[str, str]) -> list[str]:
        """What `args` and `env` lack for the sleep API, for a warning: a flag only some
        builds need carries its note, so the warning is right on every build."""
        missing = [f"{k}={v}" for k, v in self.sleep_needs_env.items() if env.get(k) != v]
        missing += [f"{flag} ({note})" if note else flag for flag, note in self.sleep_needs_args.items() if flag not in args]
        return missing

    def api_key(self, args: Sequence[str], env: Mapping[str, str]) -> Optional[str]:
        """The key the engine requires, from its flag or else its environment variable."""
        key = last_flag_value(args, self.api_key_flag)
        if not key and self.api_key_env:
            key = env.get(self.api_key_env)
        return key or None

    def orders_by_priority(self, args: Sequence[str]) -> bool:
        """Whether an engine started with `args` orders its queue by the body's `priority`."""
        return self.priority_policy is not None and last_flag_value(args, self.priority_policy[0]) == \
            self.priority_policy[1]

    def redacted(self, args: Sequence[str]) -> tuple[str, ...]:
        """`args` with every value of `api_key_flag` masked, for repr: the words after the
        flag up to the next flag (the first one even if it looks like a flag)."""
        out: list[str] = []
        masking = False
        for arg in args:
            if masking and (not arg.startswith("--") or out[-1] == self.api_key_flag):
                arg = "***"
            elif arg.startswith(self.api_key_flag + "="):
                arg = f"{self.api_key_flag}=***"
            else:
                masking = arg == self.api_key_flag
            out.append(arg)
        return tuple(out)


def has_flag(args: Sequence[str], flag: str) -> bool:
    """Whether `flag` is given, bare or as ``--flag=value``."""
    return any(a == flag or a.startswith(flag + "=") for a in args)


def split_args(args: Sequence[str] | str) -> list[str]:
    """Shell-split each item, so ``"--gpu-memory-utilization 0.5"`` is two args."""
    items = [args] if isinstance(args, str) else list(args)
    out: list[str] = []
    for item in items:
        out.extend(shlex.split(item))
    return out


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """Every value given for `flag`, in both ``--f v`` and ``--f=v`` forms.

    A flag followed by several non-flag words (vLLM's ``--served-model-name a b``)
    yields each of them.
    """
    values: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == flag:
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                values.append(args[j])
                j += 1
            i = j
            continue
        if arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1:])
        i += 1
    return values


def last_flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    """The value an argparse-style engine would use: the last one given."""
    for i in range(len(args) - 1, -1, -1):
        arg = args[i]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None
