"""``render --target kubernetes``: one YAML -> Kubernetes manifests (nothing is written here).

The output folder holds, for ``kubectl apply -k DIR``:

- ``namespace.yaml``: the namespace (``kubernetes.namespace``, default ``kvrouter``);
- ``engine-<name>.yaml`` per Pod of engines: a Deployment (one pod, one
  container per engine with its launch command, environment and probes on its
  health path, ``nvidia.com/gpu`` for the GPUs of their
  ``CUDA_VISIBLE_DEVICES``) and a headless Service ``<name>`` per engine on
  its port. Engines that share a GPU of one node share the Pod and its one
  GPU request (see pods.py; the Pod is named after its engines, ``a-b``), so
  several models still fit one GPU; an engine alone on its GPUs is its own Pod;
- ``router.yaml``: the router's ConfigMap (the YAML with each launched
  instance at its Service, ``launch: false``), Deployment
  (``router.replicas``) and Service; with leader election (on by default
  when ``router.replicas`` > 1) also the router's ServiceAccount and a Role
  and RoleBinding that let it get, create and update Leases in the Lease's
  namespace (nothing else); its pods learn their name, IP and namespace
  from the downward API (POD_NAME, POD_IP, POD_NAMESPACE);
- ``kustomization.yaml`` listing them.

Engine Services are headless and publish pods that are not ready: the router
judges engine health itself, as on one node, and a sleeping or starting
engine must stay reachable by name for the router to wake it or wait for it.
``on_demand`` instances run from the start (one replica): starting an engine
on demand is supervisord's job, and the router has no rights to scale
Deployments. ``launch: false`` instances stay where the YAML says. Rendering
is a pure function of the config: the same YAML gives the same bytes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from router.config import Config, Instance, connect_host, loopback_ip
from router.engines import sim_argv
from router.render.files import ENGINE_STOPWAITSECS, FILE_MODE, ROUTER_STOP_MARGIN_SECONDS, Files, RenderError
from router.render.kubernetes.names import SECRET_NAME, k8s_name, rebind
from router.render.kubernetes.pods import GpuPod, gpu_pods
from router.render.kubernetes.router_config import cluster_config_yaml
from router.render.kubernetes.write import KUSTOMIZATION
from router.render.kubernetes.yaml import dump

#: An image with this package installed (``pip install kvrouter``); also the simulated engines' under --sim.
DEFAULT_ROUTER_IMAGE = "kvrouter:latest"
#: The engine images' Python (vLLM's image runs `vllm serve` by default; we give the module as on one node).
CONTAINER_PYTHON = "python3"
ROUTER_NAME = "router"
CONFIG_MOUNT = "/etc/kvrouter"
CONFIG_KEY = "config.yaml"
PART_OF = "kvrouter"
MANAGED_BY = "kvrouter-render"
GPU_RESOURCE = "nvidia.com/gpu"
#: Startup probes poll this often; their failure threshold covers the instance's start timeout.
STARTUP_PERIOD_SECONDS = 10
PROBE_TIMEOUT_SECONDS = 5
HEADER = "# Rendered by `python -m router.render --target kubernetes` from {config}: edit the YAML and render again.\n"


@dataclass(frozen=True)
class Rendering:
    files: Files
    warnings: tuple[str, ...]


def render_kubernetes(cfg: Config, text: Optional[str] = None, sim: bool = False) -> Rendering:
    """Every manifest's text for `cfg`; `text` is the YAML it was loaded from (default: read `cfg.path`).

    Under `sim` every engine is the simulated one, run from the router's
    image without GPUs: the whole stack on any cluster (kind, minikube).
    """
    settings = cfg.kubernetes
    _names(cfg)
    pods = gpu_pods(cfg)
    _pod_names(cfg, pods)
    source = Path(cfg.path).name
    docs: dict[str, list[dict[str, Any]]] = {"namespace.yaml": [_namespace(settings.namespace)]}
    for pod in pods:
        ports = _port_names(cfg, pod)
        docs[f"engine-{pod.name}.yaml"] = [_engine_deployment(cfg, pod, ports, sim),
                                           *(_engine_service(cfg, inst, pod, ports[inst.name]) for inst in pod.members)]
    if cfg.router.enable_router:
        if text is None:
            text = Path(cfg.path).read_text(encoding="utf-8")
        config = cluster_config_yaml(cfg, text, settings.namespace)
        docs["router.yaml"] = [_router_configmap(cfg, config), *_router_rbac(cfg), _router_deployment(cfg, config),
                               _router_service(cfg)]
    docs[KUSTOMIZATION] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                            "resources": list(docs)}]
    files = {name: (HEADER.format(config=source) + dump(d), FILE_MODE) for name, d in docs.items()}
    return Rendering(files, tuple(_warnings(cfg, pods, sim)))


def _names(cfg: Config) -> dict[str, str]:
    """Instance name -> Kubernetes name, or RenderError when two would meet."""
    taken = {ROUTER_NAME: "the router"} if cfg.router.enable_router else {}
    out = {}
    for inst in cfg.launched:
        name = k8s_name(inst)
        if name in taken:
            raise RenderError(f"{cfg.path}: instances: {inst.name!r} and {taken[name]!r} both become the Kubernetes "
                              f"name {name!r} (lower case, '-' for '_'); rename one of them")
        taken[name], out[inst.name] = f"instance {inst.name!r}", name
    return out


def _pod_names(cfg: Config, pods: list[GpuPod]) -> None:
    """RenderError when a shared Pod's name is another engine's own Deployment."""
    seen: dict[str, GpuPod] = {}
    for pod in pods:
        other = seen.setdefault(pod.name, pod)
        if other is not pod:
            raise RenderError(f"{cfg.path}: instances: the Pod of {', '.join(i.name for i in pod.members)} and that of "
                              f"{', '.join(i.name for i in other.members)} are both named {pod.name!r}; rename one")


def _port_names(cfg: Config, pod: GpuPod) -> dict[str, str]:
    """Instance name -> its container's port name: ``http`` alone, ``http-<i>`` in a shared Pod, whose
    containers share one network (so their ports must differ, which is checked here)."""
    if not pod.shared:
        return {pod.members[0].name: "http"}
    owners: dict[int, str] = {}
    for inst in pod.members:
        other = owners.setdefault(inst.port, inst.name)
        if other != inst.name:
            raise RenderError(f"{cfg.path}: instances: {other!r} and {inst.name!r} share a GPU, so they run in one Pod, "
                              f"and both listen on port {inst.port}; give one another port")
    return {inst.name: f"http-{n}" for n, inst in enumerate(pod.members)}


def _warnings(cfg: Config, pods: list[GpuPod], sim: bool) -> list[str]:
    """Instances started elsewhere that a router pod cannot reach where the YAML says; and what a
    shared Pod relies on of the node."""
    out = []
    local = [i.name for i in cfg.instances if not i.launch and loopback_ip(connect_host(i.host))]
    if local and cfg.router.enable_router:
        out.append(f"{cfg.path}: instances {', '.join(local)} have launch: false at a loopback address, which in the "
                   "router's pod is the pod itself; give them an address the cluster can reach")
    for pod in pods:
        if pod.shared and not sim:
            out.append(f"{cfg.path}: instances {', '.join(i.name for i in pod.members)} share GPU "
                       f"{','.join(pod.gpus)}, so they run in one Pod (engine-{pod.name}.yaml) whose first container "
                       "requests it: Kubernetes gives devices to containers, and the others reach it where the node's "
                       "NVIDIA runtime shows its GPUs to every container (the CUDA images' NVIDIA_VISIBLE_DEVICES=all), "
                       "which is that GPU on a node with one (see \"More than one node and Kubernetes\" in the docs)")
    return out


def labels(name: str, instance: str, component: str) -> dict[str, str]:
    """Kubernetes' recommended labels (app.kubernetes.io/*)."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def _selector(instance: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": instance, "app.kubernetes.io/part-of": PART_OF}


