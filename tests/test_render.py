"""The renderer: files, permissions, quoting, determinism, atomicity and the CLI.

supervisord.conf is checked by supervisor's own config parser, and the launch
scripts by running them with a stand-in ``python`` that prints its argv and
environment, so quoting is proven by the shell that will run it.
"""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import PY, kvcached_fixture, short_tmp  # noqa: F401  (fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervisor.options import ServerOptions

from router import render
from router.config import load_config, parse_config
from router.engines import SIM_MODULE

ROOT = Path(__file__).resolve().parent.parent

#: A ``bin/python`` that prints what it was started with, instead of an engine.
ECHO_PYTHON = f"""#!{PY}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, sys.stdout)
"""


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def echo_venv(folder: Path) -> Path:
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(ECHO_PYTHON)
    (venv / "bin" / "python").chmod(0o700)
    return venv


def run_script(script: Path) -> dict:
    """Run a rendered launch script with a minimal environment; what the engine got."""
    done = subprocess.run([str(script)], capture_output=True, timeout=30, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def supervisor_programs(conf: Path) -> dict:
    """supervisord.conf as supervisord itself reads it: name -> process config."""
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])
    return {p.name: p for g in options.process_group_configs for p in g.process_configs}


def rendered(cfg_path: Path, out: Path, sim: bool = False) -> dict[str, tuple[str, int]]:
    files = render.render_files(load_config(cfg_path, sim=sim), out, sim=sim)
    render.write_tree(out, files)
    return dict(files)


# -- the files ---------------------------------------------------------------

def test_kvcached_config_renders_every_file_private(short_tmp: str) -> None:
    out = Path(short_tmp) / "out"
    files = rendered(Path(kvcached_fixture(short_tmp)), out)
    assert sorted(files) == ["engines/instance1.sh", "engines/instance2.sh", "kvrouter.service", "supervisord.conf", "tmux-launch.sh",
                            "tmux-logs.sh"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "engines").stat().st_mode) == 0o700
    for rel, (text, mode) in files.items():
        assert (out / rel).read_text() == text
        assert stat.S_IMODE((out / rel).stat().st_mode) == mode == (0o600 if rel.endswith((".conf", ".service")) else 0o700)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_supervisord_reads_back_programs_as_meant(short_tmp: str) -> None:
    out = Path(short_tmp) / "out"
    cfg_path = Path(kvcached_fixture(short_tmp))
    rendered(cfg_path, out)
    progs = supervisor_programs(out / "supervisord.conf")
    assert sorted(progs) == ["instance1", "instance2", "logs", "router"]
    for name in ("instance1", "instance2"):
        p = progs[name]
        assert p.command == str(out / "engines" / f"{name}.sh")
        assert (p.autorestart is not False, p.stopasgroup, p.killasgroup) == (True, True, True)
        assert p.stopwaitsecs >= 30
        assert p.stdout_logfile == str(out / "logs" / f"{name}.log")
        assert p.stdout_logfile_backups > 0 and p.stdout_logfile_maxbytes > 0
    router = progs["router"]
    assert shlex.split(router.command) == [sys.executable, "-m", "router.serve", "--config", str(cfg_path),
                                           "--supervisor-socket", str(out / "supervisor.sock")]
    assert {p.directory for p in progs.values()} == {str(out)}  # programs run in the output folder
    assert router.stopwaitsecs >= load_config(cfg_path).router.shutdown_grace_seconds + 5
    assert router.environment == {"PYTHONUNBUFFERED": "1"}


