"""The cluster features' packages are an extra (kvrouter[kubernetes]): a config that uses one whose
package is missing is a problem naming the extra; one that uses none needs neither."""
from __future__ import annotations

import sys

import pytest

from router.cluster.dns import Resolver
from router.cluster.extras import EXTRA, MissingExtra, missing_extras
from router.cluster.lease import api_client
from router.config import parse_config

PLAIN = "instances: [{name: a, model: m, engine: vllm, engine_args: ['--port=8001']}]"
CLUSTER = """
router: {replicas: 2}
instances:
  - {name: a, model: m, engine: vllm, engine_args: ['--port=8001']}
  - {name: pool, model: p, engine: vllm, dns_name: pool.test, port: 8000}
"""


@pytest.fixture
def without_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in an install without the extra: importing either package fails."""
    for name in [n for n in sys.modules if n in ("kubernetes", "dns") or n.startswith(("kubernetes.", "dns."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    monkeypatch.setitem(sys.modules, "dns", None)


def test_a_config_using_a_missing_package_names_the_extra(without_extras: None) -> None:
    cluster = parse_config(CLUSTER, "/etc/c.yaml", sim=True)
    assert cluster.kubernetes.leader_election  # on with router.replicas > 1
    assert missing_extras(cluster) == [
        "kubernetes.leader_election: leader election by a Kubernetes Lease needs the Python package kubernetes, "
        f"which is not installed; install it with: pip install '{EXTRA}'",
        "instances pool: dns_name: engine replicas found by DNS needs the Python package dnspython, "
        f"which is not installed; install it with: pip install '{EXTRA}'",
    ]
    assert missing_extras(parse_config(PLAIN, "/etc/a.yaml", sim=True)) == []


def test_the_features_themselves_name_the_extra(without_extras: None) -> None:
    with pytest.raises(MissingExtra, match=r"dnspython, which is not installed; install it with: pip install 'kvrouter\[kubernetes\]'"):
        Resolver()
    with pytest.raises(MissingExtra, match=r"Lease .*kubernetes, which is not installed"):
        api_client()


def test_with_the_packages_nothing_is_missing() -> None:
    assert missing_extras(parse_config(CLUSTER, "/etc/c.yaml", sim=True)) == []
