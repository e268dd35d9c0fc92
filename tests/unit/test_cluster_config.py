"""The YAML keys of leader election (``kubernetes.*lease*``), DNS-found replicas (an instance's
``dns_name``) and the nameservers that resolve them (``router.dns_servers``): defaults, and
errors that name the file, the field and the fix."""
from __future__ import annotations

from typing import Any

import pytest
import yaml

from router.config import ConfigError, parse_config


def load(doc: dict[str, Any]) -> Any:
    return parse_config(yaml.safe_dump(doc), "/etc/cluster.yaml", sim=True)


def inst(**extra: Any) -> dict[str, Any]:
    """A DNS-named instance; a key given as None is left out."""
    entry = {"name": "pool", "model": "m", "engine": "vllm", "dns_name": "pool.llm.svc.cluster.local", "port": 8000,
             **extra}
    return {k: v for k, v in entry.items() if v is not None}


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(doc)
    assert str(e.value).count("/etc/cluster.yaml: ") == len(e.value.problems)
    return e.value.problems


def test_leader_election_defaults_follow_the_router_replicas() -> None:
    one = load({"instances": [inst()]}).kubernetes
    assert not one.leader_election and one.lease_name == "kvrouter-leader" and one.lease_ns == "kvrouter"
    assert (one.lease_seconds, one.renew_deadline_seconds, one.retry_period_seconds) == (15, 10, 2)
    three = load({"router": {"replicas": 3}, "kubernetes": {"namespace": "llm"}, "instances": [inst()]}).kubernetes
    assert three.leader_election and three.lease_ns == "llm"
    off = load({"router": {"replicas": 3}, "kubernetes": {"leader_election": False}, "instances": [inst()]})
    assert not off.kubernetes.leader_election
    short = load({"kubernetes": {"lease_seconds": 3, "lease_namespace": "locks"}, "instances": [inst()]}).kubernetes
    assert (short.lease_seconds, short.renew_deadline_seconds, short.retry_period_seconds) == (3, 2, 0.4)
    assert short.lease_ns == "locks"


@pytest.mark.parametrize("kubernetes, field, fix", [
    ({"lease_seconds": 5, "renew_deadline_seconds": 5}, "kubernetes.renew_deadline_seconds", "less than lease_seconds"),
    ({"renew_deadline_seconds": 4, "retry_period_seconds": 4}, "kubernetes.retry_period_seconds", "lower it"),
    ({"lease_name": "Leader_1"}, "kubernetes.lease_name", "lower-case"),
    ({"lease_namespace": "x y"}, "kubernetes.lease_namespace", "lower-case"),
    ({"leader_election": "yes"}, "kubernetes.leader_election", "true or false"),
    ({"lease_seconds": 0}, "kubernetes.lease_seconds", "> 0"),
])
def test_lease_settings_that_cannot_work_are_refused(kubernetes: dict[str, Any], field: str, fix: str) -> None:
    (problem,) = problems({"kubernetes": kubernetes, "instances": [inst()]})
    assert problem.startswith(f"{field}: ") and fix in problem


def test_a_dns_named_instance_is_external_on_its_port() -> None:
    cfg = load({"router": {"dns_servers": ["127.0.0.1:5353", "10.96.0.10", "[fd00::a]:53"], "dns_refresh_seconds": 1},
                "instances": [inst(), inst(name="cmd", model="n", engine="openai", dns_name="cmd.example",
                                       port=9000),
                              inst(name="args", model="o", dns_name="args.example", port=None,
                                   engine_args="--port 8100")]})
    assert cfg.router.dns_servers == (("127.0.0.1", 5353), ("10.96.0.10", 53), ("fd00::a", 53))
    assert cfg.router.dns_refresh_seconds == 1
    pool, cmd, args = cfg.instances
    assert (pool.dns_name, pool.host, pool.port, pool.launch) == ("pool.llm.svc.cluster.local",
                                                                   "pool.llm.svc.cluster.local", 8000, False)
    assert (cmd.port, args.port) == (9000, 8100) and not cmd.launch
    # Until the name resolves, the instance is its one replica, reached by the name.
    assert [i.url for i in cfg.models["m"]] == ["http://pool.llm.svc.cluster.local:8000"]
    resolved = cfg.with_addresses({"pool.llm.svc.cluster.local": ("10.0.0.7", "10.0.0.6", "10.0.0.7")})
    assert [(i.name, i.url) for i in resolved.models["m"]] == [("pool@10.0.0.6", "http://10.0.0.6:8000"),
                                                               ("pool@10.0.0.7", "http://10.0.0.7:8000")]
    assert resolved.instances == cfg.instances  # the YAML's instances stay as written
    assert resolved.with_addresses({"pool.llm.svc.cluster.local": ("10.0.0.7", "10.0.0.6")}) == resolved


@pytest.mark.parametrize("change, field, fix", [
    ({"dns_name": "not a name"}, "instances[0].dns_name", "headless Service"),
    ({"dns_name": "10.0.0.5"}, "instances[0].dns_name", "--host"),
    ({"port": None}, "instances[0].port", "port: 8000"),
    ({"port": 70000}, "instances[0].port", "1-65535"),
    ({"launch": True}, "instances[0].launch", "remove 'launch: true'"),
    ({"engine_args": "--host 10.0.0.5"}, "instances[0].engine_args", "remove its host"),
    ({"engine_args": "--port 8001"}, "instances[0].port", "give one"),
])
def test_dns_named_instances_with_a_problem_are_refused(change: dict[str, Any], field: str, fix: str) -> None:
    (problem,) = problems({"instances": [inst(**change)]})
    assert problem.startswith(f"{field}: ") and fix in problem


@pytest.mark.parametrize("servers", [["dns.local"], "127.0.0.1:99999", [], [53]])
def test_nameservers_must_be_addresses(servers: Any) -> None:
    (problem,) = problems({"router": {"dns_servers": servers}, "instances": [inst()]})
    assert problem.startswith("router.dns_servers") and "nameserver" in problem