def test_values_reaching_supervisord_conf_come_back_literally(short_tmp: str) -> None:
    """A config path with %, spaces and ; reaches the router's command intact."""
    odd = Path(short_tmp) / "c %(here)s x;y"
    odd.mkdir()
    cfg_path = write_config(odd, {"instances": [{"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]})
    out = Path(short_tmp) / "out dir;#x"
    rendered(cfg_path, out, sim=True)
    progs = supervisor_programs(out / "supervisord.conf")
    assert shlex.split(progs["router"].command)[4:] == [str(cfg_path), "--supervisor-socket", str(out / "supervisor.sock")]
    assert shlex.split(progs["m"].command) == [str(out / "engines" / "m.sh")]


@pytest.mark.parametrize("bad", ["a\nb", "a ;b", "a #b", " a", "a\r"])
def test_ini_value_refuses_what_supervisord_would_cut(bad: str) -> None:
    with pytest.raises(render.RenderError, match="cannot be written into supervisord.conf"):
        render.ini_value(bad)


def test_ini_value_doubles_percent() -> None:
    assert render.ini_value("/a/%(here)s;b") == "/a/%%(here)s;b"


@pytest.mark.parametrize("out, fragment", [
    ("relative/out", "must be an absolute path"),
    ("/tmp/" + "x" * 100, "longer than 107 bytes"),
    ("/tmp/50%/out", "contains '%'"),
])
def test_unusable_output_folders_are_refused(out: str, fragment: str) -> None:
    cfg = parse_config("instances: [{model: m, engine: vllm, engine_args: ['--port=9001']}]")
    with pytest.raises(render.RenderError, match=fragment):
        render.render_files(cfg, Path(out))


def test_engine_script_exports_env_in_order_and_runs_the_venv_python(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    venv = echo_venv(tmp)
    cfg_path = write_config(tmp, {
        "kvcached": {"kvcached_gpu_utilization": 0.95, "enable_kvcached": True},
        "instances": [{
            "name": "e", "model": "org/M", "engine": "sglang", "using_venv": True, "venv_path": "venv",
            "kvcached_env": ["ENABLE_KVCACHED=false"], "engine_env": ["X=$(touch pwned) `id` ~ $HOME", "PYTHONUNBUFFERED=0"],
            "engine_args": ["--port=9001", "--mem-fraction-static 0.5", "--served-model-name \"a b\"; rm -rf ~"],
        }],
    })
    rendered(cfg_path, tmp / "out")
    got = run_script(tmp / "out" / "engines" / "e.sh")
    assert got["argv"] == ["-m", "sglang.launch_server", "--model-path", "org/M", "--port=9001", "--mem-fraction-static", "0.5",
                           "--served-model-name", "a b;", "rm", "-rf", "~"]
    env = got["env"]
    assert env["KVCACHED_GPU_UTILIZATION"] == "0.95"
    assert env["ENABLE_KVCACHED"] == "false"  # the instance's kvcached_env overrides the global block
    assert env["X"] == "$(touch pwned) `id` ~ $HOME"
    assert env["PYTHONUNBUFFERED"] == "0"  # the instance's env has the last word
    assert env["VIRTUAL_ENV"] == str(venv)
    assert env["PATH"].split(":")[0] == str(venv / "bin")
    assert not (tmp / "out" / "engines" / "pwned").exists() and not Path("pwned").exists()


def test_vllm_script_launches_the_api_server(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    echo_venv(tmp)
    cfg_path = write_config(tmp, {"instances": [{"model": "x%(here)s", "name": "v", "engine": "vllm", "using_venv": True,
                                                 "venv_path": str(tmp / "venv"), "engine_args": "--port 9001 --enforce-eager"}]})
    rendered(cfg_path, tmp / "out")
    got = run_script(tmp / "out" / "engines" / "v.sh")
    assert got["argv"] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "x%(here)s", "--port", "9001", "--enforce-eager"]


# Anything YAML can hold but NUL (which no argv or environment can carry).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=24)


@pytest.mark.slow  # fuzz: 40 generated configs, each rendered and its script run
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(TEXT, max_size=6), values=st.lists(TEXT, min_size=1, max_size=4),
       model=TEXT.filter(lambda s: s.strip() == s and s != ""))
def test_arbitrary_args_and_env_values_arrive_literally(short_tmp: str, args: list[str], values: list[str], model: str) -> None:
    """Each engine_args item quoted as a shell word, and each env value, reach the engine unchanged."""
    tmp = Path(short_tmp)
    if not (tmp / "venv").exists():
        echo_venv(tmp)
    env = [f"KVR_T{i}={v}" for i, v in enumerate(values)]
    cfg_path = write_config(tmp, {"instances": [{
        "name": "p", "model": model, "engine": "vllm", "using_venv": True, "venv_path": "venv",
        "engine_env": env, "engine_args": [shlex.quote(a) for a in args] + ["--port=9001"],
    }]})
    rendered(cfg_path, tmp / "out")
    got = run_script(tmp / "out" / "engines" / "p.sh")
    assert got["argv"] == ["-m", "vllm.entrypoints.openai.api_server", "--model", model, *args, "--port=9001"]
    assert [got["env"][f"KVR_T{i}"] for i in range(len(values))] == values


def test_sim_replaces_each_engine_on_the_same_host_and_port(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"launch_delay_seconds": 0, "instances": [
        {"name": "v", "model": "m", "engine": "vllm", "using_venv": True, "venv_path": "missing",
         "engine_args": ["--host=127.0.0.1", "--port=9001"], "sim_args": ["--ttft-ms 5"]},
    ]})
    files = rendered(cfg_path, tmp / "out", sim=True)
    script = files["engines/v.sh"][0]
    assert "VIRTUAL_ENV" not in script  # the simulator runs with the renderer's python, not the venv's
    last = script.rstrip().splitlines()[-1]
    assert shlex.split(last) == ["exec", sys.executable, "-m", SIM_MODULE, "--engine", "vllm", "--model", "m",
                                 "--host=127.0.0.1", "--port=9001", "--ttft-ms", "5"]


def test_launch_delay_staggers_engines_in_config_order(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"launch_delay_seconds": 0.1, "instances": [
        {"name": f"e{i}", "model": f"m{i}", "engine": "vllm", "engine_args": [f"--port={9001 + i}"]} for i in range(4)
    ]})
    files = rendered(cfg_path, tmp / "out", sim=True)
    sleeps = [[ln.strip() for ln in files[f"engines/e{i}.sh"][0].splitlines() if ln.strip().startswith("sleep ")] for i in range(4)]
    assert sleeps == [[], ["sleep 0.1"], ["sleep 0.2"], ["sleep 0.3"]]
    # startsecs is the same for first starts and restarts: a restart (no wait) shows RUNNING as soon as any start
    progs = supervisor_programs(tmp / "out" / "supervisord.conf")
    assert [progs[f"e{i}"].startsecs for i in range(4)] == [render.ENGINE_STARTSECS] * 4


def test_external_instances_and_a_disabled_router_are_not_rendered(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"router": {"enable_router": False}, "instances": [
        {"name": "here", "model": "m", "engine": "vllm", "engine_args": ["--port=9001"]},
        {"name": "there", "model": "m", "engine": "vllm", "launch": False, "engine_args": ["--host=10.0.0.2", "--port=9001"]},
    ]})
    files = rendered(cfg_path, tmp / "out", sim=True)
    assert sorted(files) == ["engines/here.sh", "kvrouter.service", "supervisord.conf", "tmux-launch.sh", "tmux-logs.sh"]
    assert sorted(supervisor_programs(tmp / "out" / "supervisord.conf")) == ["here", "logs"]
    for script in ("tmux-launch.sh", "tmux-logs.sh"):
        assert "SESSIONS=( kvcached-here )" in files[script][0].splitlines()


# -- determinism and atomicity -----------------------------------------------

def test_rendering_is_deterministic(short_tmp: str) -> None:
    cfg_path = Path(kvcached_fixture(short_tmp))
    out = Path(short_tmp) / "out"
    first = rendered(cfg_path, out)
    on_disk = {rel: (out / rel).read_bytes() for rel in first}
    second = rendered(cfg_path, out)
    assert first == second
    assert on_disk == {rel: (out / rel).read_bytes() for rel in second}


def test_rerender_replaces_scripts_and_keeps_runtime_files(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    out = tmp / "out"
    two = {"instances": [{"name": n, "model": n, "engine": "vllm", "engine_args": [f"--port={p}"]} for n, p in (("a", 9001), ("b", 9002))]}
    rendered(write_config(tmp, two), out, sim=True)
    (out / "logs" / "a.log").write_text("kept")
    rendered(write_config(tmp, {"instances": two["instances"][:1]}), out, sim=True)
    assert sorted(p.name for p in (out / "engines").iterdir()) == ["a.sh"]
    assert (out / "logs" / "a.log").read_text() == "kept"


def test_failed_write_leaves_previous_output_intact(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    out = tmp / "out"
    before = rendered(Path(kvcached_fixture(short_tmp)), out)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = {**before, "engines/instance1.sh/inside": ("x", 0o600)}  # a file under a file: the write fails
    with pytest.raises(OSError):
        render.write_tree(out, broken)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# -- the command line --------------------------------------------------------

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "router.render", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_config_error_exits_2_and_writes_nothing(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"instances": [{"model": "m", "engine": "tgi", "engine_args": ["--port=9001"]}]})
    done = cli("--config", str(cfg_path), "--out", "out", cwd=tmp)
    assert done.returncode == 2
    assert f"{cfg_path}: instances[0].engine: unknown engine 'tgi'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp / "out").exists()


@pytest.mark.parametrize("flags", [["--check"], ["--out", "out"]])
def test_cli_prints_every_warning_and_error_at_once(short_tmp: str, flags: list[str]) -> None:
    """The did-you-mean on a misspelt key is shown with the error it caused."""
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"instances": [{"model": "m", "engine": "vllm", "enigne_args": ["--port=9001"]}]})
    done = cli("--config", str(cfg_path), *flags, cwd=tmp)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"warning: {cfg_path}: instances[0].enigne_args: unknown key, ignored; did you mean 'engine_args'?",
        f"error: {cfg_path}: instances[0].engine_args: no '--port' given; the router needs it to reach the engine (add e.g. '--port=8001')",
        "Nothing was written.",
    ]
    assert sorted(p.name for p in tmp.iterdir()) == ["config.yaml"]


