"""Writing the manifests of ``render --target kubernetes`` into their folder, the way tree.py writes a node's."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from router.render.files import DIR_MODE, Files
from router.render.tree import _write_file

KUSTOMIZATION = "kustomization.yaml"


def write_manifests(out: Path, files: Files) -> list[str]:
    """Write `files` into `out` so a failure leaves the previous manifests intact; return the
    manifests of the previous rendering that this one no longer has, which are removed.

    Every file is staged inside `out` (same file system) and renamed into
    place, kustomization.yaml last, so it never lists a file not yet there.
    Only files the previous kustomization.yaml listed are ever removed: the
    folder may hold the user's own files too.
    """
    out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    gone = sorted(set(_listed(out)) - set(files))
    stage = Path(tempfile.mkdtemp(prefix=".render-", dir=out))
    try:
        for rel, (text, mode) in files.items():
            _write_file(stage / rel, text, mode)
        for rel in sorted(files, key=lambda r: r == KUSTOMIZATION):
            os.replace(stage / rel, out / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for rel in gone:
        (out / rel).unlink(missing_ok=True)
    return gone


def _listed(out: Path) -> list[str]:
    """The plain file names the folder's kustomization.yaml lists (none when it is missing or not ours)."""
    try:
        doc = yaml.safe_load((out / KUSTOMIZATION).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    resources = doc.get("resources") if isinstance(doc, dict) else None
    return [r for r in resources or [] if isinstance(r, str) and r == Path(r).name and r.endswith(".yaml")]
