"""Two routers that share nothing, in front of the same engines, one leader at a time.

Each router is a real ``python -m router.serve`` on its own loopback address
(127.0.0.2 and 127.0.0.3, the same port, as two pods would have), reading the
same YAML; the engines are simulated vLLM and SGLang servers on 127.0.0.4
and 127.0.0.5. The Lease lives in a fake Kubernetes API server (tests/
fake_kube.py), reached through the official client and a kubeconfig, as
outside a cluster. A model slept through one router is served through the
other; the leader is killed and the other takes over, never before the
Lease has expired.
"""
from __future__ import annotations

import signal
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml
from fake_kube import FakeKube
from helpers import PY, Proc, free_port, get_json, post_json, wait_for, wait_http
from router_support import LoopThread

ROUTERS = {"router-a": "127.0.0.2", "router-b": "127.0.0.3"}
VLLM, SGLANG = "m/v", "m/s"
LEASE_SECONDS, RENEW_DEADLINE, RETRY_PERIOD = 2.0, 1.5, 0.3

pytestmark = pytest.mark.timeout(120)


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.loop = LoopThread()
        self.kube = self.loop.run(FakeKube().start())
        self.port = free_port()
        self.engines = {"v": ("vllm", VLLM, "127.0.0.4", free_port()), "s": ("sglang", SGLANG, "127.0.0.5", free_port())}
        self.procs: dict[str, Proc] = {}
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.kube.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}]}))
        self.config = tmp / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "router": {"router_port": self.port, "health_check_interval_seconds": 0.5, "access_log": False},
            "sleep_manager": {"check_interval_seconds": 0.2, "min_sleep_duration": 0},
            "kubernetes": {"leader_election": True, "lease_name": "test-leader", "lease_namespace": "default",
                           "lease_seconds": LEASE_SECONDS, "renew_deadline_seconds": RENEW_DEADLINE,
                           "retry_period_seconds": RETRY_PERIOD},
            "instances": [{"name": n, "model": model, "engine": kind, "launch": False,
                           "engine_args": [f"--host {host}", f"--port {port}"]}
                          for n, (kind, model, host, port) in self.engines.items()]}))
        for name, (kind, model, host, port) in self.engines.items():
            self.procs[name] = Proc([PY, "-m", "router.sim", "--engine", kind, "--model", model, "--host", host,
                                     "--port", str(port)], log=str(tmp / f"{name}.log"))
        for name, host in ROUTERS.items():
            self.procs[name] = Proc([PY, "-m", "router.serve", "--config", str(self.config), "--host", host],
                                    env={"KUBECONFIG": str(kubeconfig), "POD_NAME": name, "POD_IP": host},
                                    log=str(tmp / f"{name}.log"))
        for _, _, host, port in self.engines.values():
            wait_http(f"http://{host}:{port}/health", timeout=30)
        for name in ROUTERS:
            wait_http(self.url(name) + "/health", timeout=30)

    def url(self, router: str) -> str:
        return f"http://{ROUTERS[router]}:{self.port}"

    def cluster(self, router: str) -> dict[str, Any]:
        return get_json(self.url(router) + "/get_server_info")[1]["cluster"]

    def leader(self, timeout: float = 10) -> str:
        """The router both agree leads (waits for an election)."""
        def agreed() -> Optional[str]:
            views = {r: self.cluster(r) for r in ROUTERS if self.procs[r].p.poll() is None}
            leading = [r for r, v in views.items() if v["leading"]]
            if len(leading) == 1 and all(v["leader"] == f"{leading[0]}@{ROUTERS[leading[0]]}:{self.port}"
                                         for v in views.values()):
                return leading[0]
            return None
        return wait_for(agreed, timeout, "an agreed leader", interval=0.05)

    def state(self, router: str, model: str) -> dict[str, Any]:
        return get_json(self.url(router) + "/sleep/status")[1]["models"][model]

    def action(self, router: str, action: str, model: str) -> tuple[int, Any]:
        return post_json(f"{self.url(router)}/action/{action}/{urllib.parse.quote(model, safe='/')}", {})

    def complete(self, router: str, model: str) -> tuple[int, Any]:
        return post_json(self.url(router) + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})

    def engine_asleep(self, name: str) -> bool:
        """What the vLLM engine itself says."""
        _, _, host, port = self.engines[name]
        return get_json(f"http://{host}:{port}/is_sleeping")[1]["is_sleeping"]

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        self.loop.run(self.kube.stop())
        self.loop.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_a_model_slept_through_one_router_is_served_through_the_other(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(r for r in ROUTERS if r != leader)

    # Slept through the follower: it asks the leader, which does it; the engine sleeps.
    status, body = cluster.action(follower, "sleep", VLLM)
    assert status == 200 and ROUTERS[leader] in body["message"], body
    assert cluster.engine_asleep("v")
    assert cluster.state(leader, VLLM)["sleep_count"] == 1 and cluster.state(follower, VLLM)["sleep_count"] == 0
    # Served through the leader: it wakes the engine itself.
    assert cluster.complete(leader, VLLM)[0] == 200
    assert not cluster.engine_asleep("v") and cluster.state(leader, VLLM)["wake_count"] == 1

    # Slept through the leader; the follower hears it from the engine (vLLM's /is_sleeping), then a
    # request through the follower has the leader wake it.
    assert cluster.action(leader, "sleep", VLLM)[0] == 200
    wait_for(lambda: cluster.state(follower, VLLM)["state"] == "sleeping")
    assert cluster.complete(follower, VLLM)[0] == 200
    assert cluster.state(leader, VLLM)["wake_count"] == 2 and cluster.state(follower, VLLM)["wake_count"] == 0
    assert not cluster.engine_asleep("v")

    # SGLang cannot say whether it sleeps: the follower takes the leader's word for it.
    assert cluster.action(leader, "sleep", SGLANG)[0] == 200
    wait_for(lambda: cluster.state(follower, SGLANG)["state"] == "sleeping")
    assert cluster.complete(follower, SGLANG)[0] == 200
    assert cluster.state(leader, SGLANG)["wake_count"] == 1


def test_the_leader_dies_and_the_other_router_takes_over_after_the_lease(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(r for r in ROUTERS if r != leader)
    assert cluster.action(leader, "sleep", VLLM)[0] == 200
    cluster.procs[leader].stop(signal.SIGKILL)
    killed = time.monotonic()
    # The follower cannot reach the leader: a model it finds asleep gets a 503 naming the leader.
    wait_for(lambda: cluster.state(follower, VLLM)["state"] == "sleeping")
    status, body = cluster.complete(follower, VLLM)
    if status == 503:  # before the Lease ran out: the error says whom it could not ask
        message = body["error"]["message"]
        assert f"{ROUTERS[leader]}:{cluster.port}" in message or "no router leads" in message, message
    else:  # it already leads (a slow machine took the whole lease to answer)
        assert status == 200, body
    assert cluster.leader(timeout=LEASE_SECONDS * 4) == follower
    assert time.monotonic() - killed >= LEASE_SECONDS - RENEW_DEADLINE  # not before the Lease ran out
    # Now it decides: it wakes the engine itself.
    assert cluster.complete(follower, VLLM)[0] == 200 and not cluster.engine_asleep("v")
    holders = [h for h in cluster.kube.holders() if h]
    first_new = holders.index(f"{follower}@{ROUTERS[follower]}:{cluster.port}")
    assert set(holders[:first_new]) == {f"{leader}@{ROUTERS[leader]}:{cluster.port}"}
    # One leader at a time: the new holder's first write came a whole lease after the old one's last.
    writes = cluster.kube.writes
    last_old = max(w.at for w in writes if w.holder and w.holder.startswith(leader))
    first_by_new = min(w.at for w in writes if w.holder and w.holder.startswith(follower))
    assert first_by_new - last_old >= LEASE_SECONDS - 0.1


def test_a_leader_that_shuts_down_frees_the_lease_and_the_other_leads_at_once(cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(r for r in ROUTERS if r != leader)
    stopped = time.monotonic()
    cluster.procs[leader].stop(signal.SIGTERM)
    # Freed on the way out: the other router need not wait out the Lease.
    assert cluster.leader(timeout=LEASE_SECONDS * 4) == follower
    assert time.monotonic() - stopped < LEASE_SECONDS
    assert cluster.kube.holders()[-1] == f"{follower}@{ROUTERS[follower]}:{cluster.port}"
