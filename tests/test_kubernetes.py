"""``render --target kubernetes`` and ``render --node``.

The manifests are checked offline against the schemas of a current
Kubernetes release (kubernetes-validate, strict: an unknown field fails), the
router's ConfigMap by the project's own config parser, and a node's
supervisord.conf by supervisord's own parser (test_render.supervisor_programs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helpers import short_tmp  # noqa: F401  (fixture)
from test_render import supervisor_programs, write_config

from router.config import parse_config
from router.render.cli import main

ROOT = Path(__file__).resolve().parent.parent
#: A current Kubernetes release whose schemas the package ships.
K8S_VERSION = kubernetes_validate.latest_version()


def vllm(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": "meta-llama/Llama-3.2-1B", "engine": "vllm",
            "engine_env": ["VLLM_SERVER_DEV_MODE=1"],
            "engine_args": ["--host 10.0.0.5", f"--port={port}", "--enable-sleep-mode"], **extra}


#: Replicas of one model (one on two GPUs), sleep on, an on-demand SGLang, an `openai`
#: command engine, each on GPUs of its own (so each is its own pod), and an engine started elsewhere.
FLEET = {
    "kubernetes": {"namespace": "llm", "images": {"openai": "ghcr.io/ggml-org/llama.cpp:server"},
                   "router_image": "registry.example/kvrouter:1.0"},
    "router": {"router_port": 8080, "replicas": 3, "api_keys": ["k1"]},
    "sleep_manager": {"auto_sleep_enabled": True, "idle_threshold_seconds": 60},
    "residency": {"start_timeout_seconds": 1200},
    "instances": [
        vllm("Llama_A", 8001, engine_env=["VLLM_SERVER_DEV_MODE=1", "CUDA_VISIBLE_DEVICES=0"]),
        vllm("llama-b", 8002, engine_env=["VLLM_SERVER_DEV_MODE=1", "CUDA_VISIBLE_DEVICES=1,2"], node="gpu-2"),
        {"name": "qwen", "model": "Qwen/Qwen3-0.6B", "engine": "sglang", "on_demand": True, "idle_stop_seconds": 600,
         "start_timeout_seconds": 95, "engine_args": "--port 30000 --enable-memory-saver --enable-weights-cpu-backup",
         "engine_env": ["CUDA_VISIBLE_DEVICES=3"]},
        {"name": "gguf", "model": "tiny", "engine": "openai", "health_path": "/v1/models",
         "command": "llama-server -m /models/tiny.gguf --port 8090 --api-key sk-x", "engine_env": {"CUDA_VISIBLE_DEVICES": "4"}},
        {"name": "remote", "model": "big", "engine": "vllm", "launch": False,
         "engine_args": ["--host", "big.example.net", "--port", "9000"]},
    ],
}


def render_k8s(tmp: Path, config: dict[str, Any] | Path, *flags: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = config if isinstance(config, Path) else write_config(tmp, config)
    out = tmp / "k8s"
    assert main(["--config", str(path), "--target", "kubernetes", "--out", str(out), *flags]) == 0
    return out


def documents(out: Path) -> list[dict[str, Any]]:
    """Every object of the folder, in the order kustomization.yaml lists the files."""
    files = yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
    return [d for f in files for d in yaml.safe_load_all((out / f).read_text())]


def objects(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents(out)}


def assert_valid(out: Path) -> None:
    docs = documents(out)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def gpu_requests(deployment: dict[str, Any]) -> list[str]:
    """Each nvidia.com/gpu request of the pod (requests and limits agree)."""
    out = []
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        assert res.get("requests") == res.get("limits")
        out += [v for k, v in res.get("limits", {}).items() if k == "nvidia.com/gpu"]
    return out


def test_example_config_validates(tmp_path: Path) -> None:
    out = render_k8s(tmp_path, ROOT / "example-config.yaml")
    assert_valid(out)
    objs = objects(out)
    assert {k for k, _ in objs} == {"Namespace", "Deployment", "Service", "ConfigMap"}
    # Both engines are on GPU 0 of one node: one pod, one GPU.
    pod = containers(objs["Deployment", "llama-qwen"])
    assert pod["llama"]["image"] == "vllm/vllm-openai:latest"
    assert pod["qwen"]["image"] == "lmsysorg/sglang:latest"
    assert pod["llama"]["command"][:4] == ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model"]
    assert gpu_requests(objs["Deployment", "llama-qwen"]) == ["1"]


def test_fleet_validates_and_fits_the_config(tmp_path: Path) -> None:
    out = render_k8s(tmp_path, FLEET)
    assert_valid(out)
    objs = objects(out)
    names = {name for kind, name in objs if kind == "Deployment"}
    assert names == {"llama-a", "llama-b", "qwen", "gguf", "router"}  # no Deployment for `remote`
    for d in documents(out):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "llm"
            assert {"name", "instance", "component", "part-of", "managed-by"} <= {
                k.split("/")[1] for k in d["metadata"]["labels"]}

    a, b = container(objs["Deployment", "llama-a"]), container(objs["Deployment", "llama-b"])
    assert a["resources"]["limits"] == {"nvidia.com/gpu": "1"} and b["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in b["env"]}
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in a["env"]
    assert a["command"][-4:] == ["--host", "0.0.0.0", "--port=8001", "--enable-sleep-mode"]
    assert objs["Deployment", "llama-b"]["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "gpu-2"}
    for name, timeout in (("llama-a", 1200), ("qwen", 95)):
        c = container(objs["Deployment", name])
        probe = c["startupProbe"]
        assert probe["failureThreshold"] * probe["periodSeconds"] >= timeout
        assert c["livenessProbe"]["httpGet"]["path"] == c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert objs["Deployment", name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    assert objs["Deployment", "qwen"]["spec"]["replicas"] == 1  # on-demand runs from the start here
    gguf = container(objs["Deployment", "gguf"])
    assert gguf["image"] == "ghcr.io/ggml-org/llama.cpp:server"
    assert gguf["command"] == ["llama-server", "-m", "/models/tiny.gguf", "--port", "8090", "--api-key", "sk-x"]
    assert gguf["startupProbe"]["httpGet"]["path"] == "/v1/models"

    router = objs["Deployment", "router"]
    assert router["spec"]["replicas"] == 3
    assert container(router)["image"] == "registry.example/kvrouter:1.0"
    assert objs["Service", "router"]["spec"]["ports"][0]["port"] == 8080


def test_configmap_config_points_at_the_services(tmp_path: Path) -> None:
    out = render_k8s(tmp_path, FLEET)
    objs = objects(out)
    cfg = parse_config(objs["ConfigMap", "router-config"]["data"]["config.yaml"], "/etc/kvrouter/config.yaml")
    by_name = {i.name: i for i in cfg.instances}
    for inst_name, svc in (("Llama_A", "llama-a"), ("llama-b", "llama-b"), ("qwen", "qwen"), ("gguf", "gguf")):
        inst = by_name[inst_name]
        port = objs["Service", svc]["spec"]["ports"][0]["port"]
        assert inst.url == f"http://{svc}.llm.svc.cluster.local:{port}"
        assert not inst.launch and not inst.on_demand
        assert container(objs["Deployment", svc])["ports"][0]["containerPort"] == port
    assert by_name["remote"].url == "http://big.example.net:9000"
    assert by_name["gguf"].auth_headers == {"Authorization": "Bearer sk-x"}
    assert cfg.sleep.auto_sleep_enabled and [k.key for k in cfg.router.api_keys] == ["k1"]
    assert [m for m in cfg.models] == ["meta-llama/Llama-3.2-1B", "Qwen/Qwen3-0.6B", "tiny", "big"]


def test_same_yaml_same_bytes_and_stale_manifests_go(tmp_path: Path) -> None:
    first = render_k8s(tmp_path / "one", FLEET)
    second = render_k8s(tmp_path / "two", FLEET)
    read = lambda out: {p.name: p.read_bytes() for p in sorted(out.iterdir())}  # noqa: E731
    assert read(first) == read(second)
    (first / "mine.yaml").write_text("kept: true\n")
    smaller = {**FLEET, "instances": FLEET["instances"][1:]}
    render_k8s(tmp_path / "one", smaller)
    assert not (first / "engine-llama-a.yaml").exists() and (first / "mine.yaml").exists()
    assert not [p for p in first.iterdir() if p.name.startswith(".render-")]


def test_sim_needs_no_gpu(tmp_path: Path) -> None:
    out = render_k8s(tmp_path, FLEET, "--sim")
    assert_valid(out)
    c = container(objects(out)["Deployment", "llama-a"])
    assert "resources" not in c and c["image"] == "registry.example/kvrouter:1.0"
    assert c["command"][:3] == ["python", "-m", "router.sim"]


def test_router_replicas_get_a_role_for_leases_and_their_pod_identity(tmp_path: Path) -> None:
    out = render_k8s(tmp_path, FLEET)  # router.replicas: 3 turns leader election on
    assert_valid(out)
    objs = objects(out)
    role = objs["Role", "router-leader-election"]
    assert role["metadata"]["namespace"] == "llm"
    assert role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                              "verbs": ["get", "create", "update"]}]
    binding = objs["RoleBinding", "router-leader-election"]
    assert binding["roleRef"]["name"] == "router-leader-election"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "router", "namespace": "llm"}]
    assert objs["ServiceAccount", "router"]["metadata"]["namespace"] == "llm"
    pod = objs["Deployment", "router"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "router"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container(objs["Deployment", "router"])["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_IP"] == "status.podIP"
    # The router in the cluster reads the same election settings.
    cfg = parse_config(objs["ConfigMap", "router-config"]["data"]["config.yaml"], "/etc/kvrouter/config.yaml")
    assert cfg.kubernetes.leader_election and cfg.kubernetes.lease_ns == "llm"

    # One replica: no election, no rights beyond the default; another Lease namespace gets the Role.
    one = objects(render_k8s(tmp_path / "one", {**FLEET, "router": {**FLEET["router"], "replicas": 1}}))
    assert not {k for k in one if k[0] in ("Role", "RoleBinding", "ServiceAccount")}
    assert "serviceAccountName" not in one["Deployment", "router"]["spec"]["template"]["spec"]
    elsewhere = render_k8s(tmp_path / "ns", {**FLEET, "kubernetes": {
        **FLEET["kubernetes"], "lease_namespace": "locks", "lease_name": "llm-router", "lease_seconds": 6}})
    assert_valid(elsewhere)
    objs = objects(elsewhere)
    assert objs["Role", "router-leader-election"]["metadata"]["namespace"] == "locks"
    assert objs["RoleBinding", "router-leader-election"]["subjects"][0]["namespace"] == "llm"


def test_a_dns_named_instance_is_external(tmp_path: Path) -> None:
    fleet = {**FLEET, "instances": [*FLEET["instances"], {
        "name": "pool", "model": "pooled", "engine": "vllm", "dns_name": "pool.llm.svc.cluster.local", "port": 8000}]}
    out = render_k8s(tmp_path, fleet)
    assert_valid(out)
    objs = objects(out)
    assert ("Deployment", "pool") not in objs and ("Service", "pool") not in objs
    cfg = parse_config(objs["ConfigMap", "router-config"]["data"]["config.yaml"], "/etc/kvrouter/config.yaml")
    pool = next(i for i in cfg.instances if i.name == "pool")
    assert (pool.dns_name, pool.port, pool.launch) == ("pool.llm.svc.cluster.local", 8000, False)


@pytest.mark.parametrize("change, fix", [
    ({"kubernetes": {"namespace": "Not_OK"}}, "kubernetes.namespace"),
    ({"kubernetes": {}}, "kubernetes.images.openai"),
    ({"router": {"api_keys": {"file": "keys.txt"}}}, "{env: VAR}"),
    ({"router": {"api_keys": ["k0", {"file": "keys.txt"}]}}, "router.api_keys[1]: {file: keys.txt}"),
    ({"router": {"api_keys": [{"name": "a", "key": {"file": "keys.txt"}}]}}, "router.api_keys[0].key: {file: keys.txt}"),
])
def test_unrenderable_configs_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             change: dict[str, Any], fix: str) -> None:
    (tmp_path / "keys.txt").write_text("k1\n")
    (tmp_path / "keys.txt").chmod(0o600)
    path = write_config(tmp_path, {**FLEET, **change})
    assert main(["--config", str(path), "--target", "kubernetes", "--out", str(tmp_path / "k8s")]) == 2
    err = capsys.readouterr().err
    assert fix in err and str(path) in err and "Nothing was written." in err
    assert not (tmp_path / "k8s").exists()


def test_names_that_meet_in_kubernetes_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, {"instances": [vllm("Llama_A", 8001), vllm("llama-a", 8002)]})
    assert main(["--config", str(path), "--target", "kubernetes", "--out", str(tmp_path / "k8s")]) == 2
    err = capsys.readouterr().err
    assert "'llama-a' and \"instance 'Llama_A'\" both become the Kubernetes name 'llama-a'" in err


# -- render --node -------------------------------------------------------------

NODES = {
    "router": {"node": "head"},
    "instances": [vllm("a1", 8001, node="head"), vllm("b1", 8002, node="worker"), vllm("b2", 8003, node="worker")],
}


@pytest.mark.parametrize("node, programs", [
    ("head", {"a1", "router", "logs"}),
    ("worker", {"b1", "b2", "logs"}),
])
def test_node_renders_its_own_engines(short_tmp: str, node: str, programs: set[str]) -> None:
    tmp = Path(short_tmp)
    path = write_config(tmp, NODES)
    assert main(["--config", str(path), "--out", str(tmp / node), "--node", node, "--sim"]) == 0
    rendered = supervisor_programs(tmp / node / "supervisord.conf")
    assert set(rendered) == programs
    if "router" in rendered:  # it reads the whole YAML, so it routes to every node's engines
        assert str(path.resolve()) in rendered["router"].command
    assert sorted(p.name for p in (tmp / node / "engines").iterdir()) == sorted(f"{p}.sh" for p in programs
                                                                               if p not in ("router", "logs"))


def test_every_node_renders_the_router_unless_one_is_named(short_tmp: str, capsys: pytest.CaptureFixture[str]) -> None:
    tmp = Path(short_tmp)
    path = write_config(tmp, {**NODES, "router": {}, "instances": [*NODES["instances"], vllm("c", 8004)]})
    assert main(["--config", str(path), "--out", str(tmp / "w"), "--node", "worker", "--sim"]) == 0
    assert set(supervisor_programs(tmp / "w" / "supervisord.conf")) == {"b1", "b2", "router", "logs"}
    assert "instances c have no 'node:'" in capsys.readouterr().err


def test_node_is_for_supervisord_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, NODES)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path), "--target", "kubernetes", "--node", "head"])
    assert exit_.value.code == 2 and "'node:' pins their pods there" in capsys.readouterr().err


def test_instances_sharing_a_gpu_are_one_pod_with_one_gpu_request(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The premise on Kubernetes: two engines sharing GPU 0 of one node need one GPU, not two."""
    gpu = lambda devices: {"engine_env": ["VLLM_SERVER_DEV_MODE=1", f"CUDA_VISIBLE_DEVICES={devices}"]}  # noqa: E731
    out = render_k8s(tmp_path, {"kubernetes": {"namespace": "llm"}, "instances": [
        vllm("a", 8001, node="gpu-1", **gpu("0")),
        vllm("b", 8002, node="gpu-1", **gpu("0")),
        vllm("c", 8003, node="gpu-1", **gpu("1")),  # its own GPU: its own pod
        vllm("d", 8004, node="gpu-2", **gpu("0")),  # GPU 0 of another node: its own pod
    ]})
    assert_valid(out)
    assert "instances a, b share GPU 0, so they run in one Pod (engine-a-b.yaml)" in capsys.readouterr().err
    objs = objects(out)
    assert {name for kind, name in objs if kind == "Deployment"} == {"a-b", "c", "d", "router"}
    shared = objs["Deployment", "a-b"]
    assert gpu_requests(shared) == ["1"]
    pod = shared["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "gpu-1"}
    a, b = containers(shared)["a"], containers(shared)["b"]
    assert [p["containerPort"] for p in (*a["ports"], *b["ports"])] == [8001, 8002]
    assert a["readinessProbe"]["httpGet"]["port"] == a["ports"][0]["name"] != b["ports"][0]["name"]
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in (*a["env"], *b["env"])}
    # Each engine keeps its own Service, which reaches its own container in the shared pod.
    labels = shared["spec"]["template"]["metadata"]["labels"]
    for name, c in (("a", a), ("b", b)):
        spec = objs["Service", name]["spec"]
        assert all(labels[k] == v for k, v in spec["selector"].items())
        assert spec["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert gpu_requests(objs["Deployment", "c"]) == gpu_requests(objs["Deployment", "d"]) == ["1"]
    # The router reaches each engine at its own Service, as before.
    cfg = parse_config(objs["ConfigMap", "router-config"]["data"]["config.yaml"], "/etc/kvrouter/config.yaml")
    assert {i.name: i.url for i in cfg.instances}["b"] == "http://b.llm.svc.cluster.local:8002"


def test_a_pod_spanning_gpus_tells_each_engine_its_own(tmp_path: Path) -> None:
    """a on GPU 0 and b on GPUs 0,1 share GPU 0: one pod of two GPUs, in which a sees the first only."""
    out = render_k8s(tmp_path, {"router": {"enable_router": False}, "instances": [
        vllm("a", 8001, engine_env=["CUDA_VISIBLE_DEVICES=0"]), vllm("b", 8002, engine_env=["CUDA_VISIBLE_DEVICES=1,0"])]})
    assert_valid(out)
    shared = objects(out)["Deployment", "a-b"]
    assert gpu_requests(shared) == ["2"]
    env = {name: {e["name"]: e["value"] for e in c["env"]} for name, c in containers(shared).items()}
    assert env["a"]["CUDA_VISIBLE_DEVICES"] == "0" and "CUDA_VISIBLE_DEVICES" not in env["b"]


def test_engines_sharing_a_pod_need_their_own_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, {"instances": [vllm("a", 8001), {**vllm("b", 8001), "engine_args": [
        "--host 10.0.0.6", "--port=8001"]}]})
    assert main(["--config", str(path), "--target", "kubernetes", "--out", str(tmp_path / "k8s")]) == 2
    assert "'a' and 'b' share a GPU, so they run in one Pod, and both listen on port 8001" in capsys.readouterr().err
