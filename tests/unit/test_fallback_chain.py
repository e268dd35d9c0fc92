"""The order a request's models are tried in: a model's fallbacks, then theirs, each model once."""
from __future__ import annotations

from typing import Optional, Sequence

from router.server.proxy.fallback import fallback_order

ALIASES = {"small": "s"}


def order(start: str, fallbacks: dict[str, Sequence[str]]) -> tuple[str, ...]:
    def resolve(name: str) -> Optional[str]:
        name = ALIASES.get(name, name)
        return name if name in fallbacks else None
    return fallback_order(start, lambda m: fallbacks.get(m, ()), resolve)


def test_a_models_own_fallbacks_come_first_in_order_then_theirs() -> None:
    chain = {"a": ["b", "c"], "b": ["d"], "c": ["e"], "d": [], "e": []}
    assert order("a", chain) == ("b", "c", "d", "e")
    assert order("d", chain) == ()


def test_a_cycle_visits_each_model_once_and_never_the_one_asked() -> None:
    assert order("a", {"a": ["b"], "b": ["a", "c"], "c": ["b", "a"]}) == ("b", "c")
    assert order("a", {"a": ["b", "b"], "b": ["b"]}) == ("b",)


def test_names_resolve_to_models_and_unknown_ones_are_skipped() -> None:
    assert order("a", {"a": ["small", "gone", "s"], "s": []}) == ("s",)
