"""LoRA adapters of an instance: the ``lora_adapters`` list, and those its engine loads at start.

An adapter is a model name clients use that the base model's engines serve once
the adapter is loaded into them. The router loads the declared ones on demand
(router/server/fleet/adapters.py); the ones the engine's own flags name
(``--lora-modules`` for vLLM, ``--lora-paths`` for SGLang) are loaded by the
engine at its start and are known too, as already loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from router.config.kinds import Text
from router.config.problems import Reading
from router.config.schema import REQUIRED, ListOf, setting
from router.engines import EngineSpec

#: Text with no space at either end, and no space inside (an adapter name is a model name in a URL-free JSON field,
#: but engines and clients trim it).
ADAPTER_NAME = r"\S+"


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: the model name clients use and what the engine loads for it."""

    name: str = setting(Text("an adapter name", ADAPTER_NAME, "{value!r} is not an adapter name: one word, e.g. "
                                                              "sql-expert"), REQUIRED,
                        "the model name clients use for it (`sql-expert`); the engine gets the same name")
    path: str = setting(Text("a path", r"(?s)\S(.*\S)?", "must be a path or hub name (e.g. /models/loras/sql)"),
                        REQUIRED, "what the engine loads: a folder with `adapter_config.json` (on the engine's machine)")
    #: Named by the engine's own flags, so loaded by the engine at its start (not from the YAML key).
    at_start: bool = field(default=False)


#: The ``lora_adapters`` key's kind.
ADAPTERS = ListOf(LoraAdapter, "{name, path}")


def instance_adapters(declared: Sequence[LoraAdapter], spec: EngineSpec, args: Sequence[str], where: str,
                      reading: Reading) -> tuple[LoraAdapter, ...]:
    """The instance's adapters: those its engine flags load at start, then the declared ones (a
    declared one the flags also name is the flags'). Declared adapters on an engine with no
    adapter API, or declared twice, are errors."""
    if declared and spec.lora is None:
        reading.error(f"{where}.lora_adapters", f"engine '{spec.name}' has no LoRA adapter API the router can use; "
                                                "remove lora_adapters (or use vllm or sglang)")
        return ()
    started = [LoraAdapter(n, p, at_start=True) for n, p in (spec.lora.preloaded(args) if spec.lora else ())]
    out = {a.name: a for a in started}
    seen: dict[str, int] = {}
    for i, adapter in enumerate(declared):
        if adapter.name in seen:
            reading.error(f"{where}.lora_adapters[{i}].name", f"{adapter.name!r} is already lora_adapters[{seen[adapter.name]}]; "
                                                              "give each adapter its own name")
            continue
        seen[adapter.name] = i
        out.setdefault(adapter.name, adapter)
    return tuple(out.values())


def adapter_named(adapters: Sequence[LoraAdapter], name: str) -> Optional[LoraAdapter]:
    return next((a for a in adapters if a.name == name), None)
