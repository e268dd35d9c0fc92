"""What the replicas of one model must declare alike, and what a model's `fallbacks` may name.

Routing, shaping and fallbacks are declared on instances but act per model: a
request is keyed, shaped and fallen back by its model before a replica is
chosen, so two replicas that disagree would make the answer depend on the pick.
"""
from __future__ import annotations

from router.config.instance import Instance
from router.config.problems import Reading
from router.config.top import Config


def check_per_model(cfg: Config, reading: Reading, complete: bool) -> None:
    """Replicas of a model shape and fall back alike; fallbacks name other models the config routes
    (a cycle between models is allowed: a request never visits a model twice)."""
    first: dict[str, Instance] = {}
    routes = cfg.routes
    for inst in cfg.instances:
        where = f"instances[{inst.position}]"
        other = first.setdefault(inst.model, inst)
        if other is not inst:
            for key in ("routing", "routing_prefix_chars"):
                mine, theirs = getattr(inst, key), getattr(other, key)
                if mine != theirs:
                    reading.error(f"{where}.{key}", f"{key} {mine!r} differs from {theirs!r} on "
                                  f"instances[{other.position}] ({other.name}), another instance of model "
                                  f"{inst.model!r}; a model routes one way: give every instance of it the same {key}")
            if inst.shaping != other.shaping:
                reading.error(f"{where}.request_defaults", f"model {inst.model!r} is shaped otherwise by instance "
                                                           f"{other.name!r}; give every replica of a model the same "
                                                           "request_defaults, request_overrides and request_strip")
            if inst.fallbacks != other.fallbacks:
                reading.error(f"{where}.fallbacks", f"instance {other.name!r} of model {inst.model!r} gives "
                                                    f"{list(other.fallbacks)}; give every replica of a model the "
                                                    "same fallbacks")
        for j, name in enumerate(inst.fallbacks):
            target = routes.get(name)
            if target is None and complete:
                reading.error(f"{where}.fallbacks[{j}]", f"{name!r} is not a model, alias or served name of any "
                                                         f"instance; use one of: {', '.join(routes)}")
            elif target == inst.model:
                reading.error(f"{where}.fallbacks[{j}]", f"{name!r} is this instance's own model {inst.model!r}; "
                                                         "name another model (its other replicas are tried already)")
