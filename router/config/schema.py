"""One declaration per YAML key: its kind (type and bounds), its default and a one-line doc.

A settings dataclass declares each key on its field (``port: int = setting(PORT, 8080,
"its port", key="router_port")``); the instance keys, which do not map one to one on
`Instance`'s fields, are a tuple of `Key`. Everything else is read from the
declarations: the parser (`read_keys`, `read_section`), its messages (each kind says
what a value must be), the did-you-mean on an unknown key, and the configuration
reference (`router.config.reference`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import Field, dataclass, field, fields, replace
from functools import cache
from typing import Any, Generic, Optional, TypeVar

from router.config.problems import Reading, join

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a key the file must give.
REQUIRED = _Required()


class Kind(ABC, Generic[T_co]):
    """How one YAML value is read: what it must be, and the message that says so."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What a value must be, in words (the reference's type column)."""

    @abstractmethod
    def read(self, value: object, where: str, reading: Reading) -> Optional[T_co]:
        """The value as the config holds it, or None after reporting why it cannot be."""

    @property
    def keys(self) -> tuple[Key[object], ...]:
        """The declarations of a nested block (a section, or each entry of a list of them)."""
        return ()

    @property
    def many(self) -> bool:
        """Whether the value is a list of blocks that `keys` declares (shown as ``name[]``)."""
        return False

    def show(self, value: object) -> str:
        """A default as the reference shows it."""
        return show(value)


def show(value: object) -> str:
    """YAML-like text of a default: ``true``, ``600``, ``0.5``, ``[]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    if isinstance(value, tuple) and not value:
        return "[]"
    return str(value)


@dataclass(frozen=True)
class Key(Generic[T_co]):
    """One YAML key: the kind of its value, its default (`REQUIRED` when the file must give
    it) and the one-line doc the reference shows."""

    kind: Kind[T_co]
    default: object
    doc: str
    #: The key in the YAML; a settings field's name when empty.
    name: str = ""
    #: The dataclass field it fills (set by `keys_of`); the key itself for instance keys.
    attr: str = ""
    #: The reference's default column, for a default that is not a plain value (derived, or "none" that means more).
    shown: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def field(self) -> str:
        return self.attr or self.name

    @property
    def default_text(self) -> str:
        if self.shown:
            return self.shown
        if self.required:
            return "required"
        if self.default is None:
            return "none"
        return f"`{self.kind.show(self.default)}`"


def setting(kind: Kind[object], default: object, doc: str, *, key: str = "", shown: str = "", secret: bool = False) -> Any:
    """A dataclass field declared as YAML key `key` (the field's name when empty); a `secret`
    is kept out of repr(), and so out of logged configs and tracebacks."""
    meta = {"key": Key(kind, default, doc, name=key, shown=shown)}
    if default is REQUIRED:
        return field(metadata=meta, repr=not secret)
    return field(default=default, metadata=meta, repr=not secret)


def declared(f: Field[object]) -> Optional[Key[object]]:
    key = f.metadata.get("key")
    return replace(key, name=key.name or f.name, attr=f.name) if isinstance(key, Key) else None


def keys_of(cls: type) -> tuple[Key[object], ...]:
    """The YAML keys a settings dataclass declares, in field order."""
    return _keys_of(cls)


@cache
def _keys_of(cls: type) -> tuple[Key[object], ...]:
    return tuple(k for k in (declared(f) for f in fields(cls)) if k is not None)


def read_keys(keys: tuple[Key[object], ...], block: dict[object, object], where: str,
              reading: Reading) -> dict[str, object]:
    """The valid values of `block`'s declared keys by field, after reporting every bad one,
    every missing required one and every unknown key (with a did-you-mean).

    A key given as YAML null is left unset when its default is none; for other keys
    null is read like any value (and so is usually refused)."""
    reading.unknown_keys(where, block.keys(), [k.name for k in keys])
    out: dict[str, object] = {}
    for key in keys:
        if key.name in block:
            value = block[key.name]
            if value is None and key.default is None:
                continue
        elif key.required:
            value = None
        else:
            continue
        got = key.kind.read(value, join(where, key.name), reading)
        if got is not None:
            out[key.field] = got
    return out


def mapping_problem(keys: tuple[Key[object], ...]) -> str:
    return f"must be a mapping ({', '.join(k.name for k in keys)})"


def read_section(cls: type[T], value: object, where: str, reading: Reading) -> Optional[T]:
    """`value` read as the block of dataclass `cls`; None when it is not a mapping or lacks
    a required key (each reported)."""
    keys = keys_of(cls)
    if not isinstance(value, dict):
        reading.error(where, mapping_problem(keys))
        return None
    values = read_keys(keys, value, where, reading)
    if any(k.required and k.field not in values for k in keys):
        return None
    return cls(**values)


@dataclass(frozen=True)
class Section(Kind[T]):
    """A block of settings: a mapping read by the declarations of dataclass `cls`."""

    cls: type[T]
    what: str = "mapping"

    @property
    def label(self) -> str:
        return self.what

    @property
    def keys(self) -> tuple[Key[object], ...]:
        return keys_of(self.cls)

    def read(self, value: object, where: str, reading: Reading) -> Optional[T]:
        if value is None:  # a block left empty (its keys all commented out): every default
            return self.cls()
        return read_section(self.cls, value, where, reading)


@dataclass(frozen=True)
class ListOf(Kind[tuple[T, ...]]):
    """A list of blocks, each read by the declarations of dataclass `cls`."""

    cls: type[T]
    what: str

    @property
    def label(self) -> str:
        return f"list of {self.what}"

    @property
    def keys(self) -> tuple[Key[object], ...]:
        return keys_of(self.cls)

    @property
    def many(self) -> bool:
        return True

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[T, ...]]:
        if not isinstance(value, list):
            reading.error(where, f"must be a list of {self.what}")
            return None
        entries = (read_section(self.cls, v, f"{where}[{i}]", reading) for i, v in enumerate(value))
        return tuple(e for e in entries if e is not None)
