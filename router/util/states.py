"""The names of a model's states, shared by the router and the tools that read its events.

They live here, below every package that uses them, so that `router.bench` and
the status tools can name them without importing the server. Which moves
between them are legal is the server's business (router/server/fleet/machine.py).
"""
from __future__ import annotations

#: Serving: requests are admitted at once.
AWAKE = "awake"
#: About to sleep: new requests are held (not refused) until those in flight have ended.
DRAINING = "draining"
#: The engines' sleep calls are under way.
FALLING_ASLEEP = "falling_asleep"
#: The engines have released their GPU memory; a request (or an operator) wakes them.
SLEEPING = "sleeping"
#: The engines' wake calls are under way.
WAKING = "waking"
#: Residency: an on-demand model's engines are stopped until a request starts them.
STOPPED = "stopped"
#: The engines' programs are being started; requests wait for their health checks.
STARTING = "starting"
#: Drained, then the engines' programs are stopped.
STOPPING = "stopping"
#: The last start failed; the next request tries again.
FAILED = "failed"

#: Every state, in the order of a model's life.
ALL_STATES = (STOPPED, STARTING, AWAKE, DRAINING, FALLING_ASLEEP, SLEEPING, WAKING, STOPPING, FAILED)
#: States in which the model's engines hold (or are about to hold) their GPU memory.
HOLDING_GPU = frozenset({AWAKE, DRAINING, FALLING_ASLEEP, WAKING, STARTING, STOPPING})
#: States a model rests in between transitions (no transition holds its lock).
RESTING = frozenset({AWAKE, SLEEPING, STOPPED, FAILED})
