"""Fallbacks: the models that answer, in order, what a model could not serve.

A model's `fallbacks` (router/config/instance.py) name other models. When
every replica of a model failed before a byte reached the client (an
`Unserved` error: connect failures, a breaker open, no routable replica, no
room within the queue's wait, engines answering 502/503/504 after the
retries) or its start failed (`ModelUnavailable`), the request goes to the
next model of its chain that serves its path, its `model` rewritten.

The chain is the model's own fallbacks in order, then theirs (breadth
first), each model once and never the model asked: a config may let models
fall back to each other (a cycle), and a request still visits each at most
once. It is computed once per table (`chains`), not per request.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from router.server.fleet.models import Model, ModelTable


def fallback_order(start: str, fallbacks_of: Callable[[str], Sequence[str]],
                   resolve: Callable[[str], Optional[str]]) -> tuple[str, ...]:
    """The models to try after `start`, in order: its fallbacks, then each of theirs, breadth first;
    `resolve` turns a name (model, alias or served name) into its model (None: unknown, skipped)."""
    seen = {start}
    order: list[str] = []
    queue = [start]
    while queue:
        for name in fallbacks_of(queue.pop(0)):
            model = resolve(name)
            if model is not None and model not in seen:
                seen.add(model)
                order.append(model)
                queue.append(model)
    return tuple(order)


def chains(table: ModelTable) -> dict[str, tuple[Model, ...]]:
    """Each model that has fallbacks -> the models to try after it, in order."""
    def fallbacks_of(name: str) -> Sequence[str]:
        model = table.get(name)
        return model.replicas[0].instance.fallbacks if model is not None and model.replicas else ()

    def resolve(name: str) -> Optional[str]:
        model = table.get(name)
        return model.name if model is not None else None

    out: dict[str, tuple[Model, ...]] = {}
    for model in table:
        order = fallback_order(model.name, fallbacks_of, resolve)
        found = tuple(m for m in (table.get(n) for n in order) if m is not None)
        if found:
            out[model.name] = found
    return out


def fallbacks_for(chains: dict[str, tuple[Model, ...]], model: Model, path: str) -> tuple[Model, ...]:
    """The models a request for `model` on `path` may fall back to, in order (those that serve `path`)."""
    chain = chains.get(model.name)
    return tuple(m for m in chain if path in m.paths) if chain else ()


def fall_back(model: Model, fallbacks: tuple[Model, ...]) -> tuple[Model, tuple[Model, ...]]:
    """`model` failed: the next model to try and those after it; the hop is counted on `model`."""
    to = fallbacks[0]
    model.metrics.fallback(to.name)
    return to, fallbacks[1:]
