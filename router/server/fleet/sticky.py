"""A model's replica choice by a request's key (`routing: session | prefix`).

Requests with one key (a session, a prompt prefix) go to one replica, whose
prefix cache then holds their context: the key's owner on a consistent hash
ring over the model's replicas (router/server/fleet/ring.py). A replica that
cannot take the request now (breaker open, unhealthy, stopped, retired, at
its max_concurrency, or already tried by this request) is passed over along
the ring, as is one above the bounded load; either way the request counts as
`moved` rather than a `hit` (router_affinity_total).

A model routed by `least_outstanding` has no `Sticky`, and its requests no key.
"""
from __future__ import annotations

from typing import Optional

from router.server.fleet.replica import Replica
from router.server.fleet.ring import Ring


class Sticky:
    """The ring of one model's replicas, and how its requests' keys are made."""

    __slots__ = ("routing", "prefix_chars", "ring")

    def __init__(self, routing: str, prefix_chars: int, replicas: tuple[Replica, ...]):
        #: `session` or `prefix`: what the proxy makes the key of (router/server/proxy/keys.py).
        self.routing = routing
        self.prefix_chars = prefix_chars
        self.ring = Ring([r.name for r in replicas])

    def choose(self, replicas: tuple[Replica, ...], now: float, exclude: tuple[Replica, ...],
               key: int) -> tuple[Optional[Replica], bool, bool]:
        """(the replica for `key`, or None; whether one was passed over for being full; whether it
        is the key's owner). `replicas` are the ones the ring was made of, in that order."""
        usable = []
        loads = []
        full = False
        for r in replicas:
            ok = r not in exclude and r.routable(now)
            if ok and r.limit is not None and r.outstanding >= r.limit:
                full = True
                ok = False
            usable.append(ok)
            loads.append(r.outstanding)
        chosen, hit = self.ring.choose(key, loads, usable)
        return (None if chosen is None else replicas[chosen]), full, hit

    def owns(self, replicas: tuple[Replica, ...], key: int, replica: Replica) -> bool:
        """Whether `replica` is `key`'s owner (a request that waited for a slot took the first free one)."""
        owner = self.ring.owner(key)
        return owner is not None and replicas[owner] is replica


def sticky_for(replicas: tuple[Replica, ...]) -> Optional[Sticky]:
    """The key routing of a model with these replicas (their instances agree: router/config/checks.py);
    None for `least_outstanding`."""
    if not replicas or replicas[0].instance.routing == "least_outstanding":
        return None
    inst = replicas[0].instance
    return Sticky(inst.routing, inst.routing_prefix_chars, replicas)
