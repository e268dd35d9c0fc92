"""What the controller and its proxy workers (``router.workers: N``) say to each other, and who owns what.

One controller process owns every model's lifecycle (health, sleep, residency,
reload, supervisord); N worker processes share the public port and forward
requests. The two ends talk over one private unix socket per worker, in framed
pickles of the message types below (both ends are this package, in processes of
one user, behind a 0700 directory). A worker's first message is `Hello` with
`PROTOCOL`; a controller that speaks another version answers `Refused` and
closes the link (a worker left from an older install cannot misread the newer one).

Every piece of model and replica state has one owner, and one rule for the others:

======================================  ==========  ====================================================
State                                   Owner       Rule
======================================  ==========  ====================================================
config, the table, its generation       controller  pushed: `Table` (on connect, after each reload);
                                                    each worker answers `Applied(generation)`
model state (awake, sleeping, ...)      controller  pushed: `ModelState`, in the order it changed
replica health, supervisord's process   controller  pushed: `ReplicaState`
replica breaker                         controller  merged, then pushed: a worker's breaker outcome goes
                                                    up at once (`BreakerOutcome`); the controller
                                                    applies it to its own breaker and pushes the result
                                                    to every worker (`BreakerState`), within
                                                    milliseconds. Past its open time each worker's
                                                    copy lets one half-open trial go (N at most)
slots and wait queue of a model with    controller  leased: a worker asks `Lease` per request, the
a max_concurrency (every replica)                   controller picks from its one queue (bounded by
                                                    max_queue; higher priority classes first, FIFO
                                                    within one) and answers `Leased`; the worker
                                                    gives the slot back with `Unlease`. A worker's
                                                    leases end with its link. A request bound to one
                                                    replica (a stored response's follow-up) cannot
                                                    wait for another: its `Lease` names it (`pin`),
                                                    and is counted without an answer
slots of a model with no limit          workers     merged: each worker picks locally (no message) and
(`outstanding`)                                     reports its counts (`Report`); the controller sums
the ring of a model routed by session   each        derived: every process builds it from the table's
or prefix (which replica owns a key)    process     replica names (blake2b, not Python's salted hash),
                                                    so all agree on each key's owner with no message.
                                                    The bounded load weighs the counts of the one who
                                                    picks: a worker's own in flight for a model with no
                                                    limit (so under N workers a replica turns keys away
                                                    once past 8 of that worker's requests and 1.25x its
                                                    average), the controller's exact sum for a leased
                                                    model (the key travels in `Lease`)
affinity hits and moves                 whoever     merged: a worker's go up in `Report.routed`; a
                                        picks       leased pick is counted by the controller itself
model in-flight count (idle clock,      workers     merged: `Report` (to or from zero within
drain)                                              REPORT_SECONDS); a fence (`Fence`/`Fenced`) makes
                                                    them exact before a drain
finished requests (metrics, traffic,    workers     merged: `Report.done`, `.retries`, `.errors`, `.fallbacks`;
tokens, /usage, the activity log)                   the controller alone counts tokens (router_tokens_total,
                                                    GET /usage) and alone writes the activity log, so a
                                                    rotation is never raced by another process
which replica made a stored response    workers     merged, then pushed: `Owner` up, relayed to the
                                                    others; `Whose` asks after fencing every worker
a client key's counters (rpm and tpm    controller  asked: a request of a key with a limit asks `Quota`
windows, requests in flight)                        before it is admitted; the controller decides on its
                                                    counters (router/tenants/quota.py) and answers
                                                    `QuotaAnswer`; the request's end sends `QuotaDone`
                                                    with the tokens it used. A worker's open quotas end
                                                    with its link (charged their bound). A key without
                                                    limits sends nothing
LoRA adapters an engine holds (loaded,  controller  pushed: `AdapterState` after each change (a load, an
being loaded: Replica.loras)                        unload, a restart, a level-2 wake) and after each
                                                    `Table`. A worker whose copy does not show the
                                                    adapter loaded asks `LoadAdapter` and waits for
                                                    `AdapterAnswer`: the controller runs the load, so
                                                    it is single-flight across workers and within the
                                                    engine's --max-loras. AdapterState comes before
                                                    the answer, so the worker then sees it loaded
which adapters are in use (one in use   workers     merged: `AdapterUse`, the worker's absolute count,
is never unloaded)                                  sent when it leaves or reaches zero (the LRU choice
                                                    needs only busy or idle, and the last use); a
                                                    worker's uses end with its link; a worker whose
                                                    engine answered 404 for a held adapter says
                                                    `AdapterLost` before it asks `LoadAdapter`
======================================  ==========  ====================================================

Why exact idle detection holds: a worker reports a model's count within
`REPORT_SECONDS` when it leaves or reaches zero (other changes within
`COUNTS_SECONDS`), so the controller's idle clock is off by milliseconds at
most. When the controller leaves AWAKE to drain, it fences every worker: a
worker answers the fence only after it has applied the new state (so it admits
nothing more on its own) and flushed its counts, so the controller then knows
every request in flight. A worker asking `Ready` is admitted by its link reader
the moment the answer arrives, before any later state change is read.

The types are NamedTuples, sent as plain tuples led by the kind's number
(`encode`, `decode`): pickle saves a NamedTuple through a Python-level reduce,
about ten times slower than a plain tuple, and the per-request path must not
pay for the names.
"""
from __future__ import annotations

