"""What a client key may do, applied to one request: its scope (403), its limits (429) and its class.

The Guard (auth.py) puts the matching key's record in ``scope[KEY]``; the
proxy asks `Tenants.enter` once the model is known. A key without limits is
decided here with no await and no message; a key with limits is counted by
its `Gate`: the router's own `Quotas` (router/tenants/quota.py), or with
``router.workers`` the controller's, asked over the link (`ControllerGate` in
router/server/workers/worker_end.py). A stack without keys has no `Tenants`
at all: the proxy pays one attribute check.
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Optional, Protocol, Union

from router.config.keys import ApiKey
from router.server.fleet.models import Model, ModelTable
from router.server.proxy.auth import KEY
from router.server.proxy.exchange import Exchange
from router.server.proxy.reply import Reply, Scope
from router.server.proxy.request import Outgoing, Reject, header
from router.tenants.classes import CLASSES, NORMAL, requested
from router.tenants.quota import Limits, Quotas, Refusal, Standing
from router.tenants.scope import allowed

#: The header a request lowers its class with.
PRIORITY_HEADER = b"x-kvrouter-priority"
#: A request's completion bound when it gives no max_tokens (for `tpm` admission only: the
#: engine's reported usage replaces it when the answer ends).
DEFAULT_COMPLETION_BOUND = 512
#: Prompt tokens are estimated from the body's size: about four bytes per token.
BYTES_PER_TOKEN = 4
#: The body fields a client caps its completion with, by API.
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


#: A gate's decision: (its ticket, which `finish` is given back; the decision).
Decision = tuple[int, Union[Standing, Refusal, None]]


class Gate(Protocol):
    """Where limited keys are counted: this process's `Quotas`, or the controller's."""

    def admit(self, key: str, bound: int) -> Awaitable[Decision]: ...

    def finish(self, ticket: int, key: str, bound: int, used: Optional[int]) -> None: ...


class LocalGate:
    """The counters live here (the router alone, or the controller for its workers)."""

    def __init__(self, quotas: Quotas, clock: Callable[[], float] = time.monotonic):
        self.quotas = quotas
        self.clock = clock

    async def admit(self, key: str, bound: int) -> Decision:
        return 0, self.quotas.admit(key, self.clock(), bound)

    def finish(self, ticket: int, key: str, bound: int, used: Optional[int]) -> None:
        self.quotas.finish(key, self.clock(), bound, used)


def tenants_for(records: tuple[ApiKey, ...], table: ModelTable, gate: Gate) -> Optional[Tenants]:
    """The proxy's tenants: None without keys, so such a stack pays nothing."""
    return Tenants(records, table, gate) if records else None


def limits_of(records: tuple[ApiKey, ...]) -> dict[str, Limits]:
    """Each limited key's limits, by name: what the counters' owner keeps."""
    return {k.name: Limits(k.rpm, k.tpm, k.max_concurrency) for k in records if k.limited}


def bound_of(out: Outgoing) -> int:
    """A cheap upper estimate of the tokens a request may use: its body's bytes / 4, plus its cap."""
    cap: Any = None
    if out.payload is not None:
        for name in MAX_TOKENS_FIELDS:
            cap = out.payload.get(name)
            if cap is not None:
                break
    if type(cap) is not int or cap < 0:
        cap = DEFAULT_COMPLETION_BOUND
    return len(out.body) // BYTES_PER_TOKEN + cap


def ratelimit_headers(standing: Standing) -> list[tuple[bytes, bytes]]:
    """The ``x-ratelimit-*`` headers OpenAI's clients read, for the limits the key has."""
    out = []
    if standing.rpm is not None:
        out += [(b"x-ratelimit-limit-requests", b"%d" % standing.rpm),
                (b"x-ratelimit-remaining-requests", b"%d" % standing.remaining_requests),
                (b"x-ratelimit-reset-requests", duration(standing.reset_requests))]
    if standing.tpm is not None:
        out += [(b"x-ratelimit-limit-tokens", b"%d" % standing.tpm),
                (b"x-ratelimit-remaining-tokens", b"%d" % standing.remaining_tokens),
                (b"x-ratelimit-reset-tokens", duration(standing.reset_tokens))]
    return out


def duration(seconds: float) -> bytes:
    """OpenAI's reset format: ``6m0s``, ``1.5s``."""
    seconds = max(0.0, seconds)
    minutes, rest = divmod(seconds, 60.0)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return (f"{int(minutes)}m" + text if minutes else text).encode()


