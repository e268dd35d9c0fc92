"""Names and flags as Kubernetes needs them, shared by the manifests and the router's in-cluster YAML."""
from __future__ import annotations

import re
from typing import Sequence

from router.config import Instance

#: A Service or Deployment name: an RFC 1035 label (lower case, starts with a letter, at most 63).
K8S_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def k8s_name(inst: Instance) -> str:
    """The instance's name as a Service name: instance names may hold '_' and capitals and start
    with a digit, which DNS labels may not; callers check that two names do not meet."""
    name = re.sub(r"[^a-z0-9-]", "-", inst.name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"e-{name}"
    return name[:63].rstrip("-")


def service_host(inst: Instance, namespace: str) -> str:
    """The DNS name the router dials for `inst` inside the cluster."""
    return f"{k8s_name(inst)}.{namespace}.svc.cluster.local"


def rebind(args: Sequence[str], flag: str, value: str, add: bool) -> tuple[list[str], bool]:
    """`args` with every value of `flag` (``--flag v`` or ``--flag=v``) set to `value`, and whether
    one was there; when none was and `add`, the flag is appended (the engines' parsers take the last)."""
    out, found, i = list(args), False, 0
    while i < len(out):
        if out[i] == flag and i + 1 < len(out):
            out[i + 1], found = value, True
            i += 1
        elif out[i].startswith(flag + "="):
            out[i], found = f"{flag}={value}", True
        i += 1
    if not found and add:
        out += [flag, value]
    return out, found

#: The optional Secret every pod takes its environment from (HF_TOKEN, keys named by {env: VAR}).
SECRET_NAME = "kvrouter-secrets"
