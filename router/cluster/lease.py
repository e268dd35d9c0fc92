"""Leader election among router replicas by a Kubernetes Lease (coordination.k8s.io/v1).

Exactly one router replica makes lifecycle decisions (idle sleep, residency);
the others forward and ask it. `LeaseElector` decides which, through the
official `kubernetes` client's `CoordinationV1Api`, the way client-go's
leader election does:

- A candidate reads the Lease. When it is missing it creates it; when it is
  free (no holder) or its holder has not renewed it for `lease_seconds` it
  replaces it with itself as holder. The write carries the resourceVersion
  it read, so of two candidates racing only one succeeds; the other gets
  409 Conflict and stays a follower.
- The leader renews every `retry_period_seconds`. It leads until
  `renew_deadline_seconds` after the start of its last successful renewal,
  and stops leading then (`is_leader` turns false at that instant, a timer
  tells the callbacks) even while a call to the API server still hangs.
- "Has not renewed for lease_seconds" is judged on this process's
  monotonic clock from the moment it saw the Lease change (its
  resourceVersion), never from the timestamps in the Lease, so clocks of
  different machines need not agree. A follower first sees a renewal after
  the leader sent it, and waits `lease_seconds` > `renew_deadline_seconds`
  from then: a leader that cannot renew has stopped leading before anyone
  else may take the Lease. Every replica reads the same YAML, so all use the
  same durations (the Lease's own `leaseDurationSeconds` is written, rounded
  up to whole seconds, for people and other tools).

The holder is written as ``<identity>@<address>`` (e.g.
``router-7d9f-x2@10.0.0.5:8080``), so a follower learns where to reach the
leader from the Lease alone: `leader_address()`.

The client is blocking; each round runs in a worker thread
(`asyncio.to_thread`), one at a time. Why not `kubernetes.leaderelection`,
which the client ships: it runs in threads with `time.sleep`, takes whole
seconds only, calls `sys.exit` on bad settings, reads the process-wide
default client configuration, has no way to stop, returns for good after its
first loss of leadership, and steps down only once a renewal call returns
(a hung call keeps it leading past its deadline).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from router.cluster.extras import require

log = logging.getLogger("router.lease")

#: What a missing Kubernetes client is reported as (it comes with the extra kvrouter[kubernetes]).
FEATURE = "leader election by a Kubernetes Lease (kubernetes.leader_election)"

#: Called with a state ("started", "stopped", "leader") and details; fits `Events.publish` with its kind bound.
OnChange = Callable[..., None]


def holder_text(identity: str, address: str) -> str:
    """What the Lease's holderIdentity says of a router: who it is and where others reach it."""
    return f"{identity}@{address}"


