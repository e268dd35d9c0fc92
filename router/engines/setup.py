"""``python -m router.engines setup``: build each engine virtualenv the config declares.

Each distinct ``venv_path`` of a launched instance gets the engine its instances pin
(``engine_package: "vllm==0.11.2"``, or ``engine_requirements``) and kvcached when one
of them enables it (``ENABLE_KVCACHED`` in ``kvcached_env`` or the ``kvcached`` block).
What is already there is looked up first (the venv's own package metadata), so a second
run installs nothing; a requirements file is installed again only when its text changed
(its digest is noted in the venv). Every venv ends with its engine imported by the venv's
own python, which proves the build and reports the version.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from packaging.requirements import Requirement

from router.config import Config, Instance
from router.config.venvs import satisfies
from router.engines.installed import installed_version

#: The distribution that brings kvcached (https://github.com/ovg-project/kvcached).
KVCACHED_PACKAGE = "kvcached"
#: Where setup notes the digest of the requirements file it installed, inside the venv.
STAMP = ".kvrouter-requirements.sha256"
#: Lines of a failed command's output shown.
TAIL_LINES = 30

#: Run by the venv's python: import the engine, print its version (distribution's, else the module's).
CHECK_SCRIPT = """\
import importlib, importlib.metadata as m, sys
module = importlib.import_module(sys.argv[1])
try:
    print(m.version(sys.argv[2]))
except m.PackageNotFoundError:
    print(getattr(module, "__version__", "unknown"))
"""


class SetupError(Exception):
    """A step failed; the message says which, with its command's output."""


@dataclass(frozen=True)
class Installer:
    """How venvs are made and filled: ``uv`` when it is on PATH (much faster), else venv and pip."""

    name: str
    #: The interpreter new venvs are made from.
    python: str

    @staticmethod
    def find(python: str) -> Installer:
        return Installer("uv" if shutil.which("uv") else "pip", python)

    def create(self, venv: str) -> list[str]:
        if self.name == "uv":
            return ["uv", "venv", "--seed", "--python", self.python, venv]
        return [self.python, "-m", "venv", venv]

    def install(self, venv: str, args: Sequence[str]) -> list[str]:
        if self.name == "uv":
            return ["uv", "pip", "install", "--python", f"{venv}/bin/python", *args]
        return [f"{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check", *args]


@dataclass(frozen=True)
class Step:
    """One command of a venv's build, and why it is needed."""

    what: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class VenvPlan:
    """One venv: what the config wants in it, what it has, and the steps between the two."""

    path: str
    instances: tuple[str, ...]
    #: What the instances declare: the pinned requirement, or ``-r FILE``.
    engine: str
    #: The pinned engine_package; None for a requirements file.
    pin: Optional[Requirement]
    #: The module whose import proves the engine works, and the distribution its version is read from.
    module: str
    distribution: str
    steps: tuple[Step, ...]
    #: What is already there, for the plan's words.
    found: tuple[str, ...]

    def lines(self) -> list[str]:
        head = f"{self.path} (for {', '.join(self.instances)}): {self.engine}"
        body = [f"  - {s.what}: {' '.join(s.argv)}" for s in self.steps] or ["  - nothing to install"]
        return [head, *(f"  = {f}" for f in self.found), *body, f"  - check: import {self.module} and report its version"]


def requirements_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plan(cfg: Config, installer: Installer) -> tuple[list[VenvPlan], list[str]]:
    """The venvs to build, one per distinct venv_path of a launched instance that declares its
    engine; and a note for each launched instance setup leaves alone."""
    by_venv: dict[str, list[Instance]] = {}
    notes = []
    for inst in cfg.launched:
        if inst.venv_path is None or not (inst.engine_package or inst.engine_requirements):
            if inst.engine_module is not None:
                notes.append(f"{inst.name}: no engine_package or engine_requirements (with using_venv and venv_path); "
                             "left alone")
            continue
        by_venv.setdefault(inst.venv_path, []).append(inst)
    return [_venv_plan(path, insts, installer) for path, insts in by_venv.items()], notes


def _venv_plan(path: str, insts: list[Instance], installer: Installer) -> VenvPlan:
    first = insts[0]  # the config's checks made every instance of one venv declare the same engine
    module = first.engine_module or ""
    steps: list[Step] = []
    found: list[str] = []
    exists = (Path(path) / "bin" / "python").exists()
    if exists:
        found.append("the venv exists")
    else:
        steps.append(Step("create the venv", tuple(installer.create(path))))
    pin: Optional[Requirement] = None
    if first.engine_package is not None:
        req = Requirement(first.engine_package)
        pin, distribution, engine = req, req.name, first.engine_package
        has = installed_version(path, req.name) if exists else None
        if satisfies(req, has):
            found.append(f"{req.name} {has} is installed")
        else:
            why = f"install {engine}" + (f" (has {has})" if has else "")
            steps.append(Step(why, tuple(installer.install(path, [engine]))))
    else:
        assert first.engine_requirements is not None
        if not Path(first.engine_requirements).is_file():
            raise SetupError(f"instances[{first.position}].engine_requirements: {first.engine_requirements} is not a "
                             "file; create it or fix the path (relative paths are from the config file's folder)")
        distribution, engine = module, f"-r {first.engine_requirements}"
        stamp = Path(path) / STAMP
        digest = requirements_digest(first.engine_requirements)
        if exists and stamp.is_file() and stamp.read_text().strip() == digest:
            found.append(f"{first.engine_requirements} is installed as it is now")
        else:
            steps.append(Step(f"install {engine}", tuple(installer.install(path, ["-r", first.engine_requirements]))))
    if any(i.kvcached for i in insts):
        has_kv = installed_version(path, KVCACHED_PACKAGE) if exists else None
        if has_kv:
            found.append(f"{KVCACHED_PACKAGE} {has_kv} is installed")
        else:
            steps.append(Step(f"install {KVCACHED_PACKAGE} (ENABLE_KVCACHED is on)",
                              tuple(installer.install(path, [KVCACHED_PACKAGE]))))
    return VenvPlan(path, tuple(i.name for i in insts), engine, pin, module, distribution, tuple(steps), tuple(found))


def run(argv: Sequence[str]) -> None:
    """Run one step, its output kept for the error that names it."""
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except OSError as e:
        raise SetupError(f"cannot run {argv[0]}: {e}")
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-TAIL_LINES:])
        raise SetupError(f"{' '.join(argv)} exited with {done.returncode}:\n{tail}")


def check_engine(venv: VenvPlan) -> str:
    """The engine's version as the venv's python imports it, or SetupError saying why it does not."""
    argv = [f"{venv.path}/bin/python", "-c", CHECK_SCRIPT, venv.module, venv.distribution]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-TAIL_LINES:])
        raise SetupError(f"{venv.path}: 'import {venv.module}' fails in the venv:\n{tail}")
    version = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"
    if venv.pin is not None and not satisfies(venv.pin, version):
        raise SetupError(f"{venv.path}: {venv.module} reports version {version}, but the config pins {venv.engine}")
    return version


def build(venv: VenvPlan, started: Callable[[str], None], finished: Callable[[], None]) -> str:
    """Carry out `venv`'s steps, then check its engine; its version. `started` and `finished`
    bracket each step and the check, for a progress display."""
    for step in venv.steps:
        started(step.what)
        run(step.argv)
        finished()
    if venv.pin is None and venv.steps:
        req = venv.engine.removeprefix("-r ")
        (Path(venv.path) / STAMP).write_text(requirements_digest(req) + "\n")
    started(f"import {venv.module}")
    version = check_engine(venv)
    finished()
    return version
