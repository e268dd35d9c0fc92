"""``router.api_keys``: the client keys, each a record of who may use what, how fast, and how urgently.

Today's forms stay: a string, ``{env: VAR}`` (comma-separated) or ``{file:
PATH}`` (one per line) is a key with full access, named ``key-1``, ``key-2``...
by its place in the list. A mapping is one record::

    - name: chat-ui                 # in logs and metrics; never the key itself
      key: {env: CHAT_UI_KEY}       # or key: "sk-...", or key_sha256: "<hex>"
      models: ["Qwen/*", llama]     # globs over model names and aliases; default: all
      rpm: 600                      # requests per minute (sliding window)
      tpm: 200000                   # prompt + completion tokens per minute
      max_concurrency: 16           # requests in flight at once
      priority: high                # high | normal | low

Parsing only: what a record allows at run time is router/tenants/.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from router.config.kinds import COUNT, Choice, Strings, Text
from router.config.problems import Reading, join
from router.config.schema import REQUIRED, Key, Kind, keys_of, read_section, setting
from router.tenants.scope import allows

#: Priority classes, first served first.
PRIORITIES = ("high", "normal", "low")
#: A key's name: it labels metrics and log lines, so one word of safe characters.
NAME = Text("a name of letters, digits and `._-@:`", r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}", strip=True)
SHA256 = Text("64 hex digits (`sha256sum` of the key)", r"[0-9a-fA-F]{64}", strip=True,
              problem="must be {what}, the SHA-256 of the key in hex")


def read_keys_from(value: object, where: str, reading: Reading, many: bool) -> tuple[str, ...]:
    """Keys inline, or ``{env: NAME}`` / ``{file: PATH}`` so they need not sit in the YAML."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("env", "file"):
        (src, ref), = value.items()
        if not isinstance(ref, str) or not ref:
            reading.error(where, f"'{src}:' needs a name")
            return ()
        if src == "env":
            text = os.environ.get(ref)
            if text is None:
                reading.error(where, f"environment variable {ref} is not set")
                return ()
            items = text.split(",")
        else:
            fp = Path(ref) if Path(ref).is_absolute() else reading.base / ref
            try:
                mode = fp.stat().st_mode
                if not stat.S_ISREG(mode):  # a FIFO or device could block or never end
                    reading.error(where, f"key file {fp} is not a regular file")
                    return ()
                items = fp.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                reading.error(where, f"cannot read key file {fp}: {e.strerror or e}")
                return ()
            except UnicodeDecodeError:
                reading.error(where, f"key file {fp} is not UTF-8 text")
                return ()
            if mode & 0o077:
                reading.warn(where, f"key file {fp} is open to other users (mode {mode & 0o777:o}); run chmod 600 on it")
        keys = tuple(k.strip() for k in items if k.strip())
        if not keys:
            reading.error(where, f"no key found in {src} {ref}")
        return keys if many else keys[:1]
    if many and isinstance(value, list) and all(isinstance(k, str) and k.strip() for k in value):
        return tuple(k.strip() for k in value)
    if not many and isinstance(value, str) and value.strip():
        return (value.strip(),)
    reading.error(where, f"must be {'a list of keys' if many else 'a key'}, or {{env: VAR}} or {{file: PATH}}")
    return ()




@dataclass(frozen=True)
class OneKey(Kind[str]):
    """One key, inline or ``{env: VAR}`` or ``{file: PATH}`` (its first line): a record's key, and
    router.admin_api_key."""

    @property
    def label(self) -> str:
        return "a key, `{env: VAR}` or `{file: PATH}`"

    def read(self, value: object, where: str, reading: Reading) -> Optional[str]:
        keys = read_keys_from(value, where, reading, many=False)
        return keys[0] if keys else None


@dataclass(frozen=True)
class Globs(Kind[tuple[str, ...]]):
    """Model name globs (``Qwen/*``); an empty list would allow nothing, so it is refused."""

    @property
    def label(self) -> str:
        return "list of globs over model names and aliases"

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[str, ...]]:
        got = Strings(named=True).read(value, where, reading)
        if got is not None and not got:
            reading.error(where, "is empty, so the key could use no model; leave `models` out to allow every model")
            return None
        return got