def _metadata(cfg: Config, name: str, lab: dict[str, str], **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": cfg.kubernetes.namespace, "labels": lab}
    if annotations:
        meta["annotations"] = {f"kvrouter/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return meta


def _namespace(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
        "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/managed-by": MANAGED_BY}}}


def _http_probe(path: str, period: int, failures: int, port: str = "http") -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": PROBE_TIMEOUT_SECONDS, "failureThreshold": failures}


def _env(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """One entry per name, the last value winning as in the launch script's exports."""
    return [{"name": k, "value": v} for k, v in dict(pairs).items()]


def _deployment(meta: dict[str, Any], replicas: int, pod: dict[str, Any], recreate: bool,
                pod_annotations: Optional[dict[str, str]] = None) -> dict[str, Any]:
    template: dict[str, Any] = {"metadata": {"labels": meta["labels"]}, "spec": pod}
    if pod_annotations:
        template["metadata"]["annotations"] = pod_annotations
    spec: dict[str, Any] = {"replicas": replicas,
                            "selector": {"matchLabels": _selector(meta["labels"]["app.kubernetes.io/instance"])}}
    if recreate:
        spec["strategy"] = {"type": "Recreate"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {**spec, "template": template}}


def _pod(containers: list[dict[str, Any]], grace: int, node: Optional[str], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    secrets = {"envFrom": [{"secretRef": {"name": SECRET_NAME, "optional": True}}]}
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": grace, "containers": [{**c, **secrets} for c in containers],
                           "volumes": volumes}
    if node is not None:
        pod["nodeSelector"] = {"kubernetes.io/hostname": node}
    return pod


def engine_command(inst: Instance, sim: bool) -> list[str]:
    """The launch script's command, bound to every address of the pod so its Service reaches it."""
    spec = inst.spec
    args, _ = rebind(inst.engine_args, spec.host_flag, "0.0.0.0", add=spec.launcher is not None)
    bound = replace(inst, engine_args=tuple(args), host="0.0.0.0", venv_path=None)
    if sim:
        return sim_argv("python", bound)
    argv = spec.launch_argv(bound)
    return [CONTAINER_PYTHON, *argv[1:]] if spec.launcher is not None else argv


def engine_image(cfg: Config, inst: Instance, sim: bool) -> str:
    if sim:
        return cfg.kubernetes.router_image or DEFAULT_ROUTER_IMAGE
    # The YAML's kubernetes.images, else the engine's standard image (an `openai` engine has none).
    image = dict(cfg.kubernetes.images).get(inst.engine) or inst.spec.image
    if image is None:
        raise RenderError(f"{cfg.path}: instance {inst.name!r}: engine '{inst.engine}' runs its own command, so its "
                          f"image is yours to name: set kubernetes.images.{inst.engine} (e.g. an image with that program)")
    return image


def _engine_container(cfg: Config, inst: Instance, pod: GpuPod, port: str, sim: bool) -> dict[str, Any]:
    timeout = inst.start_timeout_seconds or cfg.residency.start_timeout_seconds
    # The device plugin hands the pod its GPUs as devices 0..n-1; the node's numbering means nothing there,
    # and in a Pod of several GPUs each engine is told which of them are its own.
    env = [("PYTHONUNBUFFERED", "1"), *inst.lora_env, *((k, v) for k, v in inst.env if k != "CUDA_VISIBLE_DEVICES")]
    if set(inst.gpus) != set(pod.gpus) and not sim:
        env.append(("CUDA_VISIBLE_DEVICES", pod.devices(inst)))
    return {
        "name": k8s_name(inst) if pod.shared else "engine",
        "image": engine_image(cfg, inst, sim),
        "command": engine_command(inst, sim),
        "env": _env(env),
        "ports": [{"name": port, "containerPort": inst.port}],
        # Loading weights takes minutes: the other probes wait until this one passes.
        "startupProbe": _http_probe(inst.health_path, STARTUP_PERIOD_SECONDS,
                                    max(1, math.ceil(timeout / STARTUP_PERIOD_SECONDS)), port),
        "readinessProbe": _http_probe(inst.health_path, 5, 3, port),
        "livenessProbe": _http_probe(inst.health_path, 10, 6, port),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _engine_deployment(cfg: Config, pod: GpuPod, ports: dict[str, str], sim: bool) -> dict[str, Any]:
    first = pod.members[0]
    if pod.shared:
        meta = _metadata(cfg, pod.name, labels("engines", pod.name, "engine"),
                         instances=",".join(i.name for i in pod.members), gpus=",".join(pod.gpus))
    else:
        meta = _metadata(cfg, pod.name, labels(first.engine, pod.name, "engine"), instance=first.name, model=first.model)
    containers = [_engine_container(cfg, inst, pod, ports[inst.name], sim) for inst in pod.members]
    if not sim:
        # One request for the Pod's GPUs, on its first container (resources are per container).
        gpus = str(len(pod.gpus))
        containers[0]["resources"] = {"requests": {GPU_RESOURCE: gpus}, "limits": {GPU_RESOURCE: gpus}}
    # Engines share tensors between their processes through /dev/shm, which is 64 MB in a pod by default.
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    # Recreate: a second pod of one engine would wait for the GPU the first still holds.
    return _deployment(meta, 1, _pod(containers, ENGINE_STOPWAITSECS, first.node, volumes), recreate=True)


def _engine_service(cfg: Config, inst: Instance, pod: GpuPod, port: str) -> dict[str, Any]:
    name = k8s_name(inst)
    meta = _metadata(cfg, name, labels(inst.engine, name, "engine"), instance=inst.name, model=inst.model)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
        "clusterIP": "None", "publishNotReadyAddresses": True, "selector": _selector(pod.name),
        "ports": [{"name": "http", "port": inst.port, "targetPort": port}]}}


