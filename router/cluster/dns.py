"""Engine replicas found by DNS: an instance's `dns_name` (a headless Service) resolved every
`router.dns_refresh_seconds`, each address one replica.

A headless Service's name resolves to one A (or AAAA) record per pod, so
resolving it tells the router which engine pods exist now. `DnsWatcher`
resolves every `dns_name` of the config each round and, when an answer
changed, hands all of them to the router (`RouterState.apply_addresses`),
which rebuilds its table: a replica whose address stayed keeps its state
(health, in-flight requests, connections), a new address becomes a new
replica, a gone one is retired after its requests finish.

What an answer means:

- addresses: exactly those are the replicas;
- the name does not exist, or has no address (NXDOMAIN, NODATA: a Service
  with no pods): no address, so the instance is routed by its name itself,
  whose health checks then fail (503 naming it) until pods come back;
- no answer (timeout, SERVFAIL, no nameserver reachable): the last answer
  is kept, so a DNS hiccup does not take replicas away.

The nameservers are `router.dns_servers` (address and port each), or the
system's (/etc/resolv.conf, with its search domains, as in a pod). Resolving
uses dnspython's asyncio resolver with its cache off: every round asks anew.
dnspython comes with the extra ``kvrouter[kubernetes]`` and is imported only
when a `Resolver` is made (a config with a `dns_name`), so a single-node
install runs without it.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Awaitable, Callable, Mapping, Optional

from router.cluster.extras import require
from router.config import Config
from router.util.periodic import Periodic

if TYPE_CHECKING:
    import dns.asyncresolver

#: What a missing dnspython is reported as.
FEATURE = "engine replicas found by DNS (an instance's dns_name)"

log = logging.getLogger("router.dns")

Addresses = dict[str, tuple[str, ...]]


class Resolver:
    """Resolves names to addresses with the given nameservers ((address, port), ...), or the system's."""

    def __init__(self, servers: tuple[tuple[str, int], ...] = (), timeout: float = 2.0):
        asyncresolver = require("dns.asyncresolver", FEATURE)
        nameserver = require("dns.nameserver", FEATURE)
        self._dns_resolver = resolver = require("dns.resolver", FEATURE)
        self._dns_exception = require("dns.exception", FEATURE)
        self.servers = servers
        self._resolver: Optional[dns.asyncresolver.Resolver]
        if servers:
            self._resolver = asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver.Do53Nameserver(a, port=p) for a, p in servers]
        else:
            try:
                self._resolver = asyncresolver.Resolver()
            except resolver.NoResolverConfiguration:
                log.warning("no nameserver in /etc/resolv.conf: dns_name instances are resolved by the system "
                            "(getaddrinfo); set router.dns_servers to ask a nameserver directly")
                self._resolver = None
        if self._resolver is not None:
            self._resolver.lifetime = timeout
            self._resolver.timeout = timeout
            self._resolver.cache = None

    async def addresses(self, name: str) -> Optional[tuple[str, ...]]:
        """`name`'s IPv4 and IPv6 addresses, sorted; () when it has none; None when no answer came."""
        if self._resolver is None:
            return await self._system(name)
        answers = await asyncio.gather(*(self._query(name, rdtype) for rdtype in ("A", "AAAA")))
        found = [a for answer in answers if answer is not None for a in answer]
        if None in answers and not found:
            return None
        return tuple(sorted(set(found)))

    async def _query(self, name: str, rdtype: str) -> Optional[list[str]]:
        """The addresses of one record type; None when no answer came."""
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(name, rdtype, search=True)
        except (self._dns_resolver.NXDOMAIN, self._dns_resolver.NoAnswer):
            return []
        except self._dns_exception.DNSException as e:  # timeout, SERVFAIL from every nameserver, ...
            log.debug("resolving %s %s: %s", name, rdtype, e)
            return None
        return [r.address for r in answer]

    async def _system(self, name: str) -> Optional[tuple[str, ...]]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            return () if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)) else None
        return tuple(sorted({str(info[4][0]) for info in infos}))


class DnsWatcher:
    """Resolves the `dns_name` of every instance of `config()` each `router.dns_refresh_seconds` and
    awaits `apply(addresses)` (every name -> its addresses) when any answer changed."""

    def __init__(self, config: Callable[[], Config], apply: Callable[[Addresses], Awaitable[object]]):
        self._config = config
        self._apply = apply
        self._resolver: Optional[Resolver] = None
        self._periodic = Periodic("dns", self.refresh, lambda: self._config().router.dns_refresh_seconds, log,
                                  first_at_once=False)

    def resolver(self, config: Config) -> Resolver:
        """The resolver for the config's nameservers (made anew when a reload changes them)."""
        if self._resolver is None or self._resolver.servers != config.router.dns_servers:
            self._resolver = Resolver(config.router.dns_servers)
        return self._resolver

    async def refresh(self) -> bool:
        """One round: resolve every name, apply the answers if any changed; whether they did."""
        config = self._config()
        names = sorted({i.dns_name for i in config.instances if i.dns_name})
        if not names and not config.resolved:
            return False
        resolver = self.resolver(config)
        answers = await asyncio.gather(*(resolver.addresses(n) for n in names))
        last = dict(config.resolved)
        addresses: Addresses = {}
        for name, answer in zip(names, answers):
            if answer is None:
                log.warning("dns_name %s: no answer from the nameservers; keeping its last addresses %s",
                            name, ", ".join(last.get(name, ())) or "(none)")
                if name in last:
                    addresses[name] = last[name]
            else:
                addresses[name] = answer
        if config.with_addresses(addresses).resolved == config.resolved:
            return False
        for name in names:
            if last.get(name) != addresses.get(name):
                log.info("dns_name %s: %s", name, ", ".join(addresses.get(name, ())) or "no address")
        await self._apply(addresses)
        return True

    def start(self) -> None:
        self._periodic.start()

    async def stop(self) -> None:
        await self._periodic.stop()


def changed(old: Mapping[str, tuple[str, ...]], new: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, list[str]]]:
    """Per name, the addresses added and removed from `old` to `new` (names with no change left out)."""
    out = {}
    for name in sorted(set(old) | set(new)):
        before, after = set(old.get(name, ())), set(new.get(name, ()))
        if before != after:
            out[name] = {"added": sorted(after - before), "removed": sorted(before - after)}
    return out
