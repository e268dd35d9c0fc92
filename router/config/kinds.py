"""The kinds of YAML value the declarations use: each checks a value against its bounds and,
when it does not fit, reports what it must be (so every message has the same shape)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from router.config.problems import Reading
from router.config.schema import Kind, show
from router.engines import split_args

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_value(value: object) -> str:
    """YAML scalar -> env var text; booleans as lower-case true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def is_word(x: object) -> bool:
    """A list item taken as text: a string, or a number YAML read from unquoted digits."""
    return isinstance(x, (str, int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Flag(Kind[bool]):
    @property
    def label(self) -> str:
        return "true/false"

    def read(self, value: object, where: str, reading: Reading) -> Optional[bool]:
        if isinstance(value, bool):
            return value
        reading.error(where, f"must be true or false, not {value!r}")
        return None


@dataclass(frozen=True)
class Number(Kind[float]):
    """A number from `least` (excluded when `above`) to `most` (None: no upper bound);
    `whole` numbers are kept as int. With a `noun`, messages say "X is not a <noun>"."""

    least: float
    most: Optional[float] = None
    whole: bool = False
    above: bool = False
    noun: str = ""

    @property
    def label(self) -> str:
        what = "a whole number" if self.whole else "a number"
        if self.most is not None:
            return f"{what} from {show(self.least)} to {show(self.most)}"
        return f"{what} {'>' if self.above else '>='} {show(self.least)}"

    def fits(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.whole and not isinstance(value, int)):
            return False
        if isinstance(value, float) and not math.isfinite(value) or isinstance(value, int) and abs(value) > 2**1000:
            return False
        low_ok = value > self.least if self.above else value >= self.least
        return low_ok and (self.most is None or value <= self.most)

    def read(self, value: object, where: str, reading: Reading) -> Optional[float]:
        if self.fits(value):
            assert isinstance(value, (int, float))
            return value if self.whole else float(value)
        if self.noun:
            reading.error(where, f"{value!r} is not a {self.noun} ({show(self.least)}-{show(self.most)})")
        else:
            reading.error(where, f"must be {self.label}, not {value!r}")
        return None


#: The shapes most settings take.
POSITIVE = Number(0, above=True)
NON_NEGATIVE = Number(0)
COUNT = Number(1, 2**31, whole=True)
PORT = Number(1, 65535, whole=True, noun="port number")


@dataclass(frozen=True)
class Choice(Kind[str]):
    """One of `choices`, in any case; `aliases` are other names for them (``sgl`` -> ``sglang``)."""

    choices: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    problem: str = "must be one of {choices}, not {value!r}"

    @property
    def label(self) -> str:
        return "one of " + ", ".join(f"`{c}`" for c in self.choices)

    def read(self, value: object, where: str, reading: Reading) -> Optional[str]:
        if isinstance(value, str):
            text = value.strip().lower()
            text = dict(self.aliases).get(text, text)
            if text in self.choices:
                return text
        reading.error(where, self.problem.format(choices=", ".join(self.choices), value=value))
        return None


@dataclass(frozen=True)
class Text(Kind[str]):
    """A string that fully matches `pattern`; `problem` is the message, with {what} and {value}."""

    what: str
    pattern: str = r"(?s).*\S.*"
    problem: str = "must be {what}, not {value!r}"
    strip: bool = False

    @property
    def label(self) -> str:
        return self.what

    def read(self, value: object, where: str, reading: Reading) -> Optional[str]:
        if isinstance(value, str):
            text = value.strip() if self.strip else value
            if re.fullmatch(self.pattern, text):
                return text
        reading.error(where, self.problem.format(what=self.what, value=value))
        return None


#: A host name or address: one word.
HOST = Text("a host name or address", r"\S+")


@dataclass(frozen=True)
class Strings(Kind[tuple[str, ...]]):
    """A list of strings (numbers taken as their text), or one string; `named` items must not be blank."""

    what: str = "a list of strings"
    named: bool = False

    @property
    def label(self) -> str:
        return self.what

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[str, ...]]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not (isinstance(items, list) and all(is_word(x) for x in items)):
            reading.error(where, "must be a list of strings")
            return None
        out = tuple(str(x) for x in items)
        blank = [j for j, x in enumerate(out) if self.named and not x.strip()]
        for j in blank:
            reading.error(f"{where}[{j}]", "must not be empty")
        return None if blank else out


@dataclass(frozen=True)
class Words(Kind[tuple[str, ...]]):
    """Command-line words: a list whose items are split like a shell would, or one string."""

    @property
    def label(self) -> str:
        return "list of strings, or one string, split like a shell would"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[str, ...]]:
        items = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(is_word(a) for a in items):
            reading.error(where, "must be a list of strings (each may hold several words) or one string")
            return None
        try:
            words = split_args([str(a) for a in items])
        except ValueError as e:
            reading.error(where, f"cannot split into arguments ({e}); check the quotes")
            return None
        if any("\0" in a for a in words):
            reading.error(where, "must not contain a NUL character")
            return None
        return tuple(words)


@dataclass(frozen=True)
class EnvList(Kind[tuple[tuple[str, str], ...]]):
    """Environment variables: ``["KEY=VALUE", ...]`` (the kvcached format) or a ``KEY: value`` mapping."""

    @property
    def label(self) -> str:
        return "list of `KEY=VALUE`, or a mapping"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[tuple[str, str], ...]]:
        if value is None:
            return ()
        if isinstance(value, dict):
            items = [(f"{where}.{k}", str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = []
            for i, entry in enumerate(value):
                if not isinstance(entry, str) or "=" not in entry:
                    reading.error(f"{where}[{i}]", f"must be a 'KEY=VALUE' string, not {entry!r}")
                    continue
                k, _, v = entry.partition("=")
                items.append((f"{where}[{i}]", k.strip(), v))
        else:
            reading.error(where, "must be a list of 'KEY=VALUE' strings")
            return None
        out = []
        for at, k, v in items:
            if not ENV_NAME.match(k):
                reading.error(at, f"{k!r} is not a valid environment variable name (letters, digits, '_')")
            elif isinstance(v, (dict, list)) or v is None:
                reading.error(at, "must have a single value")
            elif "\0" in env_value(v):
                reading.error(at, "value must not contain a NUL character")
            else:
                out.append((k, env_value(v)))
        return tuple(out)
