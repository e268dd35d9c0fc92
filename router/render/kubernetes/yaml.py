"""YAML as the manifests are written: plain (no anchors), text blocks kept readable, stable bytes."""
from __future__ import annotations

from typing import Any, Iterable

import yaml


class _Dumper(yaml.SafeDumper):
    """Never writes an anchor for a value used twice (labels): a manifest is read by people too."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    """Several lines (the router's config in its ConfigMap) as a literal block, when YAML allows one."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(docs: Iterable[Any]) -> str:
    """`docs` as one YAML stream, keys in the order they were built."""
    return yaml.dump_all(list(docs), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=120)
