"""``render --node NAME``: the part of one YAML that one machine's supervisord runs.

Each node renders its own supervisord folder from the same YAML: the engines
whose ``node:`` is NAME, and the router unless ``router.node`` names another
node. The router still reads the whole YAML (it is rendered with the file's
own path), so it routes to every instance by its host and port, wherever it
runs; only the engines of its own node are under its supervisord.
"""
from __future__ import annotations

from dataclasses import replace

from router.config import Config, connect_host, loopback_ip


def for_node(cfg: Config, node: str) -> tuple[Config, list[str]]:
    """`cfg` cut down to what `node` runs, and warnings about instances no node or no router can reach.

    The other instances are dropped rather than marked ``launch: false``: the
    renderer only looks at launched ones, and the router never sees this copy.
    """
    mine = tuple(i for i in cfg.instances if i.launch and i.node == node)
    router_here = cfg.router.enable_router and cfg.router.node in (None, node)
    warnings = []
    unplaced = [i.name for i in cfg.launched if i.node is None]
    if unplaced:
        warnings.append(f"{cfg.path}: instances {', '.join(unplaced)} have no 'node:', so no --node rendering runs "
                        "them; give each launched instance 'node: <machine>'")
    if cfg.router.enable_router:
        far = [i.name for i in cfg.launched if i.node not in (None, cfg.router.node or node)
               and loopback_ip(connect_host(i.host))]
        if far:
            warnings.append(f"{cfg.path}: instances {', '.join(far)} run on another node than the router but are "
                            "reached at a loopback address; give each '--host <its machine's address>' (or 'host:')")
    if not mine and not router_here:
        warnings.append(f"{cfg.path}: nothing runs on node {node!r}: no launched instance has 'node: {node}' and "
                        f"router.node is {cfg.router.node!r}")
    return replace(cfg, instances=mine, router=replace(cfg.router, enable_router=router_here)), warnings
