"""Models over replicas, and the live table of every name a request may use.

A `Model` groups its replicas, its wait queue for `max_concurrency` slots and
its lifecycle (the one owner of sleep and wake). The `ModelTable` is an
immutable snapshot: a reload builds a new one that reuses the `Model` and
`Replica` objects whose configuration did not change, so their state (health,
sleep, in-flight counts, pools) carries over, and requests already in flight
hold the objects they started with and finish undisturbed.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import replace
from typing import Callable, Iterator, Optional

from router.config import Config, Instance, RouterSettings, SleepSettings
from router.config.adapters import LoraAdapter
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.adapters import AdapterLoader, AdapterUnavailable
from router.server.fleet.lifecycle import Lifecycle
from router.server.fleet.replica import UNHEALTHY, Replica
from router.server.fleet.sticky import Sticky, sticky_for
from router.tenants.classes import NORMAL, ClassQueue

#: Makes a new model's lifecycle from its name and its members (the router's own, or a proxy
#: worker's view of the controller's, router/server/workers/worker_end.py).
LifecycleFactory = Callable[[str, Callable[[], "tuple[Replica, ...]"]], Lifecycle]


class NoReplica(Exception):
    """No replica of the model can be routed to now (answer 503); `message` says why."""

    def __init__(self, retry_after: int, message: str):
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


class Overloaded(Exception):
    """Every replica is at max_concurrency and the wait queue is full or timed out (429)."""


class Model:
    """A model's replicas, its wait queue, its lifecycle and its replica pick (least outstanding, or a
    request's key on the ring: `Sticky`)."""

    __slots__ = ("name", "replicas", "paths", "lifecycle", "metrics", "sticky", "adapters", "_waiters", "_retry_after")

    def __init__(self, name: str, replicas: tuple[Replica, ...], lifecycles: LifecycleFactory,
                 metrics: ModelMetrics, retry_after: int):
        self.name = name
        self.replicas = replicas
        #: The client paths every replica's engine serves (so any replica can take any of them).
        self.paths = served_paths(replicas)
        #: The ring of `routing: session | prefix` (requests with a key follow it); None: least outstanding.
        self.sticky: Optional[Sticky] = sticky_for(replicas)
        self.lifecycle = lifecycles(name, self.members)
        self.metrics = metrics
        #: Loads its LoRA adapters into its replicas (an adapter lives and sleeps with its base model);
        #: made by the first adapter request (`loader`).
        self.adapters: Optional[AdapterLoader] = None
        self._waiters: ClassQueue[asyncio.Future[Replica]] = ClassQueue()
        self._retry_after = retry_after

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (bounded by the replicas' max_queue), for /metrics."""
        return len(self._waiters)

    def members(self) -> tuple[Replica, ...]:
        """The replicas the model has now (read by its lifecycle at each transition)."""
        return self.replicas

    def reconfigure(self, replicas: tuple[Replica, ...], settings: SleepSettings, retry_after: int,
                    start_timeout: float) -> None:
        """Take a reload's replicas and settings; queued requests may find a slot on the new ones."""
        self.replicas = replicas
        self.paths = served_paths(replicas)
        self.sticky = sticky_for(replicas)
        self.lifecycle.settings = settings
        self.lifecycle.start_timeout = start_timeout
        self._retry_after = retry_after
        if self._waiters:
            self.dispatch()

    def pick(self, now: float, exclude: tuple[Replica, ...] = (), key: Optional[int] = None,
             adapter: Optional[str] = None) -> Replica:
        """Take a slot on the least-loaded routable replica without waiting (a request with a `key`:
        on the key's replica, `Sticky`; one for a LoRA `adapter`: `_pick_for_adapter`, whatever its key).

        Raises NoReplica when none is routable, Overloaded when all are full.
        """
        if adapter is not None:
            return self._pick_for_adapter(now, exclude, adapter)
        if key is not None and self.sticky is not None:
            return self._pick_by_key(self.sticky, now, exclude, key)
        best = None
        full = False
        for r in self.replicas:
            if r in exclude or not r.routable(now):
                continue
            if r.limit is not None and r.outstanding >= r.limit:
                full = True
                continue
            if best is None or r.outstanding < best.outstanding:
                best = r
        return self._taken(best, full, now)

    def _taken(self, best: Optional[Replica], full: bool, now: float) -> Replica:
        """A pick's end: a slot on `best`; else Overloaded when some replica was only full (the
        request may wait), NoReplica when none could serve."""
        if best is not None:
            best.take_slot(now)
            return best
        if full:
            raise Overloaded()
        raise NoReplica(self._wait_hint(now), self.unavailable_reason())

    def _pick_by_key(self, sticky: Sticky, now: float, exclude: tuple[Replica, ...], key: int) -> Replica:
        best, full, hit = sticky.choose(self.replicas, now, exclude, key)
        if best is not None:
            self.metrics.routed(hit)
        return self._taken(best, full, now)

    def _pick_for_adapter(self, now: float, exclude: tuple[Replica, ...], adapter: str) -> Replica:
        """A replica that declares `adapter`, those that hold it or are loading it first (so one load
        serves every request that comes meanwhile), then the least loaded."""
        best = None
        full = False
        for r in self.replicas:
            if r in exclude or not r.routable(now) or adapter not in r.loras.known:
                continue
            if r.limit is not None and r.outstanding >= r.limit:
                full = True
                continue
            if best is None or _lora_rank(r, adapter) < _lora_rank(best, adapter):
                best = r
        return self._taken(best, full, now)

    @property
    def loader(self) -> AdapterLoader:
        if self.adapters is None:
            self.adapters = AdapterLoader(self.lifecycle.control)
        return self.adapters

    async def adapter_ready(self, replica: Replica, adapter: str) -> None:
        """Return once `replica`'s engine holds LoRA `adapter` (loaded here; a proxy worker asks its
        controller); raise AdapterUnavailable when it cannot."""
        await self.loader.ensure(replica, adapter)

    async def place_adapter(self, adapter: str) -> None:
        """Have the replica a request for `adapter` would be given hold it: the one holding or loading
        it, else the least loaded (a proxy worker's requests ask this of the controller before their
        pick, so requests of several workers share one load). A failure is left to the request's own
        `adapter_ready`, which reports it."""
        now = time.monotonic()
        homes = [r for r in self.replicas if r.routable(now) and adapter in r.loras.known]
        if homes:
            try:
                await self.loader.ensure(min(homes, key=lambda r: _lora_rank(r, adapter)), adapter)
            except AdapterUnavailable:
                pass

    def adapter_lost(self, replica: Replica, adapter: str) -> None:
        """`replica`'s engine does not hold `adapter` after all (it answered 404: restarted unseen, or
        unloaded behind the router's back); the next request loads it again."""
        if adapter in replica.loras.loaded:
            replica.loras.unloaded(adapter)
            replica.events.publish("lora", "lost", replica.instance.model, replica.name, adapter=adapter)

    def adapter_use(self, replica: Replica, adapter: str, begin: bool) -> None:
        """A request for `adapter` begins or ends on `replica` (one in use is not unloaded)."""
        if begin:
            replica.loras.begin(adapter, time.monotonic())
        else:
            replica.loras.end(adapter, time.monotonic())

    def take(self, replica: Replica) -> Replica:
        """A slot on this very replica (it holds what the request refers to), without waiting."""
        if not replica.routable(time.monotonic()):
            raise NoReplica(self._retry_after, f"Instance {replica.name}, which holds what this request refers to, "
                                               f"cannot take requests now: {replica.down_reason()}.")
        if replica.limit is not None and replica.outstanding >= replica.limit:
            raise Overloaded()
        replica.take_slot(time.monotonic())
        return replica

    async def acquire(self, now: float, exclude: tuple[Replica, ...], queue_timeout: float,
                      key: Optional[int] = None, klass: int = NORMAL, adapter: Optional[str] = None) -> Replica:
        """Like `pick`, but waits (bounded by the replicas' max_queue) while all are full: higher
        priority classes first (router/tenants/classes.py), first come first served within one.

        A waiter is handed a slot by `dispatch`: when a request ends, when an
        ejection ends, or after a health probe. It fails with NoReplica if no
        replica is routable any more, and with Overloaded after `queue_timeout`.
        A waiter with a key takes the first free slot too (its own replica was full).
        """
        try:
            return self.pick(now, exclude, key, adapter)
        except Overloaded:
            cap = sum(r.max_queue for r in self.replicas if r not in exclude and r.routable(now))
            if len(self._waiters) >= cap:
                raise
        fut: asyncio.Future[Replica] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut, klass)
        try:
            replica = await asyncio.wait_for(fut, queue_timeout)
        except BaseException as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed a slot just as the wait ended: give it back
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(e, asyncio.TimeoutError):
                raise Overloaded() from None
            raise
        if key is not None and self.sticky is not None:
            self.metrics.routed(self.sticky.owns(self.replicas, key, replica))
        return replica

    def release(self, replica: Replica) -> None:
        """Free a slot; queued requests, if any, take it over."""
        replica.release_slot()
        if self._waiters.size:
            self.dispatch()

    def failed(self, replica: Replica, now: float, settings: RouterSettings) -> None:
        """`replica` failed a request: its breaker opens; when it may take one again, queued requests may."""
        replica.failed(now, settings, self.dispatch)

    def dispatch(self) -> None:
        """Hand free slots of routable replicas to queued requests, higher classes first, then
        first come first served.

        When no replica is routable at all, the queued requests fail with
        NoReplica at once (503), as new ones do, rather than waiting out
        their queue timeout.
        """
        waiters = self._waiters
        now = time.monotonic()
        while waiters:
            fut = waiters.first()
            if fut.done():
                waiters.popleft()
                continue
            try:
                replica = self.pick(now)
            except Overloaded:
                return
            except NoReplica as e:
                waiters.popleft()
                fut.set_exception(NoReplica(e.retry_after, e.message))
                continue
            waiters.popleft()
            fut.set_result(replica)

    def unavailable_reason(self) -> str:
        """The 503 message: each replica that cannot serve, and why (its process state and log when known)."""
        down = [r for r in self.replicas if not r.running]
        if down and len(down) == len(self.replicas):
            return (f"No engine of model '{self.name}' is running: "
                    f"{'; '.join(r.down_reason() for r in down)}.")
        return f"No healthy engine of model '{self.name}' is available; retry later."

    def _wait_hint(self, now: float) -> int:
        """Seconds until a replica may be routable again, for Retry-After."""
        ejected = [r.ejected_until - now for r in self.replicas if r.health != UNHEALTHY and r.ejected_until > now]
        return max(1, math.ceil(min(ejected))) if ejected else self._retry_after


