"""One router's state: the config, the live table and everything that serves or watches it.

`RouterState` is made once per app (no module-level state, so a process can
run many routers). It owns the reload: a new config is diffed against the
running one and applied at once, by swapping the table, the proxy and the
guard whole; the background tasks read them afresh at every round.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from router.cluster.dns import Addresses, DnsWatcher, changed
from router.config import Config, ConfigError, load_config
from router.config.diff import ConfigChange, diff
from router.observe.accesslog import AccessLog
from router.observe.activity import ActivityLog
from router.observe.events import Events
from router.observe.metrics import Metrics
from router.observe.traffic import Traffic
from router.server.fleet.control import EngineControl
from router.server.fleet.costs import Costs
from router.server.fleet.health import HealthChecker
from router.server.fleet.idle import IdleSleeper
from router.server.fleet.leadership import Leadership
from router.server.fleet.lifecycle import Lifecycle, NoPeers
from router.server.fleet.models import LifecycleFactory, ModelTable
from router.server.fleet.replica import Replica
from router.server.fleet.report import StateCollector
from router.server.fleet.residency import Residency
from router.server.proxy.affinity import Owner, ResponseOwners
from router.server.proxy.auth import Guard
from router.server.proxy.forward import Proxy
from router.server.proxy.tenants import LocalGate, limits_of, tenants_for
from router.server.workers.controller_end import WorkerLinks
from router.supervision.processes import ProcessState, ProcessWatcher
from router.tenants.quota import Quotas

log = logging.getLogger("router.state")


class RouterState:
    """Everything one router app owns. `table`, `proxy` and `guard` are replaced whole by a reload;
    the background tasks read them afresh each round."""

    #: Declared here: the parts made before it read it through a callable.
    table: ModelTable

    def __init__(self, config: Config, supervisor_socket: Optional[str] = None):
        self.config = config
        self.control = EngineControl(supervisor_socket)
        #: Every owner's state changes, for whoever follows them (GET /events).
        self.events = Events()
        #: Which models may be awake, asleep or stopped, from the memory budgets.
        #: Every instance's measured start, sleep and wake times (GET /residency, the wake histograms).
        self.costs = Costs()
        self.residency = Residency(lambda: self.table, lambda: self.config.residency,
                                   lambda: self.config.sleep.min_sleep_duration, self.costs)
        self.metrics = Metrics(StateCollector(lambda: self.table, self.residency))
        self.costs.subscribe(self.metrics.transition)
        #: Router replicas under one Lease (kubernetes.leader_election): only the leader decides.
        self.leadership: Optional[Leadership] = (Leadership.from_config(config, self.events)
                                                 if config.kubernetes.leader_election else None)
        #: The proxy workers' links (router.workers > 1): this process is then their controller.
        self.workers: Optional[WorkerLinks] = WorkerLinks(self, self.begin_serving) if config.router.workers > 1 else None
        self.table = ModelTable.build(config, self.events, self.metrics.for_model, self.lifecycles(config))
        self.traffic = Traffic([m.name for m in self.table])
        self.traffic.activity = ActivityLog(config.router.activity_log) if config.router.activity_log else None
        self.health = HealthChecker(self.control, lambda: self.table, lambda: self.config.router)
        self.idle = IdleSleeper(lambda: self.table, lambda: self.config.sleep, self.residency, self.decides,
                                self.events)
        self.access_log: Optional[AccessLog] = AccessLog() if config.router.access_log else None
        #: Which replica made each stored response; outlives reloads, as the replicas do.
        self.owners = ResponseOwners(elsewhere=self.owner_in_workers if self.workers is not None else None)
        #: Every limited client key's counters (rpm, tpm, in flight): this process owns them, and its
        #: proxy workers ask it (router/server/workers/messages.py). They outlive reloads.
        self.quotas = Quotas()
        self.quotas.update(limits_of(config.router.api_keys))
        self.proxy = self.make_proxy(config)
        self.guard = Guard(config.router, self.table.client_paths)
        #: supervisord's view of every engine process, where the stack runs under supervisord.
        self.processes = ProcessWatcher(supervisor_socket, self.on_process) if supervisor_socket else None
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self._reloading: Optional[asyncio.Lock] = None
        #: Resolves instances' dns_name each router.dns_refresh_seconds (started by the app).
        self.dns = DnsWatcher(lambda: self.config, self.apply_addresses)

    def make_proxy(self, config: Config) -> Proxy:
        proxy = Proxy(self.table, config.router, self.traffic, self.access_log, self.owners)
        proxy.tenants = tenants_for(config.router.api_keys, self.table, LocalGate(self.quotas))
        return proxy

    def begin_serving(self) -> None:
        """Clients reach the models from now (with proxy workers, once they are connected): idle
        time counts from here, and the idle loop starts."""
        for model in self.table:
            model.lifecycle.touch()
        self.idle.start()

    async def owner_in_workers(self, response_id: str) -> Optional[Owner]:
        """A stored response not known here yet: what the workers have learned, once they all
        have told it (a fence: each answers after the `owner` messages it sent before)."""
        assert self.workers is not None
        await self.workers.fence()
        return self.owners.owner(response_id)

    def decides(self) -> bool:
        """Whether this router makes lifecycle decisions now: always, unless it follows a leader."""
        return self.leadership is None or self.leadership.local()

    def lifecycles(self, config: Config) -> LifecycleFactory:
        """How the table makes a new model's lifecycle under `config`."""
        def make(name: str, members: Callable[[], tuple[Replica, ...]]) -> Lifecycle:
            return Lifecycle(name, members, config.sleep, self.control, self.events, self.residency,
                             config.residency.start_timeout_seconds, peers=self.workers or NoPeers(),
                             authority=self.leadership, costs=self.costs)
        return make

    def on_process(self, process: ProcessState) -> None:
        """supervisord says a program changed: its replica takes the news, and queued requests
        fail at once (503 naming it) if no replica of the model can serve any more."""
        found = self.table.instance(process.name)
        if found is not None:
            model, replica = found
            if replica.set_process(process):
                log.info("instance %s: process %s", replica.name, process.state)
            model.lifecycle.process_changed()
            model.dispatch()

    async def reload(self, addresses: Optional[Addresses] = None) -> ConfigChange:
        """Re-read the YAML and apply it at once; ConfigError (nothing changed) when it does not load.

        New requests see the new table as soon as it is swapped in; requests
        in flight keep the models and replicas they hold, so they finish
        undisturbed. Reloads run one at a time. With `addresses` (new DNS answers, from
        `apply_addresses`) the running config takes them instead; a reload of the file keeps the last.
        """
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            if addresses is not None:
                new = self.config.with_addresses(addresses)
            else:
                new = load_config(self.config.path, sim=True).with_addresses(dict(self.config.resolved))
            change = diff(self.config, new)
            old_table = self.table
            table = ModelTable.build(new, self.events, self.metrics.for_model, self.lifecycles(new),
                                     previous=old_table)
            if self.processes is not None:
                states = self.processes.states()
                for model in table:
                    for replica in model.replicas:
                        if replica.process is None and replica.name in states:
                            replica.set_process(states[replica.name])
                    model.lifecycle.process_changed()
            if new.router.access_log != self.config.router.access_log:
                self.access_log = AccessLog() if new.router.access_log else None
            self.traffic.follow(m.name for m in table)
            if new.router.activity_log != self.config.router.activity_log:
                if self.traffic.activity is not None:
                    self.traffic.activity.close()
                self.traffic.activity = ActivityLog(new.router.activity_log) if new.router.activity_log else None
            self.config = new
            self.table = table
            self.quotas.update(limits_of(new.router.api_keys))
            self.proxy = self.make_proxy(new)
            self.guard = Guard(new.router, table.client_paths)
            if self.workers is not None:
                self.workers.table_changed()
            for name in change.models_removed:
                self.metrics.drop(name)
            removed = [m for m in old_table if table.get(m.name) is not m]
            await asyncio.gather(*(m.lifecycle.close() for m in removed))
            for warning in new.warnings:
                log.warning("%s", warning)
            report = change.report()
            self.events.publish("reload", "applied", changes=report)
            log.info("reloaded %s: %s", new.path, report)
            return change

    async def apply_addresses(self, addresses: Addresses) -> None:
        """New DNS answers (dns_name -> addresses): each address is a replica of its instance's model;
        replicas at addresses still there keep their state, gone ones finish their requests."""
        old = dict(self.config.resolved)
        await self.reload(addresses)
        self.events.publish("dns", "resolved", changes=changed(old, dict(self.config.resolved)))

    async def reload_logged(self) -> None:
        """A reload from SIGHUP: the outcome goes to the log, naming file and field on failure."""
        try:
            await self.reload()
        except ConfigError as e:
            self.events.publish("reload", "refused", problems=[f"{e.path}: {p}" for p in e.problems])
            for problem in e.problems:
                log.error("reload refused, nothing changed: %s: %s", e.path, problem)
