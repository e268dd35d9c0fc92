"""``python -m router.engines setup``: engine virtualenvs built from the config, and
``render --check`` telling when a venv holds another engine version than the YAML pins.

The real build installs a tiny pure-Python package from PyPI (``six``) as the "engine",
with ``engine_import`` naming the module that must import: the same path a vLLM pin takes,
in seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import ConfigError, load_config
from router.engines.__main__ import main as setup_main
from router.render.cli import main as render_main

PIN = "six==1.16.0"


def engine(name: str, port: int, venv: str | None = "venv", **extra: Any) -> dict[str, Any]:
    inst: dict[str, Any] = {"name": name, "model": f"org/{name}", "engine": "vllm", "engine_args": f"--port {port}",
                            **extra}
    if venv is not None:
        inst.update(using_venv=True, venv_path=venv)
    return inst


def write(folder: Path, *instances: dict[str, Any], **top: Any) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**top, "instances": list(instances)}))
    return path


def fake_venv(folder: Path, dists: dict[str, str]) -> Path:
    """A venv as its metadata shows it: bin/python and a dist-info per distribution."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("#!/bin/sh\n")
    site = folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for name, version in dists.items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_dry_run_prints_the_plan_per_venv_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "reqs.txt").write_text("six==1.16.0\n")
    cfg = write(tmp_path,
                engine("a", 8001, engine_package=PIN, engine_import="six", kvcached_env=["ENABLE_KVCACHED=true"]),
                engine("b", 8002, engine_package=PIN, engine_import="six"),
                engine("c", 8003, venv="other", engine_requirements="reqs.txt"),
                engine("d", 8004, venv=None))
    assert setup_main(["setup", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    venv, other = tmp_path / "venv", tmp_path / "other"
    assert f"{venv} (for a, b): {PIN}" in out
    assert f"{other} (for c): -r {tmp_path / 'reqs.txt'}" in out
    assert out.count("create the venv") == 2
    assert f"install {PIN}" in out and "install kvcached (ENABLE_KVCACHED is on)" in out
    assert out.count("install kvcached") == 1  # only the venv whose instance enables it
    assert "check: import six" in out and "check: import vllm" in out  # c imports its engine's own module
    assert "d: no engine_package" in out
    assert not venv.exists() and not other.exists()


def test_a_venv_that_has_the_pin_needs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_venv(tmp_path / "venv", {"six": "1.16.0"})
    fake_venv(tmp_path / "old", {"six": "1.15.0"})
    # A pin is met as pip meets it: six==1.16 by 1.16.0.
    cfg = write(tmp_path, engine("a", 8001, engine_package="six==1.16", engine_import="six"),
                engine("b", 8002, venv="old", engine_package=PIN, engine_import="six"))
    assert setup_main(["setup", "--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    a, b = out.split(f"{tmp_path / 'old'} (for b)")
    assert "six 1.16.0 is installed" in a and "nothing to install" in a and "create the venv" not in a
    assert f"install {PIN} (has 1.15.0)" in b and "six 1.16.0 is installed" not in b


@pytest.mark.parametrize("instance, where, says", [
    (engine("a", 8001, engine_package="six>=1.0"), "instances[0].engine_package", "not pinned to one version"),
    (engine("a", 8001, engine_package="six =="), "instances[0].engine_package", "not a pip requirement"),
    (engine("a", 8001, venv=None, engine_package=PIN), "instances[0].engine_package", "set using_venv: true"),
    (engine("a", 8001, engine_package=PIN, engine_requirements="r.txt"), "instances[0].engine_requirements",
     "not both"),
    (engine("a", 8001, engine_import="six-x"), "instances[0].engine_import", "not a Python module name"),
])
def test_bad_engine_declarations_name_the_field(tmp_path: Path, instance: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, instance), sim=True)
    assert any(p.startswith(f"{where}: ") and says in p for p in e.value.problems), e.value.problems


def test_instances_sharing_a_venv_declare_one_engine(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, engine("a", 8001, engine_package=PIN), engine("b", 8002, engine_package="six==1.15.0")),
                    sim=True)
    assert any(p.startswith("instances[1].engine_package: ") and "also instance 'a'" in p for p in e.value.problems)


def test_missing_venv_error_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, engine("a", 8001, engine_package=PIN)))
    assert any("python -m router.engines setup" in p for p in e.value.problems)


def test_render_check_warns_when_a_venv_holds_another_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_venv(tmp_path / "venv", {"six": "1.15.0"})
    fake_venv(tmp_path / "good", {"six": "1.16.0"})
    fake_venv(tmp_path / "empty", {})
    cfg = write(tmp_path, engine("a", 8001, engine_package=PIN), engine("b", 8002, venv="good", engine_package=PIN),
                engine("c", 8003, venv="empty", engine_package=PIN))
    assert render_main(["--config", str(cfg), "--check"]) == 0
    warnings = [w for w in capsys.readouterr().err.splitlines() if ".engine_package:" in w]
    assert warnings == [
        f"warning: {cfg}: instances[0].engine_package: venv {tmp_path / 'venv'} has six 1.15.0, but the config pins "
        f"{PIN}; run python -m router.engines setup --config FILE",
        f"warning: {cfg}: instances[2].engine_package: venv {tmp_path / 'empty'} has no six, but the config pins "
        f"{PIN}; run python -m router.engines setup --config FILE"]


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.slow
def test_setup_builds_the_venv_and_a_second_run_changes_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, engine("a", 8001, engine_package=PIN, engine_import="six"))
    assert setup_main(["setup", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    venv = tmp_path / "venv"
    assert f"{venv}: six 1.16.0 imports (built)" in out
    assert (venv / "bin" / "python").exists()
    before = snapshot(venv)
    assert setup_main(["setup", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "nothing to install" in out and f"{venv}: six 1.16.0 imports (unchanged)" in out
    assert snapshot(venv) == before
    # The built venv satisfies the config: a real render check has no complaint about it.
    assert render_main(["--config", str(cfg), "--check"]) == 0
    assert "engine_package" not in capsys.readouterr().err


def test_a_missing_requirements_file_stops_setup_before_anything(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, engine("a", 8001, engine_requirements="missing.txt"))
    assert setup_main(["setup", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"instances[0].engine_requirements: {tmp_path / 'missing.txt'} is not a file" in err
    assert not (tmp_path / "venv").exists()