def _lora_rank(replica: Replica, adapter: str) -> tuple[bool, int]:
    """Replicas holding (or loading) `adapter` first, then the least loaded."""
    return not replica.loras.holds(adapter), replica.outstanding


def served_paths(replicas: tuple[Replica, ...]) -> frozenset[str]:
    return frozenset.intersection(*(frozenset(r.instance.spec.client_paths) for r in replicas)) if replicas else frozenset()


def retry_hint(config: Config) -> int:
    """Retry-After for a model with no routable replica: the next health probe may bring one back."""
    return max(1, math.ceil(config.router.health_check_interval_seconds))


#: Makes a model: `Model`, or a proxy worker's (router/server/workers/worker_end.py).
ModelFactory = Callable[[str, "tuple[Replica, ...]", LifecycleFactory, ModelMetrics, int], Model]


class ModelTable:
    """Every routable name -> its Model: one immutable snapshot of the configuration."""

    def __init__(self, models: dict[str, Model], routes: dict[str, str],
                 adapters: Optional[dict[str, LoraAdapter]] = None):
        self._models = models
        self._routes: dict[str, Model] = {n: models[m] for n, m in routes.items()}
        #: LoRA adapter name -> the adapter (routed, in `_routes`, to its base model).
        self._adapters = adapters or {}
        #: Every client path some model serves: what the app sends to the proxy.
        self.client_paths = frozenset().union(*(m.paths for m in models.values()))

    @classmethod
    def build(cls, config: Config, events: Events, metrics: Callable[[str], ModelMetrics],
              lifecycles: LifecycleFactory, previous: Optional[ModelTable] = None,
              model_type: ModelFactory = Model) -> ModelTable:
        """The table for `config`, reusing `previous`'s models and unchanged replicas (a proxy
        worker's models lease their slots from the controller: `model_type`).

        A replica is reused when its instance is exactly as before; a changed
        one is replaced by a fresh replica (the old one finishes its requests).
        """
        old_models = previous._models if previous is not None else {}
        old_replicas = {r.name: r for m in old_models.values() for r in m.replicas}
        retry = retry_hint(config)
        models: dict[str, Model] = {}
        for name, instances in config.models.items():
            replicas = tuple(_reuse(old_replicas.get(i.name), i, events) for i in instances)
            model = old_models.get(name)
            start_timeout = config.residency.start_timeout_seconds
            if model is None:
                model = model_type(name, replicas, lifecycles, metrics(name), retry)
            else:
                model.reconfigure(replicas, config.sleep, retry, start_timeout)
            models[name] = model
        kept = {r for m in models.values() for r in m.replicas}
        for replica in old_replicas.values():
            if replica not in kept:
                replica.retire()
        adapters = {a.name: a for i in config.instances for a in i.lora_adapters}
        return cls(models, config.routes, {n: a for n, a in adapters.items() if config.routes.get(n) in models})

    def get(self, name: str) -> Optional[Model]:
        """The model a request names (model, alias or served name), or None."""
        return self._routes.get(name)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters clients may name, each a model of its own to them (and to key scopes)."""
        return tuple(self._adapters)

    def adapter(self, name: Optional[str]) -> Optional[LoraAdapter]:
        """The LoRA adapter `name` is, or None (a model, alias or served name; or unknown)."""
        return self._adapters.get(name) if name is not None else None

    def __iter__(self) -> Iterator[Model]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def names(self) -> list[str]:
        """Every routable name, in config order."""
        return list(self._routes)

    def aliases(self, model: Model) -> list[str]:
        """The names other than its own (and its adapters') that lead to `model`."""
        return [n for n, m in self._routes.items() if m is model and n != model.name and n not in self._adapters]

    def replicas(self) -> Iterator[Replica]:
        for m in self._models.values():
            yield from m.replicas

    def replica(self, name: str) -> Optional[Replica]:
        """The replica of the instance called `name` (supervisord's program name)."""
        found = self.instance(name)
        return found[1] if found is not None else None

    def instance(self, name: str) -> Optional[tuple[Model, Replica]]:
        """The model and replica of the instance called `name` (an instance serves one model)."""
        return next(((m, r) for m in self._models.values() for r in m.replicas if r.name == name), None)


def _reuse(replica: Optional[Replica], instance: Instance, events: Events) -> Replica:
    """The replica for `instance`: the old one when only its aliases, routing, shaping, fallbacks or LoRA
    adapters changed (the table's business, or read from `replica.instance` per request; the adapters
    it holds stay held), else a fresh one."""
    if replica is not None and not replica.retired and _own(replica.instance) == _own(instance):
        replica.reconfigure(instance)
        return replica
    # The same supervisord program: its process state carries over.
    return Replica(instance, events, process=replica.process if replica is not None else None)


def _own(instance: Instance) -> Instance:
    """What of an instance is its replica's business: not what a reload may change under a live replica."""
    return replace(instance, aliases=(), routing="", routing_prefix_chars=0, shaping=None, fallbacks=(), lora_adapters=())