def split_holder(holder: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """holderIdentity -> (identity, address); a holder written by something else has no address."""
    if not holder:
        return None, None
    identity, at, address = holder.rpartition("@")
    return (identity, address) if at else (holder, None)


def default_identity(port: int) -> tuple[str, str]:
    """(identity, address) of this router: the pod's name and IP from the downward API
    (POD_NAME, POD_IP, as the rendered Deployment sets them), else the host's name."""
    name = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    ip = os.environ.get("POD_IP") or socket.gethostname()
    host = f"[{ip}]" if ":" in ip else ip
    return name.replace("@", "-"), f"{host}:{port}"


def api_client(configuration: Any = None) -> Any:
    """A `kubernetes.client.ApiClient`: for `configuration` when given (tests point it at a fake API
    server), else the pod's service account when in a cluster, else the user's kubeconfig. The
    process-wide default configuration is never read or changed."""
    client = require("kubernetes.client", FEATURE)
    config = require("kubernetes.config", FEATURE)
    if configuration is None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


@dataclass(frozen=True)
class _Round:
    """What one round against the API server found."""

    #: This candidate holds the Lease now (it created, took or renewed it).
    holds: bool
    #: The holderIdentity last seen (None: free, or unknown after an error or a conflict).
    holder: Optional[str] = None
    #: The call failed (network, 5xx, timeout); a conflict is not an error.
    error: Optional[str] = None


class LeaseElector:
    """One candidate for the Lease `namespace`/`name`; run `run()` as a task for the router's life.

    `api` is a `kubernetes.client.ApiClient` (see `api_client`). `on_change`,
    when given, is called on the event loop as ``on_change("started", ...)``
    when this router starts leading, ``on_change("stopped", reason=...,
    led_until=...)`` when it stops, and ``on_change("leader", leader=...,
    address=...)`` when the leader it sees changes (None: no one leads).
    `started_leading` / `stopped_leading` are `asyncio.Event`s set on those
    transitions (each cleared by the other).
    """

    def __init__(self, api: Any, identity: str, address: str, name: str, namespace: str,
                 lease_seconds: float = 15.0, renew_deadline_seconds: float = 10.0,
                 retry_period_seconds: float = 2.0, on_change: Optional[OnChange] = None,
                 release_on_stop: bool = True):
        if not 0 < retry_period_seconds < renew_deadline_seconds < lease_seconds:
            raise ValueError(f"need 0 < retry_period_seconds ({retry_period_seconds}) < renew_deadline_seconds "
                             f"({renew_deadline_seconds}) < lease_seconds ({lease_seconds})")
        if "@" in identity or not identity:
            raise ValueError(f"identity {identity!r} must be non-empty and hold no '@'")
        client = require("kubernetes.client", FEATURE)
        self._client = client
        self._api = client.CoordinationV1Api(api)
        self.identity = identity
        self.address = address
        self.holder = holder_text(identity, address)
        self.name = name
        self.namespace = namespace
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline_seconds
        self.retry_period = retry_period_seconds
        self.release_on_stop = release_on_stop
        self._on_change = on_change
        #: Each call to the API server gives up after this long (a round makes two at most).
        self._call_timeout = max(0.05, renew_deadline_seconds / 2)
        self.started_leading = asyncio.Event()
        self.stopped_leading = asyncio.Event()
        self.stopped_leading.set()
        #: While leading: monotonic time when leadership ends unless renewed first.
        self._deadline = 0.0
        self._leading = False
        self._led_since = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._stop = asyncio.Event()
        # Written only by the worker thread of the current round (rounds never overlap):
        self._observed_version: Optional[str] = None
        self._observed_holder: Optional[str] = None
        #: Monotonic time the Lease was first seen at `_observed_version` (after the read returned).
        self._observed_at = 0.0
        #: The leader last announced through on_change (a holderIdentity), so it changes once.
        self._announced: Optional[str] = None

    @classmethod
    def from_config(cls, config: Any, port: int, configuration: Any = None,
                    on_change: Optional[OnChange] = None) -> "LeaseElector":
        """The elector a router serving on `port` runs for `config` (its `kubernetes` block): this pod
        (`default_identity`) as candidate for the Lease, through `api_client(configuration)`."""
        k8s = config.kubernetes
        identity, address = default_identity(port)
        return cls(api_client(configuration), identity, address, k8s.lease_name, k8s.lease_ns,
                   lease_seconds=k8s.lease_seconds, renew_deadline_seconds=k8s.renew_deadline_seconds,
                   retry_period_seconds=k8s.retry_period_seconds, on_change=on_change)

    # ------------------------------------------------------------------ what callers read

    @property
    def is_leader(self) -> bool:
        """Whether this router leads now: exact to the instant, even when the event loop runs late."""
        return self._leading and time.monotonic() < self._deadline

    def leader(self) -> Optional[str]:
        """The holderIdentity of the current leader (``identity@address``), or None when no one
        is known to lead (the Lease is free, expired, or not read yet)."""
        if self.is_leader:
            return self.holder
        holder = self._observed_holder
        if not holder or holder == self.holder:
            return None  # we hold it on paper but our deadline passed: we do not know of a leader
        if time.monotonic() >= self._observed_at + self.lease_seconds:
            return None
        return holder

    def leader_address(self) -> Optional[str]:
        """Where other routers reach the current leader (``host:port``), or None when none is known."""
        return split_holder(self.leader())[1]

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Acquire, renew, step down, forever (until `stop()` or cancellation)."""
        self._stop.clear()
        try:
            while not self._stop.is_set():
                attempt = time.monotonic()
                result = await asyncio.to_thread(self._round, attempt)
                self._after_round(attempt, result)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.retry_period)
        finally:
            self._step_down("stopping")
            if self.release_on_stop and self._stop.is_set() and self._observed_holder == self.holder:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._release)

    async def stop(self) -> None:
        """End `run()` at its next wait; a leader steps down at once and frees the Lease, so
        another replica takes over without waiting out `lease_seconds`."""
        self._stop.set()
        self._step_down("stopping")

    def _after_round(self, attempt: float, result: _Round) -> None:
        now = time.monotonic()
        if result.holds and not self._stop.is_set():  # a round that ends after stop() does not lead again
            deadline = attempt + self.renew_deadline
            if now < deadline:
                self._deadline = deadline
                self._arm(deadline)
                if not self._leading:
                    self._start_leading(now)
        elif self._leading and result.holder not in (None, self.holder):
            self._step_down(f"the Lease is held by {result.holder}")
        elif result.error is not None:
            log.warning("lease %s/%s: %s", self.namespace, self.name, result.error)
        self._announce()

    def _start_leading(self, now: float) -> None:
        self._leading = True
        self._led_since = now
        log.info("lease %s/%s: %s leads", self.namespace, self.name, self.holder)
        self.stopped_leading.clear()
        self.started_leading.set()
        self._notify("started", identity=self.identity, address=self.address)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # call_at is on the loop's clock; time.monotonic is the same clock for asyncio's default loops,
        # but a delay is clock-agnostic.
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._leading and time.monotonic() >= self._deadline:
            self._step_down("could not renew the Lease before the renew deadline")
            self._announce()

    def _step_down(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._leading:
            return
        led_until = min(self._deadline, time.monotonic())
        self._leading = False
        self._deadline = 0.0
        log.warning("lease %s/%s: %s stops leading: %s", self.namespace, self.name, self.holder, reason)
        self.started_leading.clear()
        self.stopped_leading.set()
        self._notify("stopped", identity=self.identity, reason=reason, led_since=self._led_since, led_until=led_until)

    def _announce(self) -> None:
        leader = self.leader()
        if leader != self._announced:
            self._announced = leader
            identity, address = split_holder(leader)
            self._notify("leader", leader=identity, address=address)

    def _notify(self, state: str, **detail: Any) -> None:
        if self._on_change is not None:
            try:
                self._on_change(state, **detail)
            except Exception:
                log.exception("lease %s/%s: the on_change callback failed", self.namespace, self.name)

    # ------------------------------------------------------------------ one round (worker thread)

    def _round(self, attempt: float) -> _Round:
        """Read the Lease, then create, take or renew it when this candidate may."""
        from kubernetes.client.rest import ApiException

        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._call_timeout)
        except ApiException as e:
            if e.status != 404:
                return _Round(False, error=f"reading the Lease failed: {_reason(e)}")
            return self._write(None, attempt)
        except Exception as e:  # connection refused, timeout, TLS: the API server cannot be reached
            return _Round(False, error=f"cannot reach the API server: {e}")
        version = lease.metadata.resource_version if lease.metadata else None
        spec = lease.spec
        holder = spec.holder_identity if spec is not None else None
        if version != self._observed_version:
            self._observed_version = version
            self._observed_holder = holder
            self._observed_at = time.monotonic()
        mine = holder == self.holder
        if holder and not mine and time.monotonic() < self._observed_at + self.lease_seconds:
            return _Round(False, holder=holder)  # held, and renewed within lease_seconds
        return self._write(lease, attempt)

    def _write(self, lease: Any, attempt: float) -> _Round:
        """Create the Lease (`lease` None) or replace it at the version read, with this candidate as holder."""
        from kubernetes.client.rest import ApiException

        c = self._client
        now = datetime.datetime.now(datetime.timezone.utc)
        old = lease.spec if lease is not None and lease.spec is not None else c.V1LeaseSpec()
        mine = old.holder_identity == self.holder
        spec = c.V1LeaseSpec(
            holder_identity=self.holder,
            lease_duration_seconds=max(1, math.ceil(self.lease_seconds)),
            acquire_time=old.acquire_time if mine and old.acquire_time else now,
            renew_time=now,
            lease_transitions=(old.lease_transitions or 0) + (0 if mine or lease is None else 1),
        )
        try:
            if lease is None:
                body = c.V1Lease(metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace), spec=spec)
                written = self._api.create_namespaced_lease(self.namespace, body, _request_timeout=self._call_timeout)
            else:
                lease.spec = spec  # metadata keeps the resourceVersion read: a write since then is a 409
                written = self._api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                             _request_timeout=self._call_timeout)
        except ApiException as e:
            if e.status == 409:
                # Someone wrote since our read: another candidate (created, took or renewed it), or a late
                # retry of our own. Who holds it now is for the next read to say; a leader keeps leading
                # until its deadline unless that read names another holder.
                return _Round(False)
            return _Round(False, error=f"writing the Lease failed: {_reason(e)}")
        except Exception as e:
            return _Round(False, error=f"cannot reach the API server: {e}")
        self._observed_version = written.metadata.resource_version if written.metadata else None
        self._observed_holder = self.holder
        self._observed_at = time.monotonic()
        return _Round(True, holder=self.holder)

    def _release(self) -> None:
        """Free the Lease if this candidate still holds it (a conflict means it does not any more)."""
        from kubernetes.client.rest import ApiException

        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self._call_timeout)
            if lease.spec is None or lease.spec.holder_identity != self.holder:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = datetime.datetime.now(datetime.timezone.utc)
            self._api.replace_namespaced_lease(self.name, self.namespace, lease, _request_timeout=self._call_timeout)
            log.info("lease %s/%s: released by %s", self.namespace, self.name, self.holder)
        except ApiException as e:
            log.info("lease %s/%s: not released: %s", self.namespace, self.name, _reason(e))


def _reason(e: Any) -> str:
    return f"{e.status} {e.reason}".strip()
