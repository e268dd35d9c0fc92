"""Replicas found by DNS (router.cluster.dns): an instance's dns_name, resolved by a real DNS
server of the test's own (UDP on 127.0.0.1, answers built with dnspython), each address an engine
on its own loopback address (127.0.0.2, 127.0.0.3), as a headless Service's pods would be."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from helpers import free_port, get_json, post_json, wait_for
from router_support import Stack, loop, stack  # noqa: F401  (fixtures)

from router.cluster.dns import DnsWatcher, Resolver
from router.config import parse_config


class DnsServer:
    """Answers A queries from `records` (name -> addresses); NXDOMAIN for other names, no records
    for other types. `mode` "silent" drops queries (a timeout), "servfail" answers SERVFAIL."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.mode = "answer"
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def answer(self, data: bytes) -> Optional[bytes]:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if self.mode == "silent":
            return None
        response = dns.message.make_response(query)
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A and self.records[name]:
            response.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *self.records[name]))
        return response.to_wire()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def dns_server() -> DnsServer:
    server = DnsServer()
    yield server
    server.close()


def test_resolver_answers_nxdomain_and_no_answer(dns_server: DnsServer) -> None:
    dns_server.records["pool.test"] = ["127.0.0.3", "127.0.0.2"]
    resolver = Resolver((("127.0.0.1", dns_server.port),), timeout=0.3)

    async def ask(name: str) -> Optional[tuple[str, ...]]:
        return await resolver.addresses(name)
    assert asyncio.run(ask("pool.test")) == ("127.0.0.2", "127.0.0.3")
    assert ("pool.test", "A") in dns_server.queries and ("pool.test", "AAAA") in dns_server.queries
    assert asyncio.run(ask("gone.test")) == ()  # NXDOMAIN: the name has no address
    dns_server.records["empty.test"] = []
    assert asyncio.run(ask("empty.test")) == ()  # a Service with no pods
    dns_server.mode = "servfail"
    assert asyncio.run(ask("pool.test")) is None  # no answer: unknown, not empty
    dns_server.mode = "silent"
    assert asyncio.run(ask("pool.test")) is None


def test_watcher_keeps_the_last_answer_when_dns_fails(dns_server: DnsServer) -> None:
    config = parse_config(f"""
router: {{dns_servers: ["127.0.0.1:{dns_server.port}"], dns_refresh_seconds: 0.3}}
instances:
  - {{name: pool, model: m, engine: vllm, dns_name: pool.test, port: 8000}}
""", "<dns>", sim=True)
    state = {"config": config}
    applied: list[dict[str, tuple[str, ...]]] = []

    async def apply(addresses: dict[str, tuple[str, ...]]) -> None:
        applied.append(addresses)
        state["config"] = state["config"].with_addresses(addresses)
    watcher = DnsWatcher(lambda: state["config"], apply)

    async def rounds() -> list[bool]:
        out = [await watcher.refresh()]
        dns_server.mode = "silent"
        out.append(await watcher.refresh())
        dns_server.mode = "answer"
        out.append(await watcher.refresh())  # the same answer: nothing to apply
        dns_server.records["pool.test"] = ["127.0.0.2"]
        out.append(await watcher.refresh())
        del dns_server.records["pool.test"]
        out.append(await watcher.refresh())
        return out
    dns_server.records["pool.test"] = ["127.0.0.2", "127.0.0.3"]
    assert asyncio.run(rounds()) == [True, False, False, True, True]
    assert applied == [{"pool.test": ("127.0.0.2", "127.0.0.3")}, {"pool.test": ("127.0.0.2",)},
                       {"pool.test": ()}]
    # With no address the instance is routed by its name again (its health checks then fail).
    assert [i.name for i in state["config"].models["m"]] == ["pool"]


def replica_names(url: str) -> list[str]:
    """The replicas of model m, as the router (its controller, with workers) reports them."""
    status, report = get_json(f"{url}/health/m")
    assert status in (200, 503), report
    return sorted(r["instance"] for r in report["endpoints"])


def workers_serve_the_table(url: str) -> bool:
    """Every proxy worker has acknowledged the controller's latest table generation (/health/all)."""
    report = get_json(f"{url}/health/all")[1]
    return len(report["workers"]) == 2 and all(w["generation"] == report["generation"] for w in report["workers"])


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_a_dns_name_with_two_addresses_is_balanced_and_a_removed_address_gets_nothing(
        stack: Stack, dns_server: DnsServer, workers: int) -> None:
    port = free_port()
    a = stack.engine(host="127.0.0.2", port=port, interval=0.2)
    b = stack.engine(host="127.0.0.3", port=port, interval=0.2)
    dns_server.records["pool.test"] = ["127.0.0.2", "127.0.0.3"]
    router = stack.router([{"name": "pool", "model": "m", "dns_name": "pool.test", "port": port}],
                          dns_servers=[f"127.0.0.1:{dns_server.port}"], dns_refresh_seconds=0.2, workers=workers)
    # Resolved before the first request: one replica per address (with workers, theirs come from the controller).
    assert replica_names(router.url) == ["pool@127.0.0.2", "pool@127.0.0.3"]
    status, report = get_json(f"{router.url}/health/m")
    assert sorted(r["endpoint"] for r in report["endpoints"]) == [f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"]
    state = router.app.state if workers == 1 else None

    def burst(n: int) -> list[int]:
        body = {"model": "m", "prompt": "hi", "max_tokens": 2}
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: post_json(f"{router.url}/v1/completions", body)[0], range(n)))
    assert burst(8) == [200] * 8
    assert len(a.bodies) > 0 and len(b.bodies) > 0 and len(a.bodies) + len(b.bodies) == 8
    kept = state.table.get("m").replicas[0] if state is not None else None

    dns_server.records["pool.test"] = ["127.0.0.2"]  # one pod gone
    wait_for(lambda: replica_names(router.url) == ["pool@127.0.0.2"], 5)
    if state is not None:
        assert state.table.get("m").replicas[0] is kept  # the staying replica keeps its state
        events = [e for e in state.events.recent() if e.kind == "dns"]
        assert events[-1].detail["changes"] == {"pool.test": {"added": [], "removed": ["127.0.0.3"]}}
    else:
        wait_for(lambda: workers_serve_the_table(router.url), 5, "each worker to acknowledge the new table")
    served_by_b = len(b.bodies)
    assert burst(8) == [200] * 8
    assert len(b.bodies) == served_by_b and len(a.bodies) >= 8
    status, models = get_json(f"{router.url}/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["m"]

    dns_server.records["pool.test"] = ["127.0.0.2", "127.0.0.3"]  # back
    wait_for(lambda: len(replica_names(router.url)) == 2, 5)
    if state is None:
        wait_for(lambda: workers_serve_the_table(router.url), 5, "each worker to acknowledge the new table")
    assert burst(8) == [200] * 8
    assert len(b.bodies) > served_by_b