import asyncio
import pickle
import struct
from typing import NamedTuple, Optional, Protocol, Sequence, Union

from router.config import Config
from router.supervision.processes import ProcessState

#: Bumped whenever a message's fields change: both ends must run the same code.
PROTOCOL = 5

#: Longest a worker's count leaving or reaching zero, and a finished request's record, wait before
#: they reach the controller (one message per period carries them all: under load, many requests).
REPORT_SECONDS = 0.005
#: Longest other count changes wait.
COUNTS_SECONDS = 0.25
#: A worker that does not answer a fence in this time is cut off (its requests no longer count).
FENCE_TIMEOUT_SECONDS = 10.0


# ----------------------------------------------------------------------------- records

#: A request a worker finished, for the controller's metrics, traffic, usage and activity log:
#: (model, status, seconds, seconds to the first byte, stream, key name, instance, retries,
#: prompt tokens, completion tokens).
Done = tuple[str, int, float, Optional[float], bool, str, Optional[str], int, Optional[int], Optional[int]]
#: (model, why): a retry's reason, or an engine failure's kind.
Note = tuple[str, str]


# ----------------------------------------------------------------------------- controller -> worker


class Refused(NamedTuple):
    """The worker's `Hello` named another protocol version: the link closes after this."""
    reason: str


class Table(NamedTuple):
    """Build the table of `config` (on connect, after each reload) and answer `Applied(generation)`."""
    generation: int
    config: Config
    #: model -> lifecycle state
    models: dict[str, str]
    #: instance -> (health, process, breaker open_until, breaker opened_for)
    replicas: dict[str, tuple[str, Optional[ProcessState], float, float]]


class ModelState(NamedTuple):
    model: str
    state: str


class ReplicaState(NamedTuple):
    instance: str
    health: str
    process: Optional[ProcessState]


class BreakerState(NamedTuple):
    """The controller's breaker of `instance` (times on the machine's monotonic clock, which every
    process of it shares): each worker's copy takes it whole."""
    instance: str
    open_until: float
    opened_for: float


class Fence(NamedTuple):
    """Answer `Fenced(n)` once everything before is applied and the counts are reported."""
    n: int


class ReadyAnswer(NamedTuple):
    """The answer to `Ready`: `refusal` is None (admitted) or (message, retry_after)."""
    request: int
    refusal: Optional[tuple[str, int]]


class Leased(NamedTuple):
    """The answer to `Lease`: a slot on `instance`, or `refusal` (status 429 or 503, message,
    retry_after)."""
    request: int
    instance: Optional[str]
    refusal: Optional[tuple[int, str, int]]


class QuotaAnswer(NamedTuple):
    """The answer to `Quota`: `standing` (a `Standing` as a plain tuple) when admitted, else
    `refusal` (status, message, retry_after, standing); both None when the key has no limit."""
    request: int
    standing: Optional[tuple[Optional[int], int, float, Optional[int], int, float]]
    refusal: Optional[tuple[int, str, int, tuple[Optional[int], int, float, Optional[int], int, float]]]


class Synced(NamedTuple):
    """Everything the worker sent before `Sync(request)` is applied."""
    request: int


class WhoseAnswer(NamedTuple):
    request: int
    found: Optional[tuple[str, str]]


class AdapterState(NamedTuple):
    """The LoRA adapters `instance`'s engine holds and is loading (the controller's `Replica.loras`)."""
    instance: str
    loaded: tuple[str, ...]
    loading: tuple[str, ...]


class AdapterAnswer(NamedTuple):
    """The answer to `LoadAdapter`: loaded (`refusal` None), or (status 502 or 503, message)."""
    request: int
    refusal: Optional[tuple[int, str]]


# ----------------------------------------------------------------------------- worker -> controller


class Hello(NamedTuple):
    """A worker's first message."""
    protocol: int
    pid: int


class Applied(NamedTuple):
    """The worker serves the table of this generation."""
    generation: int


class Report(NamedTuple):
    """Counts that changed (absolute), finished requests, retries and engine failures. The records
    are plain tuples: one per request, they are most of what crosses the link."""
    counts: dict[str, int]
    outstanding: dict[str, int]
    done: list[Done]
    retries: list[Note]
    errors: list[Note]
    #: model -> (hits, moved) of its keyed picks since the last report (router_affinity_total).
    routed: dict[str, tuple[int, int]]
    #: (from, to): a request one model could not serve went to its fallback.
    fallbacks: Sequence[Note] = ()


