"""``render`` writes ``kvrouter.service``: supervisord in the foreground at boot, as a user, in the
output folder, with secrets from an environment file. Checked by systemd's own verifier where the
machine has it, and by reading the unit's keys back."""
from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import short_tmp  # noqa: F401  (fixture)
from test_render import write_config

from router.config import load_config
from router.render.files import UNIT_FILE, RenderError, env_file, render_files, unit_command
from router.render.tree import write_tree


def unit_of(out: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((out / UNIT_FILE).read_text())
    return unit


@pytest.mark.parametrize("folder", ["out", "with space/out"])
def test_the_unit_runs_supervisord_in_the_foreground_as_the_user(short_tmp: str, folder: str) -> None:
    tmp = Path(short_tmp)
    cfg = load_config(write_config(tmp, {"instances": [
        {"name": "a", "model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]}), sim=True)
    out = tmp / folder
    write_tree(out, render_files(cfg, out, sim=True, user="nobody"))
    unit = unit_of(out)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["User"] == "nobody"
    assert service["WorkingDirectory"] == str(out)
    # The user's own secrets file, the one a shell sources before starting supervisord by hand.
    assert service["EnvironmentFile"] == f"-{env_file('nobody')}" and not env_file("nobody").startswith("~")
    assert shlex.split(service["ExecStart"]) == [sys.executable, "-m", "supervisor.supervisord", "--nodaemon", "-c",
                                                 str(out / "supervisord.conf")]
    assert service["KillMode"] == "mixed" and int(service["TimeoutStopSec"]) > 60  # the engines' stopwaitsecs fit
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if shutil.which("systemd-analyze"):
        done = subprocess.run(["systemd-analyze", "verify", str(out / UNIT_FILE)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_unit_values_cannot_smuggle_specifiers_variables_or_lines() -> None:
    assert unit_command(["/x/py", "a b", "50%", "$HOME", 'q"'] ) == '/x/py "a b" 50%% $$HOME "q\\""'
    with pytest.raises(RenderError):
        unit_command(["/x/py", "a\nExecStartPre=/bin/evil"])


def test_a_config_path_with_a_control_character_is_shown_escaped(short_tmp: str) -> None:
    """The config's path is only text in the unit (its Description): shown escaped, not refused."""
    tmp = Path(short_tmp) / "odd\x1fdir"
    tmp.mkdir()
    cfg = load_config(write_config(tmp, {"instances": [
        {"name": "a", "model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]}), sim=True)
    out = Path(short_tmp) / "out"
    write_tree(out, render_files(cfg, out, sim=True, user="nobody"))
    assert unit_of(out)["Unit"]["Description"].endswith("odd\\x1fdir/config.yaml under supervisord")