def test_tmux_session_prefix_names_every_session(short_tmp: str) -> None:
    """tmux turns '.' into '_' in session names, so the rendered names are what tmux shows."""
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"tmux_session_prefix": "gpu.0-", "instances": [
        {"name": "here", "model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]})
    done = cli("--config", str(cfg_path), "--out", "out", "--sim", cwd=tmp)
    assert done.returncode == 0, done.stderr
    assert "  tmux attach -t gpu_0-here\n" in done.stdout and "  tmux attach -t gpu_0-frontend\n" in done.stdout
    for script in ("tmux-launch.sh", "tmux-logs.sh"):
        text = (tmp / "out" / script).read_text()
        assert "SESSIONS=( gpu_0-here gpu_0-frontend )" in text.splitlines()
        assert f"STACK={tmp / 'out'}" in text.splitlines()
    bad = write_config(tmp, {"tmux_session_prefix": "a b", "instances": [{"model": "m", "engine": "vllm", "engine_args": ["--port=9001"]}]})
    refused = cli("--config", str(bad), "--check", cwd=tmp)
    assert refused.returncode == 2 and f"error: {bad}: tmux_session_prefix: 'a b' is not a usable tmux session prefix" in refused.stderr


def test_launch_delay_outside_supervisord_is_waited_every_time(short_tmp: str) -> None:
    """tmux-launch.sh mode has no restarts: every start is a first start."""
    tmp = Path(short_tmp)
    echo_venv(tmp)
    cfg_path = write_config(tmp, {"launch_delay_seconds": 0.5, "instances": [
        {"name": f"e{i}", "model": "m", "engine": "vllm", "using_venv": True, "venv_path": "venv", "engine_args": [f"--port={9001 + i}"]}
        for i in range(2)]})
    rendered(cfg_path, tmp / "out")
    for _ in range(2):
        t0 = time.monotonic()
        run_script(tmp / "out" / "engines" / "e1.sh")
        assert time.monotonic() - t0 >= 0.5
    assert not (tmp / "out" / "run" / "e1.launched").exists()
    assert (tmp / "out" / "run" / "e1.script").read_text() == (tmp / "out" / "engines" / "e1.sh").read_text()



def test_launch_order_healthy_waits_on_a_first_start_at_boot_only(short_tmp: str) -> None:
    """e1 waits for e0, which never serves here, so until e0's start timeout (2 s): outside
    supervisord, and on a first start just after supervisord's start; not on a restart, nor on
    the first start of an engine that `--apply` adds to a supervisord up for minutes."""
    tmp = Path(short_tmp)
    echo_venv(tmp)
    timeout = 2
    cfg_path = write_config(tmp, {"instances": [
        {"name": f"e{i}", "model": "m", "engine": "vllm", "using_venv": True, "venv_path": "venv",
         "engine_args": [f"--port={port}"], "start_timeout_seconds": timeout} for i, port in enumerate((9, 10))]})
    rendered(cfg_path, tmp / "out")
    script, pidfile = tmp / "out" / "engines" / "e1.sh", tmp / "out" / "supervisord.pid"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}

    def took(started: str = "", runs: int = 1) -> tuple[float, str]:
        """Seconds and output of `runs` starts of the script: alone, or (`started`: when its fake
        supervisord started) as the children of one supervisord."""
        if started:
            argv = ["bash", "-c", 'echo $$ > "$1"; touch -d "$2" "$1"; for _ in $(seq "$4"); do "$3"; done; true',
                    "-", str(pidfile), started, str(script), str(runs)]
        else:
            argv = [str(script)]
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, timeout=30, env=env, text=True)
        assert done.returncode == 0, done.stderr
        return time.monotonic() - t0, done.stdout

    alone, said = took()
    assert alone >= timeout and "launch_order healthy: waiting for e0" in said and "(e0 timeout)" in said
    at_boot, said = took("now", runs=2)  # a first start, then a restart under the same supervisord
    assert timeout <= at_boot < 2 * timeout - 0.5 and said.count("waiting for e0") == 1, (at_boot, said)
    (tmp / "out" / "run" / "e1.launched").unlink()
    added, said = took("5 minutes ago")  # added to a running stack by --apply: at once
    assert added < timeout and "waiting" not in said, (added, said)

