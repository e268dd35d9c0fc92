"""The package as a user installs it: a built wheel in a fresh venv, run from an empty folder.

`python -m build` makes the sdist and, from it, the wheel (the way a release is
built), `twine check` accepts both, and the wheel carries every module of the
checkout. The wheel goes into a new venv (no system site-packages, no
PYTHONPATH; its dependencies from the package index), and from an empty
folder the README's Quick start runs with --sim on nothing but that venv:
`kvrouter-render` renders the templates the wheel carries, its supervisord
runs the stack with the venv's python, `kvrouter-status --wait` sees it
healthy, a chat request and the /ui page come through the router, and
`supervisorctl shutdown` stops it all.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml
from helpers import distinct_ports, http_status, post_json, refused, wait_for
from supervised import Supervised, alive
from test_stack import example_with_ports

import router

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
#: Left out of the copy the build starts from: VCS data, caches, earlier builds, a rendered stack.
NOT_SOURCE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".hypothesis",
                                    "venv", ".venv", "bench-results")


def clean_env() -> dict[str, str]:
    """The environment without anything that would let the checkout's code in."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TMUX")}


def run(argv: list[str], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=clean_env(), **kw)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def dist() -> Iterator[Path]:
    """The folder `python -m build` wrote the sdist and the wheel to, built from a copy of the checkout."""
    tmp = Path(tempfile.mkdtemp(prefix="kvw", dir="/tmp"))
    try:
        src = tmp / "src"
        shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
        run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(src)], timeout=600)
        yield tmp / "dist"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("kvrouter-*.whl")
    return wheel


def test_build_makes_a_wheel_and_an_sdist_twine_accepts_with_every_module(dist: Path) -> None:
    wheel = wheel_of(dist)
    assert wheel.name == f"kvrouter-{router.__version__}-py3-none-any.whl"
    (sdist,) = dist.glob("kvrouter-*.tar.gz")
    done = run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    assert done.stdout.count("PASSED") == 2, done.stdout
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "router").rglob("*.py")}
    assert modules - names == set(), "modules the wheel lacks (setup.cfg [options] packages)"
    data = {f"router/templates/{p.name}" for p in (ROOT / "templates").glob("*.j2")} | \
           {f"router/ui/{p.name}" for p in (ROOT / "router" / "ui").iterdir() if p.suffix in (".html", ".js", ".css")}
    assert data and data - names == set(), "package data the wheel lacks (setup.cfg [options.package_data])"


def test_the_quick_start_runs_from_the_installed_wheel_in_an_empty_folder(dist: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kvw", dir="/tmp"))
    stack = None
    try:
        run([sys.executable, "-m", "venv", str(tmp / "venv")])
        bin_ = tmp / "venv" / "bin"
        run([str(bin_ / "pip"), "install", "--quiet", str(wheel_of(dist))], timeout=600)
        here = tmp / "empty"
        here.mkdir()
        # The code is the venv's, not the checkout's.
        where = run([str(bin_ / "python"), "-c", "import router; print(router.__file__)"], cwd=here).stdout.strip()
        assert where.startswith(str(tmp / "venv")), where
        version = run([str(bin_ / "kvrouter-render"), "--version"], cwd=here).stdout
        assert version.strip() == f"kvrouter {router.__version__}"
        run([str(bin_ / "kvrouter-serve"), "--help"], cwd=here)

        router_port, *engine_ports = distinct_ports(3)
        doc = example_with_ports(router_port, engine_ports)
        (here / "example-config.yaml").write_text(yaml.safe_dump(doc))
        run([str(bin_ / "kvrouter-render"), "--config", "example-config.yaml", "--sim"], cwd=here)
        assert (here / "supervisor" / "supervisord.conf").is_file()

        stack = Supervised(here / "supervisor", tmp / "tmux", python=str(bin_ / "python"))
        stack.env = {**clean_env(), "TMUX_TMPDIR": str(tmp / "tmux")}
        stack.start(daemon_from=here)
        run([str(bin_ / "kvrouter-status"), "--config", "example-config.yaml", "--wait"], cwd=here, timeout=120)
        serving = psutil.Process(stack.pid("router"))
        assert serving.cmdline()[0].startswith(str(bin_)), serving.cmdline()
        assert "PYTHONPATH" not in serving.environ()

        base = f"http://127.0.0.1:{router_port}"
        status, body = post_json(f"{base}/v1/chat/completions", {"model": "Qwen/Qwen3-0.6B", "max_tokens": 4,
                                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and body["choices"][0]["message"]["content"], body
        assert http_status(f"{base}/ui") == 200 and http_status(f"{base}/ui/app.js") == 200

        # Stopped as the Quick start stops it: nothing is left (supervisord, engines, router, logs program, tmux).
        wait_for(lambda: stack.tmux_server(), 15, "the tmux server of the logs program")
        everything = stack.snapshot()
        stack.shutdown()
        wait_for(lambda: not any(alive(p) for p in everything), 15,
                 f"every process to exit: {[p for p in everything if alive(p)]}")
        assert refused(router_port)
    finally:
        if stack is not None:
            stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
