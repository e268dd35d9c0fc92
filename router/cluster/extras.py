"""The optional packages of the cluster features, installed as the extra ``kvrouter[kubernetes]``.

A single GPU node needs neither: the Kubernetes client (leader election by a
Lease, `lease`) and dnspython (engine replicas found by DNS, `dns`) come only
with ``pip install 'kvrouter[kubernetes]'``. Rendering Kubernetes manifests
needs neither either. The cluster modules import them only when a feature
runs, through `require`, so a missing one is an error naming the extra, and
`missing_extras` lets the router refuse at its start a config that asks for a
feature whose package is not there.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from router.config import Config

#: What to install for the cluster features.
EXTRA = "kvrouter[kubernetes]"
#: Importable name -> the distribution pip installs.
DISTRIBUTIONS = {"kubernetes": "kubernetes", "dns": "dnspython"}


class MissingExtra(ImportError):
    """A feature's package is not installed; the message says which extra installs it."""


def explain(package: str, feature: str) -> str:
    return (f"{feature} needs the Python package {DISTRIBUTIONS.get(package, package)}, which is not installed; "
            f"install it with: pip install '{EXTRA}'")


def require(package: str, feature: str) -> ModuleType:
    """Import `package` (e.g. ``dns.asyncresolver``) for `feature`, or MissingExtra naming the extra."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingExtra(explain(package.split(".", 1)[0], feature)) from None


def installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def missing_extras(config: Config) -> list[str]:
    """One problem (field: why, what to install) per feature `config` uses whose package is missing."""
    problems = []
    if config.kubernetes.leader_election and not installed("kubernetes"):
        problems.append("kubernetes.leader_election: " + explain("kubernetes", "leader election by a Kubernetes Lease"))
    names = [i.name for i in config.instances if i.dns_name]
    if names and not installed("dns"):
        problems.append(f"instances {', '.join(names)}: dns_name: " + explain("dns", "engine replicas found by DNS"))
    return problems
