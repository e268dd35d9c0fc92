"""What a virtualenv has installed, read from its site-packages without running its python.

`render --check` compares each venv's engine version with the one the YAML pins on
every load, so it must be cheap and must not start an interpreter that imports CUDA
libraries: the installed distributions' metadata (``*.dist-info``) says it all.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Optional


def site_packages(venv: str | Path) -> list[str]:
    """The venv's site-packages folders (``lib/pythonX.Y`` and ``lib64``), those that exist."""
    root = Path(venv)
    return [str(p) for lib in ("lib", "lib64") for p in sorted((root / lib).glob("python*/site-packages")) if p.is_dir()]


def installed_version(venv: str | Path, distribution: str) -> Optional[str]:
    """The version of `distribution` (any spelling: ``Foo_Bar`` finds ``foo-bar``) installed in
    `venv`, or None when it is not there (or the venv does not exist)."""
    paths = site_packages(venv)
    if not paths:
        return None
    for dist in metadata.distributions(name=distribution, path=paths):
        return dist.version
    return None
