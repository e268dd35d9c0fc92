"""The engine registry and the third engine kind that proves it.

Every module of router/engines but `spec` is one engine and is registered by
being there; nothing outside router/engines and router/sim names an engine.
`engine: openai` (any OpenAI-compatible server started by its own command)
renders a launch script that execs that command, and under ``--sim`` one that
runs the simulator on the same address, serving the OpenAI API and the
instance's own health path.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import PY, Proc, free_port, http_status, short_tmp, wait_http  # noqa: F401  (fixture)

from router import render
from router.config import load_config
from router.engines import ENGINE_ALIASES, ENGINES, NOT_ENGINES, SIM_MODULE, engine_modules
from router.sim.dialects import DIALECTS

ROUTER = Path(__file__).resolve().parent.parent / "router"
#: What the router routes today; every engine serves them.
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
#: A program that prints what it was started with, standing in for a server.
ECHO = f"""#!{PY}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "path": os.environ["PATH"]}}, sys.stdout)
"""


# -- the registry ------------------------------------------------------------

def test_every_engine_module_is_registered_by_being_there() -> None:
    on_disk = sorted(p.stem for p in (ROUTER / "engines").glob("*.py") if p.stem not in {"__init__", *NOT_ENGINES})
    assert engine_modules() == on_disk == ["openai", "sglang", "vllm"]
    for module in on_disk:
        spec = importlib.import_module(f"router.engines.{module}").SPEC
        assert ENGINES[spec.name] is spec
    assert list(ENGINES) == ["vllm", "sglang", "openai"]  # common ones first in messages


def test_each_spelling_names_one_engine() -> None:
    assert ENGINE_ALIASES == {"vllm": "vllm", "sglang": "sglang", "sgl": "sglang", "openai": "openai"}


@pytest.mark.parametrize("name", list(ENGINES))
def test_each_spec_is_complete(name: str) -> None:
    spec = ENGINES[name]
    assert spec.client_paths[:3] == ROUTED
    assert all(p.startswith("/") for p in spec.client_paths) and len(set(spec.client_paths)) == len(spec.client_paths)
    assert spec.health_path.startswith("/")
    assert spec.sim_dialect in DIALECTS
    assert spec.has_sleep_api == bool(spec.tiers)
    if spec.launcher is not None:  # the simulator stands in for it without being told a port
        assert spec.default_port is not None


def test_openai_has_no_sleep_api_and_reads_no_flag_for_gpu_or_names() -> None:
    spec = ENGINES["openai"]
    assert (spec.launcher, dict(spec.tiers), spec.is_sleeping_path) == (None, {}, None)
    assert (spec.gpu_fraction_flag, spec.served_name_flag, spec.args_key) == (None, None, "command")
    assert not spec.has_sleep_api and ENGINES["vllm"].has_sleep_api and ENGINES["sglang"].has_sleep_api


def test_nothing_outside_the_engine_modules_and_the_simulator_names_an_engine() -> None:
    """A new engine needs no change elsewhere: no other module compares with, or
    writes, an engine's name (docstrings and comments may mention them)."""
    names = set(ENGINE_ALIASES)
    found = []
    for path in sorted(ROUTER.rglob("*.py")):
        rel = path.relative_to(ROUTER)
        if rel.parts[0] in ("engines", "sim"):
            continue
        source = path.read_text()
        found += [f"{rel}: 'engine == \"'" for _ in range(source.count('engine == "') + source.count("engine == '"))]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == []


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
