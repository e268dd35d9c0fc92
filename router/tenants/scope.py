"""Which models a key may use: globs over model names and aliases (``Qwen/*``), case-sensitive."""
from __future__ import annotations

import fnmatch
from typing import Iterable, Optional


def allows(globs: tuple[str, ...], names: Iterable[str]) -> bool:
    """Whether one of `globs` matches one of `names` (a model's name and its aliases)."""
    return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)


def allowed(globs: Optional[tuple[str, ...]], models: dict[str, tuple[str, ...]]) -> Optional[frozenset[str]]:
    """The models (of `models`: model -> its name and aliases) a key with `globs` may use; None: all."""
    if globs is None:
        return None
    return frozenset(m for m, names in models.items() if allows(globs, names))
