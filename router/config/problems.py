"""What one read of the YAML found wrong: every error and warning, each naming its field.

Reading never stops at the first problem: each reader reports here and goes on,
so a user sees every problem of a file in one run.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Sequence


def one_line(text: str) -> str:
    """`text` with control characters escaped: a YAML key holding a newline or a terminal
    escape sequence cannot split a message or drive the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def join(where: str, key: str) -> str:
    """The path of `key` inside the block at `where` (``router`` + ``router_port``)."""
    return f"{where}.{key}" if where else key


def did_you_mean(key: str, known: Sequence[str]) -> str:
    """The fix for an unknown `key`: the closest known key, else the list of them."""
    hint = difflib.get_close_matches(key, list(known), n=1)
    return f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(known)}"


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason, one line each.

    `warnings` holds the warnings found before the failure, each naming the
    file like `Config.warnings`, so a caller can show them beside the errors:
    a did-you-mean on a misspelt key often explains the error it caused.
    """

    def __init__(self, path: str, problems: list[str], warnings: tuple[str, ...] = ()):
        self.path = path
        self.problems = [one_line(p) for p in problems]
        self.warnings = tuple(warnings)
        super().__init__("\n".join(one_line(f"{path}: {p}") for p in problems))


class Reading:
    """One pass over a YAML file: what it found wrong so far, and what its readers need to
    know of the file (the folder relative paths start from; whether engines are simulated,
    which turns a missing virtualenv into a warning)."""

    def __init__(self, base: Path | None = None, sim: bool = False) -> None:
        self.base = base or Path.cwd()
        self.sim = sim
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}" if where else msg)

    def warn(self, where: str, msg: str) -> None:
        self.warnings.append(f"{where}: {msg}" if where else msg)

    def failed(self, where: str) -> bool:
        """Whether an error was reported at `where` or inside it."""
        return any(e.startswith((f"{where}:", f"{where}.", f"{where}[")) for e in self.errors)

    def unknown_keys(self, where: str, keys: Iterable[object], known: Sequence[str]) -> None:
        """A warning for each key of `keys` not in `known`, with a did-you-mean."""
        for key in keys:
            if key not in known:
                self.warn(join(where, str(key)), f"unknown key, ignored; {did_you_mean(str(key), known)}")

    def warning_lines(self, path: str) -> tuple[str, ...]:
        return tuple(one_line(f"{path}: {w}") for w in self.warnings)

    def fail(self, path: str) -> ConfigError:
        """The error to raise for what was found, warnings included."""
        return ConfigError(path, self.errors, self.warning_lines(path))
