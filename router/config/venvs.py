"""The engine environments a config declares: which package each venv holds, and whether it does.

An instance names its engine once, as a pinned requirement (``engine_package:
"vllm==0.11.2"``) or a requirements file (``engine_requirements``);
``python -m router.engines setup`` builds each ``venv_path`` from it, and every
load of the config compares what a venv has with what the YAML pins (a
warning: the engine may still run, just not the version the YAML says).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from packaging.requirements import InvalidRequirement, Requirement

from router.config.instance import Instance
from router.config.problems import Reading
from router.config.schema import Kind
from router.engines.installed import installed_version

#: The hint every message about a venv's contents ends with.
SETUP_HINT = "python -m router.engines setup --config FILE"


@dataclass(frozen=True)
class PinnedRequirement(Kind[str]):
    """A pip requirement pinned to one version (``name==version``, extras allowed), so every
    node that runs `setup` installs the same engine."""

    @property
    def label(self) -> str:
        return "a pip requirement pinned with `==`"

    def read(self, value: object, where: str, reading: Reading) -> Optional[str]:
        if not isinstance(value, str):
            reading.error(where, f"must be a pip requirement pinned with '==' (e.g. 'vllm==0.11.2'), not {value!r}")
            return None
        try:
            req = Requirement(value)
        except InvalidRequirement as e:
            reading.error(where, f"{value!r} is not a pip requirement ({str(e).splitlines()[0]}); e.g. 'vllm==0.11.2'")
            return None
        if req.url is not None or pinned(req) is None:
            reading.error(where, f"{value!r} is not pinned to one version; write it as '{req.name}==VERSION' so every "
                                 "setup installs the same engine (or use engine_requirements for anything else)")
            return None
        return value.strip()


def pinned(req: Requirement) -> Optional[str]:
    """The one version `req` allows (``==1.2``), or None when it allows a range or has no pin."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return specs[0].version
    return None


def declared(inst: Instance) -> Optional[Requirement]:
    """The requirement the instance pins with `engine_package`, or None (none pinned)."""
    return Requirement(inst.engine_package) if inst.engine_package is not None else None


def satisfies(req: Requirement, version: Optional[str]) -> bool:
    """Whether an installed `version` is the one `req` pins (``==0.11`` is met by 0.11.0)."""
    return version is not None and req.specifier.contains(version, prereleases=True)


def check_venvs(instances: tuple[Instance, ...], reading: Reading) -> None:
    """Instances sharing a venv must declare the same engine (setup cannot build it both ways);
    a venv that exists but holds another version of its pinned engine is a warning."""
    owners: dict[str, Instance] = {}
    for inst in instances:
        where = f"instances[{inst.position}]"
        if inst.venv_path is None:
            continue
        first = owners.setdefault(inst.venv_path, inst)
        mine, theirs = (inst.engine_package, inst.engine_requirements), (first.engine_package, first.engine_requirements)
        if first is not inst and any(mine) and any(theirs) and mine != theirs:
            key = "engine_package" if inst.engine_package else "engine_requirements"
            reading.error(f"{where}.{key}", f"venv {inst.venv_path} is also instance {first.name!r}'s, which declares "
                                            f"{first.engine_package or first.engine_requirements!r}; give both the same "
                                            "engine or each its own venv_path")
        pin = declared(inst)
        if reading.sim or not inst.launch or pin is None or not (Path(inst.venv_path) / "bin" / "python").exists():
            continue
        has = installed_version(inst.venv_path, pin.name)
        if not satisfies(pin, has):
            now = f"has {pin.name} {has}" if has else f"has no {pin.name}"
            reading.warn(f"{where}.engine_package", f"venv {inst.venv_path} {now}, but the config pins "
                                                    f"{inst.engine_package}; run {SETUP_HINT}")
