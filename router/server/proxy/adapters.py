"""A request for a LoRA adapter: counted as the adapter's use on its replica, and sent once the
replica's engine holds it (loaded on demand, router/server/fleet/adapters.py).

The use is counted from before the load, so no other adapter's load unloads
this one while the request waits or runs, and ends when the request does (or
moves to another replica on a retry).
"""
from __future__ import annotations

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
    adapter_done(out, model)
    out.adapter_on = replica
    model.adapter_use(replica, name, True)
    try:
        await model.adapter_ready(replica, name)
    except AdapterUnavailable as e:
        model.release(replica)
        raise Reject(e.status, e.message, "model", retry_after(1) if e.status == 503 else None) from None
    except BaseException:
        model.release(replica)
        raise


def adapter_done(out: Outgoing, model: Model) -> None:
    """The request no longer uses its adapter on the replica it counted it on."""
    replica = out.adapter_on
    if replica is not None and out.adapter is not None:
        model.adapter_use(replica, out.adapter, False)
    out.adapter_on = None


def adapter_missing(model: Model, replica: Replica, out: Outgoing) -> bool:
    """The engine answered 404 to a request for its adapter: True (once per request) when the router
    believed it held it, which it then no longer does, so the request is sent again and loads it."""
    if out.adapter is None or out.adapter_retried or out.adapter not in replica.loras.loaded:
        return False
    out.adapter_retried = True
    model.adapter_lost(replica, out.adapter)
    return True