def test_cli_check_prints_the_table_and_warnings_and_writes_nothing(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    cfg_path = write_config(tmp, {"instance": 1, "instances": [{"name": "a", "model": "org/m", "engine": "sgl", "engine_args": ["--port=9001"]}]})
    done = cli("--config", str(cfg_path), "--check", cwd=tmp)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["NAME", "MODEL", "ENGINE", "HOST:PORT", "VENV", "LAUNCH"]
    assert row.split() == ["a", "org/m", "sglang", "127.0.0.1:9001", "-", "yes"]
    assert "warning:" in done.stderr and "did you mean 'instances'?" in done.stderr
    assert sorted(p.name for p in tmp.iterdir()) == ["config.yaml"]


def test_cli_renders_the_example_under_sim_from_any_folder(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    done = cli("--config", str(ROOT / "example-config.yaml"), "--out", "o", "--sim", cwd=tmp)
    assert done.returncode == 0, done.stderr
    conf = tmp / "o" / "supervisord.conf"
    assert f"  supervisord -c {conf}\n" in done.stdout
    assert f"  supervisorctl -c {conf} status\n" in done.stdout
    for session in ("kvcached-llama", "kvcached-qwen", "kvcached-frontend"):
        assert f"  tmux attach -t {session}\n" in done.stdout
    assert "venv_path" in done.stderr  # the missing GPU venvs are warnings under --sim
    assert sorted(supervisor_programs(conf)) == ["llama", "logs", "qwen", "router"]


def test_cli_bad_output_folder_exits_2(short_tmp: str) -> None:
    tmp = Path(short_tmp)
    done = cli("--config", str(ROOT / "example-config.yaml"), "--sim", "--out", "a%b", cwd=tmp)
    assert done.returncode == 2 and "contains '%'" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp.iterdir()) == []


@pytest.mark.slow  # builds and installs the package: half a minute
def test_templates_are_found_in_a_non_editable_install(short_tmp: str) -> None:
    """`pip install .` ships templates/ as router/templates, found from any folder."""
    target = Path(short_tmp) / "site"
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=180)
    assert sorted(p.name for p in (target / "router" / "templates").glob("*.j2")) == sorted(p.name for p in (ROOT / "templates").glob("*.j2"))
    code = textwrap.dedent("""
        import sys
        from router import render
        print(render.__file__); print(render.templates_dir())
        sys.exit(render.main(sys.argv[1:]))
    """)
    done = subprocess.run([PY, "-c", code, "--config", str(ROOT / "example-config.yaml"), "--sim", "--out", "o"],
                          cwd=short_tmp, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    module, templates = done.stdout.splitlines()[:2]
    assert module.startswith(str(target)) and templates == str(target / "router" / "templates")
    assert (Path(short_tmp) / "o" / "supervisord.conf").is_file()


@pytest.mark.parametrize("module", ["router.render", "router.status", "router.bench", "router.serve", "router.sim"])
def test_help_is_plain_text(module: str) -> None:
    """`--help` is read in a terminal: no reStructuredText markup, and the description ends its sentence."""
    done = subprocess.run([PY, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "`" not in done.stdout and ":func:" not in done.stdout, done.stdout
    description = done.stdout.split("\n\n")[1]
    assert description.rstrip().endswith("."), description


def test_a_clean_stop_is_no_warning_in_supervisords_log(short_tmp: str) -> None:
    """supervisord logs a stop at WARN when the exit is not one of the program's exitcodes: a router
    (or an engine) stopped on purpose must exit with one, or every deploy looks like an incident."""
    from helpers import distinct_ports, wait_for
    from supervised import Supervised, render_cli
    tmp = Path(short_tmp)
    router_port, a = distinct_ports(2)
    cfg = tmp / "config.yaml"
    cfg.write_text(json.dumps({"router": {"router_port": router_port, "shutdown_grace_seconds": 1},
                               "instances": [{"name": "a", "model": "org/a", "engine": "vllm", "engine_args": [f"--port={a}"]}]}))
    stack = Supervised(tmp / "out", tmp / "tmux")
    try:
        assert render_cli(cfg, tmp / "out", "--sim", env=stack.env).returncode == 0
        stack.start()
        stack.wait_running(["a", "router", "logs"])
        for program in ("router", "a"):
            done = stack.ctl("stop", program)
            assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        log = tmp / "out" / "logs" / "supervisord.log"
        stops = wait_for(lambda: [ln for ln in log.read_text().splitlines() if "stopped: " in ln][:2]
                         if log.read_text().count("stopped: ") >= 2 else None, 10, "both stops in supervisord's log")
        assert all(" INFO stopped: " in ln for ln in stops), stops
        assert not [ln for ln in log.read_text().splitlines() if " WARN " in ln], log.read_text()
    finally:
        stack.close()


#: Runs a CLI as in an install without the extra kvrouter[kubernetes]: its two packages cannot be imported.
WITHOUT_EXTRAS = ("import runpy, sys; sys.modules.update(kubernetes=None, dns=None); sys.argv = sys.argv[1:]; "
                  "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def test_without_the_kubernetes_extra_manifests_render_and_a_cluster_config_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(json.dumps({"router": {"replicas": 2}, "instances": [
        {"name": "a", "model": "org/a", "engine": "vllm", "engine_args": ["--port=8001"]},
        {"name": "pool", "model": "org/pool", "engine": "vllm", "dns_name": "pool.test", "port": 8000}]}))
    manifests = subprocess.run([PY, "-c", WITHOUT_EXTRAS, "router.render", "--config", str(cfg), "--target", "kubernetes",
                                "--out", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=60)
    assert manifests.returncode == 0, manifests.stderr
    assert (tmp_path / "k8s" / "kustomization.yaml").is_file()
    assert "install it with: pip install 'kvrouter[kubernetes]' (here; the router runs elsewhere" in manifests.stderr
    check = subprocess.run([PY, "-c", WITHOUT_EXTRAS, "router.render", "--config", str(cfg), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stderr
    assert f"error: {cfg}: instances pool: dns_name: engine replicas found by DNS needs the Python package dnspython, " \
           "which is not installed; install it with: pip install 'kvrouter[kubernetes]'" in check.stderr
    serve = subprocess.run([PY, "-c", WITHOUT_EXTRAS, "router.serve", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2, serve.stderr
    assert "Traceback" not in serve.stderr
    assert f"error: {cfg}: kubernetes.leader_election: leader election by a Kubernetes Lease needs the Python package " \
           "kubernetes, which is not installed; install it with: pip install 'kvrouter[kubernetes]'" in serve.stderr
    assert f"error: {cfg}: instances pool: dns_name: engine replicas found by DNS needs the Python package dnspython" in serve.stderr
    # A single-node config needs neither: the router starts and answers.
    from helpers import Proc, free_port, wait_http
    port = free_port()
    plain = tmp_path / "plain.yaml"
    plain.write_text(json.dumps({"router": {"router_port": port}, "instances": [
        {"name": "a", "model": "org/a", "engine": "vllm", "engine_args": ["--port=8001"]}]}))
    router = Proc([PY, "-c", WITHOUT_EXTRAS, "router.serve", "--config", str(plain)], log=str(tmp_path / "router.log"))
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    finally:
        router.stop()
