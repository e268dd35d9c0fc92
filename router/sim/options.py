"""What a simulated engine is told: the engine's own flags it honours, plus knobs.

The renderer's ``--sim`` mode passes a vLLM or SGLang instance's real
engine_args through unchanged, so the parser takes the flags that change what
a client sees (host, port, served names, context length, batch size) in both
engines' spellings and ignores every other engine flag instead of failing on
it. Engine names, default ports and key variables come from router.engines.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

from router.engines import ENGINE_ALIASES, ENGINES

#: The context length when none is given (or vLLM's ``auto``: the model's own, which we do not have).
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class SimOptions:
    engine: str
    model: str
    host: str = "127.0.0.1"
    #: 0 picks a free port (in-process use); the bound port is `SimEngine.port`.
    port: int = 0
    #: Names the engine answers to; empty means just `model`.
    served_model_names: tuple[str, ...] = ()
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    #: Requests running at once; 0 = unlimited. Beyond it requests wait.
    max_concurrency: int = 0
    startup_s: float = 0.0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    fail_rate: float = 0.0
    die_after: int = 0
    stall_after: int = 0
    hang: bool = False
    seed: int = 0
    #: The engine's own --api-key (vLLM: else $VLLM_API_KEY): requests it guards need ``Authorization: Bearer <key>``.
    api_key: str = ""
    #: Where GET answers 200 while the engine is up (the engine's own, or an openai instance's health_path).
    health_path: str = "/health"
    #: Sleep tiers (router.sim.memory): seconds a level-1 sleep takes to copy the weights to host RAM
    #: (vLLM level 1; SGLang's release with a CPU backup), a level-1 wake to copy them back, and a
    #: level-2 reload to read them from disk (vLLM's reload_weights; SGLang's update_weights_from_disk).
    sleep_s: float = 0.0
    wake_s: float = 0.0
    reload_s: float = 0.0
    #: SGLang's --enable-memory-saver: release_memory_occupation really frees the weights.
    memory_saver: bool = False
    #: SGLang's --enable-weights-cpu-backup: released weights are kept in host RAM and come back on resume.
    weights_cpu_backup: bool = False
    #: Seconds a LoRA adapter load takes (reading it from disk).
    lora_load_s: float = 0.0
    #: Every engine flag given, as given: what the engine's LoRA flags say is read from them (router/sim/lora.py).
    argv: tuple[str, ...] = field(default=(), compare=False)
    #: Engine flags given but not understood (logged once, otherwise ignored).
    ignored_args: tuple[str, ...] = field(default=(), compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)

    @property
    def public_name(self) -> str:
        """The name /v1/models and responses report: the first served name."""
        return self.names[0]


def model_len(text: str) -> int:
    """A context length as vLLM 0.32 reads ``--max-model-len``, so a real config runs under
    ``--sim``: ``4096``, ``32k`` (x1000), ``32K`` (x1024, whole numbers only), ``auto`` or ``-1``."""
    value = text.strip()
    if value == "-1" or value.lower() == "auto":
        return DEFAULT_MAX_MODEL_LEN
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt])", value, re.IGNORECASE)
    if m is None:
        return int(value)
    number, suffix = m.groups()
    power = "kmgt".index(suffix.lower()) + 1
    return int(float(number) * 1000 ** power) if suffix.islower() else int(number) * 1024 ** power


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors without a traceback and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"python -m router.sim: error: {message}\n"
                     f"usage: python -m router.sim --engine {'|'.join(ENGINES)} --model NAME --port P [options]\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m router.sim", allow_abbrev=False,
                description="Simulated OpenAI server of any engine (no GPU). Unknown engine flags are ignored.")
    p.add_argument("--engine", required=True, type=str.lower, choices=tuple(ENGINE_ALIASES))
    p.add_argument("--model", "--model-path", dest="model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--served-model-name", dest="served", nargs="+", default=None)
    p.add_argument("--api-key", dest="api_key", default="")
    p.add_argument("--health-path", default=None, help="the health check's path (default: the engine's own)")
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=model_len,
                   default=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--enable-memory-saver", dest="memory_saver", action="store_true",
                   help="SGLang: release_memory_occupation frees the weights (see --enable-weights-cpu-backup)")
    p.add_argument("--enable-weights-cpu-backup", dest="weights_cpu_backup", action="store_true",
                   help="SGLang: released weights are kept in host RAM and restored on resume")
    p.add_argument("--max-num-seqs", "--max-running-requests", dest="batch", type=int, default=0,
                   help="the engine's batch size; used as --max-concurrency when that is not given")
    # LoRA flags, read from argv by router/sim/lora.py with the engine's own rules.
    for flag in ("--max-loras", "--max-loaded-loras"):
        p.add_argument(flag, type=int, default=None)
    for flag in ("--lora-modules", "--lora-paths"):
        p.add_argument(flag, nargs="+", default=None)
    p.add_argument("--enable-lora", action="store_true")
    g = p.add_argument_group("simulation knobs")
    g.add_argument("--startup-s", type=float, default=0.0, help="seconds before the server listens (model load)")
    g.add_argument("--ttft-ms", type=float, default=0.0, help="time to first token")
    g.add_argument("--itl-ms", type=float, default=0.0, help="time per further output token")
    g.add_argument("--max-concurrency", type=int, default=None, help="running requests at once; more queue")
    g.add_argument("--fail-rate", type=float, default=0.0, help="fraction of generations answered 500")
    g.add_argument("--die-after", type=int, default=0, help="exit abruptly during generation request N")
    g.add_argument("--stall-after", type=int, default=0, help="streams stop sending after N chunks")
    g.add_argument("--hang", action="store_true", help="never answer generation requests")
    g.add_argument("--sleep-s", type=float, default=0.0, help="a level-1 sleep's time (weights to host RAM)")
    g.add_argument("--wake-s", type=float, default=0.0, help="a level-1 wake's time (weights back from host RAM)")
    g.add_argument("--reload-s", type=float, default=0.0, help="a level-2 reload's time (weights from disk)")
    g.add_argument("--lora-load-s", type=float, default=0.0, help="a LoRA adapter load's time")
    g.add_argument("--seed", type=int, default=0, help="seed of the --fail-rate draws")
    return p


def parse_options(argv: Sequence[str]) -> SimOptions:
    """argv -> SimOptions; exits 2 with a clear message on a bad value."""
    p = _parser()
    ns, unknown = p.parse_known_args(list(argv))
    spec = ENGINES[ENGINE_ALIASES[ns.engine]]
    problems = []
    if ns.port is not None and not 0 <= ns.port <= 65535:
        problems.append(f"--port {ns.port} is not a port number (0-65535)")
    if ns.port is None and spec.default_port is None:
        problems.append(f"--port is required: a {spec.name} engine has no default port")
    if ns.health_path is not None and not ns.health_path.startswith("/"):
        problems.append(f"--health-path {ns.health_path!r} must start with '/'")
    if ns.max_model_len < 1:
        problems.append("--max-model-len must be at least 1")
    if not 0.0 <= ns.fail_rate <= 1.0:
        problems.append(f"--fail-rate {ns.fail_rate} must be between 0 and 1")
    for flag in ("startup_s", "ttft_ms", "itl_ms", "sleep_s", "wake_s", "reload_s", "lora_load_s"):
        if getattr(ns, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must not be negative")
    for flag in ("die_after", "stall_after", "batch"):
        if getattr(ns, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must not be negative")
    if ns.max_concurrency is not None and ns.max_concurrency < 0:
        problems.append("--max-concurrency must not be negative")
    if spec.one_served_name and ns.served and len(ns.served) > 1:
        problems.append(f"{spec.name}'s --served-model-name takes one name")
    if problems:
        p.error("; ".join(problems))
    api_key = ns.api_key or (os.environ.get(spec.api_key_env, "") if spec.api_key_env else "")
    return SimOptions(
        engine=spec.name, model=ns.model, host=ns.host,
        port=(spec.default_port or 0) if ns.port is None else ns.port,
        health_path=ns.health_path or spec.health_path,
        served_model_names=tuple(ns.served or ()), max_model_len=ns.max_model_len,
        max_concurrency=ns.batch if ns.max_concurrency is None else ns.max_concurrency,
        startup_s=ns.startup_s, ttft_ms=ns.ttft_ms, itl_ms=ns.itl_ms, fail_rate=ns.fail_rate,
        die_after=ns.die_after, stall_after=ns.stall_after, hang=ns.hang, seed=ns.seed, api_key=api_key,
        sleep_s=ns.sleep_s, wake_s=ns.wake_s, reload_s=ns.reload_s, memory_saver=ns.memory_saver,
        weights_cpu_backup=ns.weights_cpu_backup, ignored_args=tuple(unknown), argv=tuple(argv),
        lora_load_s=ns.lora_load_s,
    )
