"""The one table of per-engine knowledge.

Everything the rest of the project needs to know about an inference engine
(how to launch it, where its health and sleep endpoints are, what its sleep
API needs, which flags carry its GPU memory share and its own API key) lives
in one `EngineSpec` entry, so supporting a new engine is one entry here (and
its spellings in ENGINE_ALIASES) and nothing elsewhere. The flags both engines
share (``--host``, ``--port``, ``--served-model-name``) are read by config.py.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class Call:
    """One HTTP call to an engine's control API."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    json: Optional[dict] = None


@dataclass(frozen=True)
class EngineSpec:
    name: str
    #: ``python -m <module>`` launches the engine's OpenAI server.
    module: str
    #: The flag that names the model to load.
    model_flag: str
    #: The flag giving this engine's share of GPU memory, and its default.
    gpu_fraction_flag: str
    gpu_fraction_default: Optional[float]
    health_path: str
    sleep_call: Call
    wake_call: Call
    #: GET path answering ``{"is_sleeping": bool}``, where the engine has one.
    is_sleeping_path: Optional[str]
    #: What the engine needs for its sleep API: env vars, and launch flags each
    #: with a note on when it applies (empty when always).
    sleep_needs_env: Mapping[str, str]
    sleep_needs_args: Mapping[str, str]

    #: The flag giving the bearer key the engine's own OpenAI server requires (both use --api-key).
    api_key_flag: str = "--api-key"
    #: The environment variable the engine takes its key from when the flag is not given.
    api_key_env: Optional[str] = None

    def launch_argv(self, python: str, model: str, args: Sequence[str]) -> list[str]:
        return [python, "-m", self.module, self.model_flag, model, *args]

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


ENGINES: Mapping[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm",
        module="vllm.entrypoints.openai.api_server",
        model_flag="--model",
        gpu_fraction_flag="--gpu-memory-utilization",
        gpu_fraction_default=0.9,
        health_path="/health",
        # level=1 offloads the weights to CPU RAM and /wake_up restores them; level 2
        # discards them and would need a weight reload the router does not do.
        # mode=wait: recent vLLM finishes running requests instead of aborting
        # them (its default); older vLLM ignores the parameter. See lifecycle.py.
        sleep_call=Call("POST", "/sleep", {"level": "1", "mode": "wait"}),
        wake_call=Call("POST", "/wake_up"),
        is_sleeping_path="/is_sleeping",
        sleep_needs_env={"VLLM_SERVER_DEV_MODE": "1"},
        # CPU builds refuse --enable-sleep-mode yet serve the sleep API in dev mode.
        sleep_needs_args={"--enable-sleep-mode": "GPU builds only; CPU builds refuse it and need just VLLM_SERVER_DEV_MODE=1"},
        api_key_env="VLLM_API_KEY",  # vLLM 0.32: --api-key wins over it
    ),
    "sglang": EngineSpec(
        name="sglang",
        module="sglang.launch_server",
        model_flag="--model-path",
        gpu_fraction_flag="--mem-fraction-static",
        gpu_fraction_default=None,  # SGLang sizes it from the GPU itself
        health_path="/health",
        sleep_call=Call("POST", "/release_memory_occupation", json={}),
        wake_call=Call("POST", "/resume_memory_occupation", json={}),
        is_sleeping_path=None,
        sleep_needs_env={},
        sleep_needs_args={"--enable-memory-saver": ""},
    ),
}

#: Spellings users write for an engine, mapped to its ENGINES key.
ENGINE_ALIASES: Mapping[str, str] = {"vllm": "vllm", "sglang": "sglang", "sgl": "sglang"}

#: ``python -m`` module of the project's simulated engine (router/sim/).
SIM_MODULE = "router.sim"


def sim_argv(python: str, engine: str, model: str, args: Sequence[str], sim_args: Sequence[str]) -> list[str]:
    """The simulated engine stands in for `engine`, taking the same arguments.

    The simulator parses the engine's own flags it understands (host, port,
    served names, max length) and ignores the rest, so the instance's
    engine_args pass through unchanged.
    """
    return [python, "-m", SIM_MODULE, "--engine", engine, "--model", model, *args, *sim_args]


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
