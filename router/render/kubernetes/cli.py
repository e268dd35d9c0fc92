"""``render --target kubernetes``: render the manifests, write them, say what to run next."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from router.config import Config
from router.render.files import RenderError
from router.render.kubernetes.manifests import render_kubernetes
from router.render.kubernetes.write import write_manifests


def render_to_kubernetes(cfg: Config, out: Path, sim: bool) -> int:
    """The CLI's exit status: 0 written, 1 the folder cannot be written, 2 the config cannot be rendered."""
    try:
        rendering = render_kubernetes(cfg, sim=sim)
    except (RenderError, OSError) as e:
        print(f"error: {e}\nNothing was written.", file=sys.stderr)
        return 2
    for w in rendering.warnings:
        print(f"warning: {w}", file=sys.stderr)
    try:
        gone = write_manifests(out, rendering.files)
    except OSError as e:
        print(f"error: cannot write {out}: {e}\nThe previous manifests are unchanged.", file=sys.stderr)
        return 1
    ns = cfg.kubernetes.namespace
    print("\n".join([
        f"Rendered {len(cfg.launched)} engine Deployment(s){' and the router' if cfg.router.enable_router else ''} "
        f"into {out} (namespace {ns})" + (f"; removed {', '.join(gone)}" if gone else ""),
        "",
        "Apply them:",
        f"  kubectl apply -k {shlex.quote(str(out))}",
        f"  kubectl -n {ns} get pods -l app.kubernetes.io/part-of=kvrouter",
        *([f"  kubectl -n {ns} port-forward svc/router {cfg.router.port}"] if cfg.router.enable_router else []),
    ]))
    return 0