def allowed_models(record: ApiKey, table: ModelTable) -> Optional[frozenset[str]]:
    """The models `record` may use (a glob matching the model's name or one of its aliases, or a LoRA
    adapter's own name: an adapter is a model to clients, so its base model's scope does not cover it);
    None: all."""
    names = {m.name: (m.name, *table.aliases(m)) for m in table}
    names.update((a, (a,)) for a in table.adapter_names)
    return allowed(record.models, names)


class Tenants:
    """The keys of one configuration, over one table (a reload builds new ones; the counters stay
    with their owner)."""

    def __init__(self, records: tuple[ApiKey, ...], table: ModelTable, gate: Gate):
        self.gate = gate
        self.scopes = {k.name: allowed_models(k, table) for k in records}
        self.classes = {k.name: CLASSES[k.priority] for k in records}

    def may_use(self, scope: Scope, model: str) -> bool:
        """Whether the key the request sent may use `model` (/v1/models lists only those)."""
        record = scope.get(KEY)
        allowed = self.scopes.get(record.name) if record is not None else None
        return allowed is None or model in allowed

    def within_scope(self, scope: Scope, models: tuple[Model, ...]) -> tuple[Model, ...]:
        """Those of `models` (a request's fallbacks) the key the request sent may use."""
        record = scope.get(KEY)
        allowed = self.scopes.get(record.name) if record is not None else None
        return models if allowed is None else tuple(m for m in models if m.name in allowed)

    def enter(self, scope: Scope, model: Model, out: Outgoing, ex: Exchange) -> Optional[Awaitable["Pass"]]:
        """Name the request's key, refuse a model outside its scope (Reject 403) and set its class;
        for a key with limits, the wait for its counters' decision (a `Pass`, or Reject 429/400)."""
        record: Optional[ApiKey] = scope.get(KEY)
        if record is None:  # an admin pass-through: no client key
            return None
        ex.key = name = record.name
        allowed = self.scopes.get(name)
        asked = out.adapter or model.name
        if allowed is not None and asked not in allowed:
            raise Reject(403, f"The key '{name}' may not use model '{asked}'; it may use: "
                              f"{', '.join(sorted(allowed)) or 'none of the models served now'}.", "model")
        out.priority = requested(self.classes.get(name, NORMAL), header(scope, PRIORITY_HEADER))
        if not record.limited:
            return None
        return self._admit(name, bound_of(out))

    async def _admit(self, name: str, bound: int) -> Pass:
        ticket, got = await self.gate.admit(name, bound)
        if isinstance(got, Refusal):
            raise Reject(got.status, got.message, None if got.status == 429 else "max_tokens",
                         headers=[(b"retry-after", b"%d" % got.retry_after), *ratelimit_headers(got.standing)])
        return Pass(self.gate, ticket, name, bound, ratelimit_headers(got) if got is not None else [])


class Pass:
    """A limited key's request let in: the headers its answer carries, and its end (`leave`)."""

    __slots__ = ("gate", "ticket", "key", "bound", "headers")

    def __init__(self, gate: Gate, ticket: int, key: str, bound: int, headers: list[tuple[bytes, bytes]]):
        self.gate = gate
        self.ticket = ticket
        self.key = key
        self.bound = bound
        self.headers = headers

    def reply(self, reply: Reply) -> Reply:
        return LimitedReply(reply, self)

    def leave(self, ex: Exchange) -> None:
        """The request ended: its reservation becomes the tokens it used (none when no engine answered:
        the router refused it after all, or the client left first; its bound when the engine's answer
        held no usage). The relay read the usage from the answer (router/server/proxy/tokens.py)."""
        used: Optional[int] = None if ex.ttfb is not None else 0
        if ex.prompt_tokens is not None and ex.completion_tokens is not None:
            used = ex.prompt_tokens + ex.completion_tokens
        self.gate.finish(self.ticket, self.key, self.bound, used)


class LimitedReply:
    """The client's `Reply`, with the key's ``x-ratelimit-*`` headers on the answer."""

    __slots__ = ("inner", "ticket")

    def __init__(self, inner: Reply, ticket: Pass):
        self.inner = inner
        self.ticket = ticket

    @property
    def gone(self) -> bool:
        return self.inner.gone

    def __getattr__(self, name: str) -> Any:  # the fast server's `pipe_sink` for streams
        return getattr(self.inner, name)

    async def whole(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self.inner.whole(status, [*headers, *self.ticket.headers], body)

    async def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.inner.head(status, [*headers, *self.ticket.headers])

    async def chunk(self, data: bytes) -> None:
        await self.inner.chunk(data)

    async def end(self, data: bytes = b"") -> None:
        await self.inner.end(data)