@dataclass(frozen=True)
class ApiKey:
    """One client key and what it may do. The key itself is kept out of repr() (and so out of logs)."""

    name: str = setting(NAME, REQUIRED, "shown in logs and metrics, never the key; unique. A key given as a plain "
                                        "string is named `key-N` by its place in the list")
    key: Optional[str] = setting(OneKey(), None, "the key: inline, `{env: VAR}` or `{file: PATH}` (first line); "
                                                   "this or `key_sha256`", secret=True)
    key_sha256: Optional[str] = setting(SHA256, None, "the key's SHA-256 in hex, so the YAML holds no secret "
                                                      "(`printf %s KEY | sha256sum`)", secret=True)
    models: Optional[tuple[str, ...]] = setting(Globs(), None, "the models it may use: globs over model names and "
                                                               "aliases (`[\"Qwen/*\", llama]`)", shown="all")
    rpm: Optional[int] = setting(COUNT, None, "requests per minute (sliding window); more get 429", shown="no limit")
    tpm: Optional[int] = setting(COUNT, None, "prompt + completion tokens per minute (sliding window); a request "
                                              "whose bound would pass it gets 429", shown="no limit")
    max_concurrency: Optional[int] = setting(COUNT, None, "its requests in flight at once; more get 429",
                                             shown="no limit")
    priority: str = setting(Choice(PRIORITIES), "normal", "its requests' class in every wait queue (higher first); "
                                                          "a request may lower it with `x-kvrouter-priority`")
    #: Filled by the reader: the SHA-256 of the key (bytes), whichever way it was given.
    digest: bytes = field(default=b"", repr=False, compare=True)

    @property
    def limited(self) -> bool:
        """Whether it has a limit to count (the counters' business)."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrency is not None

    @property
    def plain(self) -> bool:
        """Full access at any rate, normal priority: the old form's meaning."""
        return self.models is None and not self.limited and self.priority == "normal"


def full_access(name: str, key: str) -> ApiKey:
    return ApiKey(name=name, key=key, digest=hashlib.sha256(key.encode()).digest())


def is_source(value: object) -> bool:
    """``{env: VAR}`` or ``{file: PATH}``: keys from elsewhere, not a record."""
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("env", "file")


def read_record(value: dict[object, object], where: str, reading: Reading) -> Optional[ApiKey]:
    record = read_section(ApiKey, value, where, reading)
    if record is None:
        return None
    if (record.key is None) == (record.key_sha256 is None):
        given = "both" if record.key is not None else "neither"
        if not reading.failed(join(where, "key")) and not reading.failed(join(where, "key_sha256")):
            reading.error(join(where, "key"), f"give exactly one of `key` and `key_sha256` ({given} given)")
        return None
    digest = (hashlib.sha256(record.key.encode()).digest() if record.key is not None
              else bytes.fromhex(record.key_sha256 or ""))
    return replace(record, digest=digest)


@dataclass(frozen=True)
class ApiKeys(Kind[tuple[ApiKey, ...]]):
    """``router.api_keys``: strings, ``{env: VAR}``, ``{file: PATH}`` (full access) and records."""

    @property
    def label(self) -> str:
        return "list of keys and key records, `{env: VAR}` or `{file: PATH}`"

    @property
    def keys(self) -> tuple[Key[object], ...]:
        return keys_of(ApiKey)

    @property
    def many(self) -> bool:
        return True

    def read(self, value: object, where: str, reading: Reading) -> Optional[tuple[ApiKey, ...]]:
        if is_source(value):
            items: list[object] = [value]
        elif isinstance(value, list):
            items = value
        else:
            reading.error(where, "must be a list of keys (strings, or records with `name` and `key`), or "
                                 "{env: VAR} or {file: PATH}")
            return None
        records: list[tuple[str, ApiKey]] = []
        errors = len(reading.errors)
        for i, item in enumerate(items):
            at = f"{where}[{i}]" if isinstance(value, list) else where
            if isinstance(item, str) or is_source(item):
                for key in read_keys_from(item if is_source(item) else [item], at, reading, many=True):
                    records.append((at, full_access(f"key-{len(records) + 1}", key)))
            elif isinstance(item, dict):
                record = read_record(item, at, reading)
                if record is not None:
                    records.append((at, record))
            else:
                reading.error(at, "must be a key (a string), {env: VAR}, {file: PATH} or a record with `name` "
                                  "and `key`")
        unique(records, reading)
        return tuple(r for _, r in records) if len(reading.errors) == errors and records else None


def unique(records: list[tuple[str, ApiKey]], reading: Reading) -> None:
    """Names label a key's counters and metrics, and a key must say which record it is: both unique."""
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for at, record in records:
        if record.name in names:
            reading.error(join(at, "name"), f"'{record.name}' is also the name of {names[record.name]}; names must "
                                            "be unique (a plain key is named key-N by its place)")
        names.setdefault(record.name, at)
        if record.digest in digests:
            reading.error(at, f"the same key as {digests[record.digest]}; each key must be given once")
        digests.setdefault(record.digest, at)


def check_scopes(records: tuple[ApiKey, ...], names: dict[str, tuple[str, ...]], reading: Reading) -> None:
    """A warning for each `models` glob that matches no model (by `names`: model -> its name and
    aliases): a typo would leave the key without the model it was meant to have."""
    for record in records:
        for glob in record.models or ():
            if not any(allows((glob,), ns) for ns in names.values()):
                reading.warn("router.api_keys", f"key '{record.name}': models glob {glob!r} matches no model name or "
                                                f"alias, so the key cannot use it; models: {', '.join(names)}")
