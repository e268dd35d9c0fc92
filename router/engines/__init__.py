"""Per-engine knowledge: one module per engine kind, and the registry of them.

Every module of this package but `spec` describes one engine as ``SPEC`` (an
`EngineSpec`); the registry finds them itself, so supporting a new engine is
one new module here and nothing elsewhere.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Mapping

from router.engines.spec import MODEL_PATH, Call, EngineInstance, EngineSpec, LoraApi, PythonModule, Tier, flag_values, has_flag, last_flag_value, split_args

#: Modules of this package that are not engines: the spec, and the engines' environments
#: (``python -m router.engines setup``).
NOT_ENGINES = frozenset({"spec", "installed", "setup", "__main__"})


def engine_modules() -> list[str]:
    """The names of this package's engine modules."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_ENGINES)


def _collect() -> dict[str, EngineSpec]:
    specs = [importlib.import_module(f"{__name__}.{name}").SPEC for name in engine_modules()]
    return {s.name: s for s in sorted(specs, key=lambda s: (s.rank, s.name))}


#: Every engine by name, common ones first.
ENGINES: Mapping[str, EngineSpec] = _collect()

#: Spellings users write for an engine (lower case), mapped to its ENGINES key.
ENGINE_ALIASES: Mapping[str, str] = {
    spelling: spec.name for spec in ENGINES.values() for spelling in (spec.name, *spec.spellings)}

#: ``python -m`` module of the project's simulated engine (router/sim/).
SIM_MODULE = "router.sim"


def sim_argv(python: str, inst: EngineInstance) -> list[str]:
    """The simulated engine standing in for `inst`, on the same host and port.

    The simulator reads the flags of the engines it imitates (host, port,
    served names, max length, key) and ignores the rest, so a launched-module
    engine's args pass through unchanged. A command's flags are some other
    program's, so for those the simulator is told the address and health path.
    """
    spec = ENGINES[inst.engine]
    head = [python, "-m", SIM_MODULE, "--engine", spec.name, "--model", inst.model]
    if spec.launcher is not None:
        return [*head, *inst.engine_args, *inst.sim_args]
    key = spec.api_key(inst.engine_args, dict(inst.env))
    where = ["--host", inst.host, "--port", str(inst.port), "--health-path", inst.health_path]
    return [*head, *where, *(["--api-key", key] if key else []), *inst.sim_args]


__all__ = ["ENGINE_ALIASES", "ENGINES", "MODEL_PATH", "NOT_ENGINES", "SIM_MODULE", "Call", "EngineInstance", "EngineSpec",
           "LoraApi", "PythonModule", "Tier", "engine_modules", "flag_values", "has_flag", "last_flag_value", "sim_argv",
           "split_args"]