def _router_meta(cfg: Config, name: str = ROUTER_NAME) -> dict[str, Any]:
    return _metadata(cfg, name, labels(PART_OF, ROUTER_NAME, "router"))


def _router_configmap(cfg: Config, config: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _router_meta(cfg, f"{ROUTER_NAME}-config"),
            "data": {CONFIG_KEY: config}}


def _router_deployment(cfg: Config, config: str) -> dict[str, Any]:
    router = cfg.router
    container = {
        "name": ROUTER_NAME,
        "image": cfg.kubernetes.router_image or DEFAULT_ROUTER_IMAGE,
        "command": ["python", "-m", "router.serve", "--config", f"{CONFIG_MOUNT}/{CONFIG_KEY}", "--host", "0.0.0.0"],
        "env": _env([("PYTHONUNBUFFERED", "1")]) + _downward_env(),
        "ports": [{"name": "http", "containerPort": router.port}],
        "readinessProbe": _http_probe("/health", 5, 3),
        "livenessProbe": _http_probe("/health", 10, 6),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
    }
    volumes = [{"name": "config", "configMap": {"name": f"{ROUTER_NAME}-config"}}]
    grace = math.ceil(router.shutdown_grace_seconds) + ROUTER_STOP_MARGIN_SECONDS
    # A changed config changes the pod template, so `kubectl apply` rolls the router pods.
    digest = {"kvrouter/config-sha256": hashlib.sha256(config.encode()).hexdigest()}
    pod = _pod([container], grace, router.node, volumes)
    if cfg.kubernetes.leader_election:
        pod = {"serviceAccountName": ROUTER_NAME, **pod}
    return _deployment(_router_meta(cfg), router.replicas, pod, recreate=False, pod_annotations=digest)


def _downward_env() -> list[dict[str, Any]]:
    """Who and where the pod is, for its leader election: the holder it writes into the Lease is
    POD_NAME@POD_IP:port, which is how the other router replicas reach the leader."""
    return [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
            for name, path in (("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP"),
                               ("POD_NAMESPACE", "metadata.namespace"))]


def _router_rbac(cfg: Config) -> list[dict[str, Any]]:
    """With leader election: the router's ServiceAccount, and the Role and RoleBinding that let it
    read, create and renew Leases in the Lease's namespace (all a Lease lock needs)."""
    k8s = cfg.kubernetes
    if not k8s.leader_election:
        return []
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _router_meta(cfg)}
    meta = {**_router_meta(cfg, f"{ROUTER_NAME}-leader-election"), "namespace": k8s.lease_ns}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                       "verbs": ["get", "create", "update"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
               "subjects": [{"kind": "ServiceAccount", "name": ROUTER_NAME, "namespace": k8s.namespace}]}
    return [account, role, binding]


def _router_service(cfg: Config) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _router_meta(cfg), "spec": {
        "selector": _selector(ROUTER_NAME),
        "ports": [{"name": "http", "port": cfg.router.port, "targetPort": "http"}]}}
