"""The cluster features' packages are an extra (kvrouter[kubernetes]): a config that uses one whose
package is missing is a problem naming the extra (an error of `render --check`, a warning for
Kubernetes manifests, which are written all the same); one that uses none needs neither."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from router.cluster.dns import Resolver
from router.cluster.extras import EXTRA, MissingExtra, missing_extras
from router.cluster.lease import api_client
from router.config import parse_config
from router.render.cli import main as render_main

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


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_render_check_refuses_a_config_whose_router_would_miss_the_extra(
        without_extras: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, CLUSTER)
    for flags in (["--check"], ["--sim", "--out", str(tmp_path / "out")]):
        assert render_main(["--config", cfg, *flags]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"error: {cfg}: kubernetes.leader_election: leader election by a Kubernetes Lease needs the Python package "
            f"kubernetes, which is not installed; install it with: pip install '{EXTRA}'",
            f"error: {cfg}: instances pool: dns_name: engine replicas found by DNS needs the Python package dnspython, "
            f"which is not installed; install it with: pip install '{EXTRA}'",
            "Nothing was written.",
        ]
    assert not (tmp_path / "out").exists()
    assert render_main(["--config", write(tmp_path, PLAIN), "--check"]) == 0  # a single node needs neither


def test_kubernetes_manifests_are_written_without_the_extra_with_a_warning_naming_it(
        without_extras: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, CLUSTER)
    assert render_main(["--config", cfg, "--target", "kubernetes", "--out", str(tmp_path / "k8s")]) == 0
    assert (tmp_path / "k8s" / "kustomization.yaml").is_file()
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if f"pip install '{EXTRA}'" in ln]
    assert [ln.split(": ")[2] for ln in warnings] == ["kubernetes.leader_election", "instances pool"]
    assert all(ln.startswith(f"warning: {cfg}: ") and ln.endswith("the router runs elsewhere and needs it there)")
               for ln in warnings)


def test_with_the_packages_render_check_passes_the_cluster_config(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert render_main(["--config", write(tmp_path, CLUSTER), "--check"]) == 0
    assert EXTRA not in capsys.readouterr().err
