"""The third engine kind, which proves the engine registry (the registry itself:
tests/unit/test_engine_registry.py).

`engine: openai` (any OpenAI-compatible server started by its own command)
renders a launch script that execs that command, and under ``--sim`` one that
runs the simulator on the same address, serving the OpenAI API and the
instance's own health path.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from helpers import PY, Proc, free_port, http_status, short_tmp, wait_http  # noqa: F401  (fixture)

from router import render
from router.config import load_config
from router.engines import SIM_MODULE

#: A program that prints what it was started with, standing in for a server.
ECHO = f"""#!{PY}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "path": os.environ["PATH"]}}, sys.stdout)
"""


# -- engine: openai, rendered ------------------------------------------------

def openai_config(folder: Path, **instance: object) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"instances": [{"name": "o", "model": "org/m", "engine": "openai", **instance}]}))
    return path


def render_to(cfg_path: Path, out: Path, sim: bool = False) -> dict[str, tuple[str, int]]:
    files = render.render_files(load_config(cfg_path, sim=sim), out, sim=sim)
    render.write_tree(out, files)
    return dict(files)


def test_openai_launch_script_execs_its_command_from_the_venv(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    bin_dir = tmp / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("my-server", "python"):
        (bin_dir / program).write_text(ECHO)
        (bin_dir / program).chmod(0o700)
    cfg_path = openai_config(tmp, command="my-server --port 9001 --title 'a b' '$(id)'",
                             using_venv=True, venv_path="venv")
    render_to(cfg_path, tmp / "out")
    done = run_script(tmp / "out" / "engines" / "o.sh")
    assert done["argv"] == ["--port", "9001", "--title", "a b", "$(id)"]
    assert done["path"].split(":")[0] == str(bin_dir)  # the program is found in the venv


def run_script(script: Path) -> dict:
    """Run a rendered launch script with a minimal environment; what the program got."""
    done = subprocess.run([str(script)], capture_output=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def test_openai_under_sim_is_the_simulator_on_the_same_address(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = openai_config(tmp, command=["llama-server", "-m x.gguf"], port=9001, host="127.0.0.1",
                             health_path="/ready", sim_args=["--ttft-ms 5"])
    script = render_to(cfg_path, tmp / "out", sim=True)["engines/o.sh"][0]
    assert shlex.split(script.rstrip().splitlines()[-1]) == [
        "exec", sys.executable, "-m", SIM_MODULE, "--engine", "openai", "--model", "org/m",
        "--host", "127.0.0.1", "--port", "9001", "--health-path", "/ready", "--ttft-ms", "5"]


def test_openai_sim_script_serves_the_api_and_its_health_path(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    port = free_port()
    cfg_path = openai_config(tmp, command=f"llama-server -m x.gguf --port {port}", health_path="/ready")
    render_to(cfg_path, tmp / "out", sim=True)
    proc = Proc([str(tmp / "out" / "engines" / "o.sh")])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/ready", timeout=20)
        assert http_status(url + "/health") == 404
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["org/m"]
        chat = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(chat).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = json.load(r)
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    finally:
        proc.stop()
