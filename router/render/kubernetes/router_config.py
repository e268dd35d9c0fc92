"""The YAML the router reads inside the cluster: the user's YAML with every launched instance made
``launch: false`` at its Service's DNS name.

The router in a pod launches nothing (the engines are Deployments), so each
engine it reaches is "started elsewhere"; everything else in the file (router
settings, sleep, residency, aliases, limits, keys) is kept as written, so the
router behaves as it does on one node. Comments are not kept: the ConfigMap
holds a rendering, and the YAML file stays the source.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from router.config import Config, Instance
from router.render.files import RenderError
from router.render.kubernetes.names import SECRET_NAME, rebind, service_host
from router.render.kubernetes.yaml import dump

#: Keys that only mean something to the supervisord that launches an engine.
LAUNCH_ONLY_KEYS = ("on_demand", "idle_stop_seconds", "using_venv", "venv_path")


def cluster_config_yaml(cfg: Config, text: str, namespace: str) -> str:
    """`text` (the YAML `cfg` was loaded from) as the router pod's config."""
    raw = yaml.safe_load(text)
    entries = raw.get("instances") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or len(entries) != len(cfg.instances):
        raise RenderError(f"{cfg.path}: the file changed while it was rendered; render again")
    _refuse_key_files(cfg, raw.get("router") or {})
    for inst, entry in zip(cfg.instances, entries):
        if inst.launch:
            _as_external(inst, entry, service_host(inst, namespace))
    head = (f"# The router's config in the cluster, rendered by `python -m router.render --target kubernetes` "
            f"from {Path(cfg.path).name}:\n# launched instances are reached at their Services. Edit the YAML "
            "file and render again rather than this.\n")
    return head + dump([raw])


def _as_external(inst: Instance, entry: dict[str, Any], host: str) -> None:
    """Make `entry` an instance started elsewhere, reached at `host` on its own port."""
    spec = inst.spec
    args, found = rebind(inst.engine_args, spec.host_flag, host, add=spec.launcher is not None)
    words = args if spec.launcher is not None else [inst.program or "", *args]
    # Each item is split like a shell would when loaded, so each word is quoted to stay one word.
    entry[spec.args_key] = [shlex.quote(w) for w in words]
    if spec.launcher is None and (not found or "host" in entry):
        entry["host"] = host
    entry["launch"] = False
    for key in LAUNCH_ONLY_KEYS:
        entry.pop(key, None)


def _key_values(router: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every place a key may be given, with its field: the two settings, each item of the list,
    and each record's `key` (router/config/keys.py)."""
    found: list[tuple[str, Any]] = [("router.admin_api_key", router.get("admin_api_key")),
                                    ("router.api_keys", router.get("api_keys"))]
    items = router.get("api_keys")
    for i, item in enumerate(items if isinstance(items, list) else []):
        found.append((f"router.api_keys[{i}]", item))
        if isinstance(item, dict):
            found.append((f"router.api_keys[{i}].key", item.get("key")))
    return found


def _refuse_key_files(cfg: Config, router: dict[str, Any]) -> None:
    """Keys read from a file on this machine would not be found in the router's pod."""
    for where, value in _key_values(router):
        if isinstance(value, dict) and "file" in value:
            raise RenderError(f"{cfg.path}: {where}: {{file: {value['file']}}} is a file on this machine, which "
                              "the router's pod does not have; use {env: VAR} and put VAR in the Secret "
                              f"'{SECRET_NAME}' (kubectl create secret generic {SECRET_NAME} -n NAMESPACE "
                              "--from-literal=VAR=...), which every pod reads when it exists")
