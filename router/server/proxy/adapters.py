"""A request for a LoRA adapter: counted as the adapter's use on its replica, and sent once the
replica's engine holds it (loaded on demand, router/server/fleet/adapters.py).

The use is counted from before the load, so no other adapter's load unloads
this one while the request waits or runs, and ends when the request does (or
moves to another replica on a retry).
"""
from __future__ import annotations

import time

from router.server.fleet.adapters import AdapterUnavailable
from router.server.fleet.models import Model
from router.server.fleet.replica import Replica
from router.server.proxy.reply import retry_after
from router.server.proxy.request import Outgoing, Reject


async def adapter_ready(model: Model, replica: Replica, out: Outgoing) -> None:
    """Make `replica` (whose slot the request holds) serve `out.adapter`; on failure the slot is
    given back and the request answered: 502 naming the adapter and the engine's words, or 503."""
    name = out.adapter
    assert name is not None
    now = time.monotonic()
    adapter_done(out)
    out.adapter_on = replica
    replica.loras.begin(name, now)
    try:
        await model.adapters.ensure(replica, name)
    except AdapterUnavailable as e:
        model.release(replica)
        raise Reject(e.status, e.message, "model", retry_after(1) if e.status == 503 else None) from None
    except BaseException:
        model.release(replica)
        raise


def adapter_done(out: Outgoing) -> None:
    """The request no longer uses its adapter on the replica it counted it on."""
    replica = out.adapter_on
    if replica is not None and out.adapter is not None:
        replica.loras.end(out.adapter, time.monotonic())
    out.adapter_on = None