class Fenced(NamedTuple):
    n: int


class Ready(NamedTuple):
    """Make `model` ready (wake or start it); the answer admits the request."""
    request: int
    model: str


class Lease(NamedTuple):
    """A slot on a replica of `model` (not one of `exclude`, already tried), from the one queue, in
    the request's priority class (router/tenants/classes.py); with `pin`, on that replica only,
    without waiting; with `key`, the key's replica on the model's ring first (`routing: session |
    prefix`)."""
    request: int
    model: str
    exclude: tuple[str, ...]
    pin: Optional[str]
    key: Optional[int]
    priority: int


class Quota(NamedTuple):
    """May a request of key `key`, which may use up to `bound` tokens, go now? (Its key has a limit.)"""
    request: int
    key: str
    bound: int


class QuotaDone(NamedTuple):
    """The request of quota `request` ended, having used `used` tokens (None: not known, its bound counts)."""
    request: int
    used: Optional[int]


class Unlease(NamedTuple):
    """The request of lease `request` ended (or gave up before its lease came): the slot is free."""
    request: int


class BreakerOutcome(NamedTuple):
    """A request to `instance` failed (`failed`, at monotonic `at`) or a half-open one succeeded."""
    instance: str
    failed: bool
    at: float


class Sync(NamedTuple):
    request: int


class Whose(NamedTuple):
    """Which (model, instance) made a stored response this worker has not heard of."""
    request: int
    response_id: str


class LoadAdapter(NamedTuple):
    """Make `instance`'s engine hold LoRA adapter `adapter` of `model` (joining a load under way); with
    `instance` None, the engine the controller picks for it: one that holds or is loading it, else the
    least loaded (so requests of several workers that find no engine holding it share one load)."""
    request: int
    model: str
    instance: Optional[str]
    adapter: str


class AdapterUse(NamedTuple):
    """This worker's requests for `adapter` on `instance` now (sent when the count leaves or reaches zero)."""
    instance: str
    adapter: str
    requests: int


class AdapterLost(NamedTuple):
    """`instance`'s engine answered 404 for `adapter`, which it was believed to hold: it holds it no more."""
    instance: str
    adapter: str


class Owner(NamedTuple):
    """Worker -> controller -> the other workers: a stored response's replica."""
    response_id: str
    model: str
    instance: str


ToWorker = Union[Refused, Table, ModelState, ReplicaState, BreakerState, Fence, ReadyAnswer, Leased, Synced,
                 WhoseAnswer, Owner, QuotaAnswer, AdapterState, AdapterAnswer]
ToController = Union[Hello, Applied, Report, Fenced, Ready, Lease, Unlease, BreakerOutcome, Sync, Whose, Owner,
                     Quota, QuotaDone, LoadAdapter, AdapterUse, AdapterLost]
Message = Union[ToWorker, ToController]

#: Every kind, in the order of its number on the wire (append only; a change bumps PROTOCOL).
KINDS: tuple[type[Message], ...] = (Hello, Refused, Table, Applied, ModelState, ReplicaState, BreakerState, Fence,
                                    Fenced, Report, Ready, ReadyAnswer, Lease, Leased, Unlease, BreakerOutcome, Sync,
                                    Synced, Whose, WhoseAnswer, Owner, Quota, QuotaAnswer, QuotaDone, AdapterState,
                                    AdapterAnswer, LoadAdapter, AdapterUse, AdapterLost)
_NUMBER = {kind: number for number, kind in enumerate(KINDS)}
_new = tuple.__new__


def encode(message: Message) -> bytes:
    return pickle.dumps((_NUMBER[type(message)], *message), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    fields = pickle.loads(data)
    message: Message = _new(KINDS[fields[0]], fields[1:])
    return message


HEADER = struct.Struct("!I")


class Wire(Protocol):
    """What either end needs of its link: `Channel` over the unix socket, or an in-memory pair in tests."""

    def send(self, message: Message) -> None: ...

    async def receive(self) -> Optional[Message]: ...

    def close(self) -> None: ...


class Channel:
    """Framed messages over one stream. `send` queues at once (no await), so order is kept; what is
    sent in one turn of the loop leaves in one write (under load, many requests' messages share a
    system call)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._pending: list[bytes] = []

    def send(self, message: Message) -> None:
        data = encode(message)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.write)
        self._pending.append(HEADER.pack(len(data)))
        self._pending.append(data)

    def write(self) -> None:
        if self._pending:
            self.writer.write(b"".join(self._pending))
            self._pending.clear()

    async def receive(self) -> Optional[Message]:
        """The next message, or None when the other end has gone."""
        try:
            size = HEADER.unpack(await self.reader.readexactly(HEADER.size))[0]
            return decode(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def close(self) -> None:
        self.write()
        self.writer.close()
