"""Request shaping: what a model's instances set, force or remove in the bodies they are sent.

Declared per instance (`request_defaults`, `request_overrides`, `request_strip`),
so per model: every replica of a model must shape alike (router/config/per_model.py).
The proxy applies it once per body it sends (router/server/proxy/request.py
`Outgoing.data_for`), in the same re-encode as the model-name rewrite; a model
without shaping has none (`Instance.shaping` is None) and its bodies pass as the
client's bytes.

The merge is top-level only: a default or an override replaces the client's
whole value of that field (a nested object is not merged key by key), which
keeps it predictable and its cost one dict copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import orjson

from router.config.problems import Reading
from router.config.schema import Kind

#: The client paths whose JSON bodies are shaped: chat, completions, responses and messages.
SHAPED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"})
#: Fields the router reads before it routes, and why: shaping them would make the router and the
#: engine disagree on what was asked.
ROUTED_FIELDS = {
    "model": "the router routes by it and rewrites it to the engine's served name",
    "stream": "it decides whether the router relays a stream or one body",
}
#: The three keys, in the order their messages name them.
SHAPING_KEYS = ("request_defaults", "request_overrides", "request_strip")

JSON = Union[None, bool, int, float, str, list["JSON"], dict[str, "JSON"]]


def plain_json(value: object) -> bool:
    """Whether `value` is what a JSON body holds (YAML may give dates, sets, or non-text keys)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_json(v) for k, v in value.items())
    return False


@dataclass(frozen=True)
class Fields(Kind[dict[str, Any]]):
    """A mapping of top-level request fields to JSON values (`request_defaults`, `request_overrides`)."""

    @property
    def label(self) -> str:
        return "mapping of request field to JSON value"

    def read(self, value: object, where: str, reading: Reading) -> Optional[dict[str, Any]]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            reading.error(where, f"must be a mapping of request field to value (e.g. {{temperature: 0.2}}), not {value!r}")
            return None
        ok = True
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                reading.error(where, f"{k!r} is not a field name; use the body's top-level field names as text")
                ok = False
            elif k in ROUTED_FIELDS:
                reading.error(f"{where}.{k}", f"'{k}' is the router's to read, not to shape ({ROUTED_FIELDS[k]}); "
                                              "remove it")
                ok = False
            elif not plain_json(v):
                reading.error(f"{where}.{k}", f"{v!r} is not a JSON value (text, number, true/false, null, list or "
                                              "mapping); quote it")
                ok = False
        return dict(value) if ok else None


def refuse_routed(strip: tuple[str, ...], where: str, reading: Reading) -> bool:
    """Whether `request_strip` leaves the routed fields alone (each one it names is an error)."""
    bad = [j for j, k in enumerate(strip) if k in ROUTED_FIELDS]
    for j in bad:
        reading.error(f"{where}[{j}]", f"'{strip[j]}' is the router's to read, not to strip "
                                       f"({ROUTED_FIELDS[strip[j]]}); remove it")
    return not bad


@dataclass(frozen=True)
class Shaping:
    """One model's shaping: fields set where the client did not (`defaults`), fields always set
    (`overrides`) and fields removed (`strip`). A field is in one of the three at most."""

    defaults: dict[str, Any]
    overrides: dict[str, Any]
    strip: tuple[str, ...]

    def __hash__(self) -> int:
        return hash(orjson.dumps([self.defaults, self.overrides, self.strip], option=orjson.OPT_SORT_KEYS))

    def apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A new body: `payload` without the stripped fields, with the defaults where the client
        gave no value (missing or null) and the overrides in place of the client's."""
        strip = self.strip
        out = {k: v for k, v in payload.items() if k not in strip} if strip else dict(payload)
        for k, v in self.defaults.items():
            if out.get(k) is None:
                out[k] = v
        out.update(self.overrides)
        return out


def read_shaping(values: dict[str, object], where: str, reading: Reading) -> Optional[Shaping]:
    """The instance's shaping from its three keys as read; None when it has none (or a key was bad,
    which is reported: the config is refused then)."""
    defaults, overrides, strip = (values.get(k) for k in SHAPING_KEYS)
    defaults = defaults if isinstance(defaults, dict) else {}
    overrides = overrides if isinstance(overrides, dict) else {}
    strip = tuple(str(s) for s in strip) if isinstance(strip, tuple) else ()
    if not refuse_routed(strip, f"{where}.request_strip", reading):
        return None
    seen: dict[str, str] = {}
    for key, names in zip(SHAPING_KEYS, (defaults, overrides, strip)):
        for name in names:
            if name in seen:
                reading.error(f"{where}.{key}", f"field {name!r} is also in {seen[name]}; a field is defaulted, "
                                                "overridden or stripped, so give it in one of them")
            seen.setdefault(name, key)
    if not seen:
        return None
    return Shaping(defaults, overrides, strip)
