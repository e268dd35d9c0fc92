"""What one proxied request did (`Exchange`), read at its end by metrics, traffic, the access log and its trace."""
from __future__ import annotations

from typing import Awaitable, Optional, TypeVar

from router.observe.tracing import RequestTrace
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.replica import Replica
from router.util.states import AWAKE, FAILED, STARTING, STOPPED, STOPPING

T = TypeVar("T")

#: A request admitted while its model is in one of these waits for a start (its engines are down), else for a wake.
STARTS = frozenset({STOPPED, FAILED, STARTING, STOPPING})


class Exchange:
    """What one proxied request did, for metrics, traffic, the access log and its trace."""

    __slots__ = ("path", "status", "nbytes", "ttfb", "replica", "retries", "trace", "model_answered", "key",
                 "prompt_tokens", "completion_tokens")

    def __init__(self, path: str) -> None:
        self.path = path
        self.retries = 0
        self.status = 0
        self.nbytes = 0
        self.ttfb: Optional[float] = None
        self.replica: Optional[Replica] = None
        #: The model whose engine answered: the one asked, or a fallback of it (None: no engine answered).
        self.model_answered: Optional[str] = None
        #: Its spans, when tracing is on (router.tracing): the one value the hot path checks for it.
        self.trace: Optional[RequestTrace] = None
        #: The client key's name (router.api_keys), "anonymous" when none (set by proxy/tenants.py): for
        #: metrics, /usage and the logs; never the key.
        self.key = "anonymous"
        #: The engine's `usage` of the answer (router/server/proxy/tokens.py), None when it said none; a
        #: limited key's `tpm` is charged with them.
        self.prompt_tokens: Optional[int] = None
        self.completion_tokens: Optional[int] = None


def traced_admission(trace: RequestTrace, lifecycle: Lifecycle, admitting: Awaitable[T]) -> Awaitable[T]:
    """`admitting` (the model's admission), inside a ``wake`` or ``start`` span if the model is not awake."""
    state = lifecycle.state
    if state == AWAKE:
        return admitting
    return trace.waited("start" if state in STARTS else "wake", admitting, {"kvrouter.model_state": state})
