"""YAML -> `Config`: the one parser of the project's configuration file.

The renderer, the router and the benchmark all read the YAML through
`load_config`, so they can never disagree about what it says. The format is
the kvcached controller's (``kvcached``, ``router``, ``sleep_manager``,
``instances``) plus a few keys of our own; every key is declared once, in the
module of its block, and documented in docs/reference/configuration.md.
Validation collects every problem before failing, and each message names the
file and the field path (``instances[1].engine_args``) with a fix.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import yaml

from router.config.checks import check
from router.config.gpu_memory import settle_gpu_memory
from router.config.kubernetes import KubernetesSettings, settle_lease
from router.config.problems import ConfigError, Reading
from router.config.residency import ResidencySettings
from router.config.router import RouterSettings
from router.config.schema import keys_of, read_keys
from router.config.top import Config


def load_config(path: str | os.PathLike[str], sim: bool = False) -> Config:
    """Read and validate the YAML at `path`.

    `sim` relaxes checks that only matter on a real GPU host (a missing venv
    is then a warning, since the simulated engine does not use it).
    Raises ConfigError listing every problem.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot read the config file: {e.strerror or e}"]) from None
    return parse_config(text, path, sim=sim)


#: Text PyYAML quotes from the file (an alias or anchor name), but not token names like '<scalar>'.
YAML_QUOTED = re.compile(r"'(?!<)[^']{2,}'")


def yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint with its line and column, but none of the file's text that
    PyYAML quotes with it (the line's snippet, a name): that text may be an API key."""
    if not isinstance(e, yaml.MarkedYAMLError):  # a bad byte or character: its code and position only
        return " ".join(str(e).split())
    parts = []
    for text, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)):
        if text:
            text = YAML_QUOTED.sub("'...'", text)
            parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark else text)
    return "; ".join(parts) or "cannot be parsed"


def parse_config(text: str | bytes, path: str = "<config>", sim: bool = False) -> Config:
    """Validate YAML `text` as if read from `path` (relative paths resolve beside it)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, [f"not valid YAML: {yaml_problem(e)}"]) from None
    except (ValueError, TypeError, RecursionError) as e:  # odd scalars, deep nesting
        raise ConfigError(path, [f"not valid YAML: {e}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the file must be a YAML mapping with an 'instances:' list"])
    reading = Reading(Path(path).resolve().parent if not path.startswith("<") else Path.cwd(), sim)
    values = read_keys(keys_of(Config), raw, "", reading)
    router = values.get("router")
    replicas = router.replicas if isinstance(router, RouterSettings) else 1
    kubernetes = values.get("kubernetes")
    values["kubernetes"] = settle_lease(kubernetes if isinstance(kubernetes, KubernetesSettings) else KubernetesSettings(),
                                        raw.get("kubernetes"), replicas, reading)
    instances = values.get("instances")
    env = values.get("kvcached_env", ())
    assert isinstance(env, tuple)
    merged = tuple(replace(i, env=(*env, *i.env)) for i in instances) if isinstance(instances, tuple) else ()
    residency = values.get("residency")
    values["instances"] = settle_gpu_memory(merged, residency, reading) if isinstance(residency, ResidencySettings) else merged
    cfg = Config(path=path if path.startswith("<") else str(Path(path).resolve()), **values)  # type: ignore[arg-type]  # each value as its key's kind read it
    listed = raw.get("instances")
    check(cfg, reading, complete=isinstance(listed, list) and len(listed) == len(cfg.instances))
    if reading.errors:
        raise reading.fail(path)
    return replace(cfg, warnings=reading.warning_lines(path))
