"""The config model: the kvcached controller's format, and every validation
error and warning of issue 2, each asserting the message names the field."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import kvcached_fixture

from router.config import ConfigError, load_config, parse_config


def cfg_text(*instances: str, top: str = "") -> str:
    """A config whose instances are the given YAML mappings (flow style)."""
    items = "\n".join(f"  - {i}" for i in instances)
    return f"{textwrap.dedent(top)}\ninstances:\n{items}\n"


VLLM = "{model: m1, engine: vllm, engine_args: ['--port=9001']}"
SGL = "{model: m2, engine: sglang, engine_args: ['--port 9002']}"


def problems(text: str, path: str = "conf.yaml", sim: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path, sim=sim)
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines())
    return info.value.problems


def one_problem(text: str, field: str, fragment: str) -> str:
    found = [p for p in problems(text) if p.startswith(field + ":")]
    assert found, f"no problem for {field}"
    assert fragment in found[0], found[0]
    return found[0]


def warnings_of(text: str, sim: bool = False) -> list[str]:
    return list(parse_config(text, "conf.yaml", sim=sim).warnings)


# -- the kvcached controller's format ----------------------------------------

def test_kvcached_format_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(kvcached_fixture(str(tmp_path)))
    assert cfg.warnings == ()
    a, b = cfg.instances
    assert (a.name, a.model, a.engine, a.host, a.port) == ("instance1", "meta-llama/Llama-3.2-1B", "vllm", "localhost", 12346)
    assert (b.name, b.engine, b.port) == ("instance2", "sglang", 30000)
    # one list item holding a flag and its value is two arguments
    assert a.engine_args == ("--no-enable-prefix-caching", "--host=localhost", "--port=12346",
                             "--gpu-memory-utilization", "0.5", "--enable-sleep-mode")
    assert a.env == (
        ("KVCACHED_GPU_UTILIZATION", "0.95"), ("KVCACHED_PAGE_PREALLOC_ENABLED", "true"),
        ("KVCACHED_MIN_RESERVED_PAGES", "5"), ("KVCACHED_MAX_RESERVED_PAGES", "10"),
        ("KVCACHED_SANITY_CHECK", "false"), ("KVCACHED_LOG_LEVEL", "INFO"),
        ("ENABLE_KVCACHED", "true"), ("KVCACHED_AUTOPATCH", "1"),
        ("VLLM_USE_V1", "1"), ("VLLM_ATTENTION_BACKEND", "FLASH_ATTN"), ("VLLM_SERVER_DEV_MODE", "1"),
    )
    # relative venv paths start at the config file's folder
    assert a.venv_path == str(tmp_path / "engine_integration" / "vllm-v0.9.2" / ".venv")
    assert a.python == a.venv_path + "/bin/python"
    assert (cfg.router.enable_router, cfg.router.host, cfg.router.port) == (True, "localhost", 8080)
    s = cfg.sleep
    assert (s.idle_threshold_seconds, s.check_interval_seconds, s.auto_sleep_enabled, s.wakeup_on_request, s.min_sleep_duration) == (300, 60, False, True, 80)
    assert cfg.launch_delay_seconds == 2


def test_engine_names_are_case_insensitive_and_sgl_is_sglang() -> None:
    cfg = parse_config(cfg_text(
        "{model: a, engine: VLLM, engine_args: ['--port=9001']}",
        "{model: b, engine: SGLang, engine_args: ['--port=9002']}",
        "{model: c, engine: sgl, engine_args: ['--port=9003']}",
    ))
    assert [i.engine for i in cfg.instances] == ["vllm", "sglang", "sglang"]


def test_engine_args_as_one_string_and_port_forms() -> None:
    cfg = parse_config(cfg_text(
        "{model: a, engine: vllm, engine_args: \"--host 0.0.0.0 --port 9001 --served-model-name 'a b'\"}",
        "{model: b, engine: vllm, engine_args: ['--port=9002', '--host=127.0.0.2']}",
    ))
    a, b = cfg.instances
    assert a.engine_args == ("--host", "0.0.0.0", "--port", "9001", "--served-model-name", "a b")
    assert (a.host, a.port, a.url, a.served_names) == ("0.0.0.0", 9001, "http://127.0.0.1:9001", ("a b",))
    assert (b.host, b.port) == ("127.0.0.2", 9002)


def test_defaults_name_from_model_replicas_aliases_and_external_instances() -> None:
    cfg = parse_config(cfg_text(
        "{model: org/Model-7B, engine: vllm, engine_args: ['--port=9001'], aliases: [seven]}",
        "{name: second, model: org/Model-7B, engine: vllm, engine_args: ['--port=9002']}",
        "{name: far, model: other, engine: vllm, launch: false, engine_args: ['--host=10.0.0.5', '--port=9001']}",
    ))
    assert [i.name for i in cfg.instances] == ["Model-7B", "second", "far"]
    assert [i.name for i in cfg.models["org/Model-7B"]] == ["Model-7B", "second"]
    assert cfg.routes["seven"] == "org/Model-7B"
    assert [i.name for i in cfg.launched] == ["Model-7B", "second"]


def test_kvcached_block_upper_cases_keys_and_renders_booleans() -> None:
    cfg = parse_config(cfg_text(VLLM, top="kvcached: {enable_kvcached: true, kvcached_sanity_check: false, kvcached_gpu_utilization: 0.9}"))
    assert cfg.kvcached_env == (("ENABLE_KVCACHED", "true"), ("KVCACHED_SANITY_CHECK", "false"), ("KVCACHED_GPU_UTILIZATION", "0.9"))


# -- errors: each names the file and the field ------------------------------

@pytest.mark.parametrize("instance, field, fragment", [
    ("{model: m, engine: tgi, engine_args: ['--port=9001']}", "instances[0].engine", "unknown engine 'tgi'"),
    ("{model: m, engine_args: ['--port=9001']}", "instances[0].engine", "unknown engine None"),
    ("{engine: vllm, engine_args: ['--port=9001']}", "instances[0].model", "missing"),
    ("{model: '', engine: vllm, engine_args: ['--port=9001']}", "instances[0].model", "missing"),
    ("{model: m, engine: vllm, engine_args: ['--host=127.0.0.1']}", "instances[0].engine_args", "no '--port' given"),
    ("{model: m, engine: vllm, engine_args: ['--port=http']}", "instances[0].engine_args", "not a port number"),
    ("{model: m, engine: vllm, engine_args: ['--port 70000']}", "instances[0].engine_args", "not a port number"),
    ("{model: m, engine: vllm, engine_args: ['--served-model-name \"a b']}", "instances[0].engine_args", "check the quotes"),
    ("{model: m, engine: vllm, engine_args: {port: 1}}", "instances[0].engine_args", "must be a list of strings"),
    ("{name: 'a b', model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "not a safe name"),
    ("{name: '../x', model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "not a safe name"),
    ("{name: 'a;rm', model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "not a safe name"),
    ("{name: router, model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "reserved"),
    ("{name: Frontend, model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "reserved"),
    ("{name: logs, model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "reserved"),
    ("{name: supervisord, model: m, engine: vllm, engine_args: ['--port=9001']}", "instances[0].name", "reserved"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], engine_env: ['NOEQUALS']}", "instances[0].engine_env[0]", "must be a 'KEY=VALUE' string"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], engine_env: ['1BAD=x']}", "instances[0].engine_env[0]", "not a valid environment variable name"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], kvcached_env: ['OK=1', 'A B=2']}", "instances[0].kvcached_env[1]", "not a valid environment variable name"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], engine_env: 'X=1'}", "instances[0].engine_env", "list of 'KEY=VALUE'"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], using_venv: true}", "instances[0].venv_path", "venv_path is missing"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], launch: 'no'}", "instances[0].launch", "true or false"),
])
def test_instance_errors_name_the_field(instance: str, field: str, fragment: str) -> None:
    one_problem(cfg_text(instance), field, fragment)


def test_error_messages_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(cfg_text("{model: m, engine: tgi, engine_args: ['--port=9001']}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: instances[0].engine: unknown engine 'tgi'; use one of: vllm, sglang")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(cfg_text("{model: m, engine: tgi}", "{engine: vllm, engine_args: ['--port=1']}"))
    assert {p.split(":")[0] for p in found} >= {"instances[0].engine", "instances[0].engine_args", "instances[1].model"}


def test_duplicate_instance_names() -> None:
    one_problem(cfg_text(VLLM, "{name: m1, model: other, engine: vllm, engine_args: ['--port=9003']}"),
                "instances[1].name", "duplicate instance name 'm1' (also instances[0])")


@pytest.mark.parametrize("second", [
    "{model: m2, engine: sglang, engine_args: ['--port=9001']}",
    "{model: m2, engine: sglang, engine_args: ['--host', 'localhost', '--port', '9001']}",
    "{model: m2, engine: sglang, engine_args: ['--host=0.0.0.0', '--port=9001']}",
])
def test_two_instances_on_one_host_port(second: str) -> None:
    one_problem(cfg_text(VLLM, second), "instances[1].engine_args", "is already used by instance 'm1'")


def test_same_port_on_different_hosts_is_fine() -> None:
    cfg = parse_config(cfg_text(VLLM, "{model: m2, engine: vllm, launch: false, engine_args: ['--host=10.1.1.1', '--port=9001']}"))
    assert [i.url for i in cfg.instances] == ["http://127.0.0.1:9001", "http://10.1.1.1:9001"]


def test_wildcard_bind_does_not_clash_with_an_external_engine_in_either_order() -> None:
    external = "{model: a, engine: vllm, launch: false, engine_args: ['--host 10.0.0.5 --port 9001']}"
    local = "{model: b, engine: vllm, engine_args: ['--host 0.0.0.0 --port 9001']}"
    for first, second in ((external, local), (local, external)):
        assert [i.port for i in parse_config(cfg_text(first, second)).instances] == [9001, 9001]
    # two engines launched here still clash through the wildcard
    one_problem(cfg_text(local, "{model: c, engine: vllm, engine_args: ['--host 10.0.0.5 --port 9001']}"),
                "instances[1].engine_args", "is already used by instance 'b'")


def test_engine_on_the_router_port() -> None:
    one_problem(cfg_text("{model: m, engine: vllm, engine_args: ['--port=8080']}"), "instances[0].engine_args", "router's port")
    # a wildcard bind of either takes the port on every address of this machine
    on_lan = "{model: m, engine: vllm, engine_args: ['--host 10.0.0.5 --port=8080']}"
    one_problem(cfg_text(on_lan, top="router: {router_host: 0.0.0.0, api_keys: [k]}"), "instances[0].engine_args", "router's port")
    one_problem(cfg_text("{model: m, engine: vllm, engine_args: ['--host 0.0.0.0 --port=8080']}", top="router: {router_host: 10.0.0.5, api_keys: [k]}"),
                "instances[0].engine_args", "router's port")
    external = "{model: m, engine: vllm, launch: false, engine_args: ['--host 10.0.0.5 --port=8080']}"
    assert parse_config(cfg_text(external, top="router: {router_host: 0.0.0.0, api_keys: [k]}")).instances[0].port == 8080


def test_missing_venv_is_an_error_and_only_a_warning_under_sim(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(cfg_text("{model: m, engine: vllm, using_venv: true, venv_path: venvs/nope, engine_args: ['--port=9001']}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith("instances[0].venv_path: virtualenv ") and str(tmp_path / "venvs" / "nope") in problem
    cfg = load_config(path, sim=True)
    assert len(cfg.warnings) == 1 and "instances[0].venv_path" in cfg.warnings[0]
    assert cfg.instances[0].venv_path == str(tmp_path / "venvs" / "nope")


def test_bad_settings_name_their_key() -> None:
    text = cfg_text(VLLM, top="""
        router: {router_port: 0, enable_router: maybe}
        sleep_manager: {idle_threshold_seconds: -1}
        launch_delay_seconds: soon
    """)
    found = problems(text)
    for field in ("router.router_port", "router.enable_router", "sleep_manager.idle_threshold_seconds", "launch_delay_seconds"):
        assert any(p.startswith(field + ": must be") for p in found), field


@pytest.mark.parametrize("text, fragment", [
    ("instances: []", "instances: must be a non-empty list"),
    ("- a\n- b", "must be a YAML mapping"),
    ("instances: [oops", "not valid YAML"),
    ("kvcached: [a]\n" + cfg_text(VLLM), "kvcached: must be a mapping"),
])
def test_file_level_errors(text: str, fragment: str) -> None:
    assert any(fragment in p for p in problems(text))


# -- warnings: the config loads, but may not work as meant -------------------

def test_unknown_keys_warn_with_a_did_you_mean() -> None:
    text = cfg_text("{model: m, engine: vllm, engine_args: ['--port=9001'], engine_arg: ['--x']}", top="launch_delay_second: 3")
    ws = warnings_of(text)
    assert any("launch_delay_second: unknown key, ignored; did you mean 'launch_delay_seconds'?" in w for w in ws)
    assert any("instances[0].engine_arg: unknown key, ignored; did you mean 'engine_args'?" in w for w in ws)
    assert all(w.startswith("conf.yaml: ") for w in ws)


def test_gpu_fractions_past_one_without_kvcached_warn() -> None:
    vllm = "{model: a, engine: vllm, engine_args: ['--port=9001', '--gpu-memory-utilization 0.6']}"
    sgl = "{model: b, engine: sglang, engine_args: ['--port=9002', '--mem-fraction-static=0.6']}"
    (w,) = warnings_of(cfg_text(vllm, sgl))
    assert "instances: GPU memory fractions on GPU default add up to 1.2 > 1.0 without kvcached" in w
    assert warnings_of(cfg_text(vllm, sgl, top="kvcached: {enable_kvcached: true}")) == []


def test_gpu_fractions_count_per_device() -> None:
    a = "{model: a, engine: vllm, engine_args: ['--port=9001', '--gpu-memory-utilization 0.6'], engine_env: ['CUDA_VISIBLE_DEVICES=0']}"
    b = "{model: b, engine: vllm, engine_args: ['--port=9002', '--gpu-memory-utilization 0.6'], engine_env: ['CUDA_VISIBLE_DEVICES=1']}"
    assert warnings_of(cfg_text(a, b)) == []


def test_cuda_visible_devices_in_two_forms_warns() -> None:
    a = "{model: a, engine: vllm, engine_args: ['--port=9001', '--gpu-memory-utilization 0.4'], engine_env: ['CUDA_VISIBLE_DEVICES=0']}"
    b = "{model: b, engine: vllm, engine_args: ['--port=9002', '--gpu-memory-utilization 0.4'], engine_env: ['CUDA_VISIBLE_DEVICES=GPU-5e1c7a2b']}"
    (w,) = warnings_of(cfg_text(a, b))
    assert w.startswith("conf.yaml: instances: CUDA_VISIBLE_DEVICES is given as indexes for some instances and as UUIDs")


def test_same_served_model_name_on_two_models_is_reported() -> None:
    a = "{model: a, engine: vllm, engine_args: ['--port=9001', '--served-model-name chat']}"
    b = "{model: b, engine: sglang, engine_args: ['--port=9002', '--served-model-name=chat']}"
    (w,) = warnings_of(cfg_text(a, b))
    assert w.startswith("conf.yaml: instances[1].engine_args: --served-model-name 'chat' is also a name of model 'a'")
    cfg = parse_config(cfg_text(a, b), "conf.yaml")
    assert cfg.routes["chat"] == "a" and cfg.routes["b"] == "b"


def test_model_name_wins_over_another_models_served_name() -> None:
    a = "{model: a, engine: vllm, engine_args: ['--port=9001', '--served-model-name b']}"
    b = "{model: b, engine: vllm, engine_args: ['--port=9002']}"
    cfg = parse_config(cfg_text(a, b), "conf.yaml")
    assert cfg.routes["b"] == "b"
    assert any("'b' is also a name of model 'b'" in w for w in cfg.warnings)


def test_alias_naming_another_model_is_an_error() -> None:
    a = "{model: a, engine: vllm, engine_args: ['--port=9001']}"
    b = "{model: b, engine: vllm, engine_args: ['--port=9002'], aliases: [a]}"
    one_problem(cfg_text(a, b), "instances[1].aliases", "model name 'a' would route to both 'a' and 'b'")
    # the earlier instance's alias naming this model: the problem is named at this model, not at its (absent) aliases
    a = "{model: a, engine: vllm, engine_args: ['--port=9001'], aliases: [b]}"
    b = "{model: b, engine: vllm, engine_args: ['--port=9002']}"
    one_problem(cfg_text(a, b), "instances[1].model", "model name 'b' would route to both 'a' and 'b'")


def test_auto_sleep_warns_about_what_each_engines_sleep_api_needs() -> None:
    auto = "sleep_manager: {auto_sleep_enabled: true}"
    bare_vllm = "{model: a, engine: vllm, engine_args: ['--port=9001']}"
    (w,) = warnings_of(cfg_text(bare_vllm, top=auto))
    assert w.startswith("conf.yaml: instances[0]: auto sleep is on but this vllm engine lacks what its sleep API needs: "
                        "VLLM_SERVER_DEV_MODE=1, --enable-sleep-mode (GPU builds only;")
    # a CPU build of vLLM refuses --enable-sleep-mode: the warning must not claim the API is then missing
    cpu_vllm = "{model: a, engine: vllm, engine_args: ['--port=9001'], engine_env: ['VLLM_SERVER_DEV_MODE=1']}"
    (w,) = warnings_of(cfg_text(cpu_vllm, top=auto))
    assert "--enable-sleep-mode (GPU builds only; CPU builds refuse it and need just VLLM_SERVER_DEV_MODE=1)" in w
    assert "will not exist" not in w
    gpu_vllm = "{model: a, engine: vllm, engine_args: ['--port=9001 --enable-sleep-mode'], engine_env: ['VLLM_SERVER_DEV_MODE=1']}"
    assert warnings_of(cfg_text(gpu_vllm, top=auto)) == []
    (w,) = warnings_of(cfg_text(SGL, top=auto))
    assert w.endswith("this sglang engine lacks what its sleep API needs: --enable-memory-saver; add them or set 'sleep: false'")
    # no warning when the engine never sleeps automatically
    assert warnings_of(cfg_text(bare_vllm)) == []
    assert warnings_of(cfg_text("{model: a, engine: vllm, engine_args: ['--port=9001'], sleep: false}", top=auto)) == []


def test_repr_hides_engine_keys_and_secret_env_but_keeps_the_rest() -> None:
    inst = ("{model: m, engine: vllm, engine_args: ['--port=9001 --api-key sk-one', '--api-key=sk-two --dtype half'],"
            " engine_env: ['HF_TOKEN=hf-three', 'VLLM_USE_V1=1'], sim_args: ['--api-key sk-four']}")
    cfg = parse_config(cfg_text(inst, top="router: {api_keys: [sk-five]}"), "conf.yaml")
    for text in (repr(cfg), str(cfg), repr(cfg.instances[0])):
        assert not any(secret in text for secret in ("sk-one", "sk-two", "hf-three", "sk-four", "sk-five")), text
        assert "'--port=9001', '--api-key', '***', '--api-key=***', '--dtype', 'half'" in text
        assert "('HF_TOKEN', '***'), ('VLLM_USE_V1', '1')" in text and "model='m'" in text
    (a,) = cfg.instances  # only the repr is masked: the engine still gets its key
    assert a.engine_args[2] == "sk-one" and a.auth_headers == {"Authorization": "Bearer sk-two"}


def test_the_router_sends_an_engines_key_given_by_flag_or_by_its_env_var() -> None:
    def headers(inst: str) -> dict[str, str]:
        return parse_config(cfg_text(inst)).instances[0].auth_headers
    assert headers("{model: m, engine: vllm, engine_args: ['--port=9001'], engine_env: ['VLLM_API_KEY=k-env']}") == \
        {"Authorization": "Bearer k-env"}
    # vLLM: the flag wins over the env var
    assert headers("{model: m, engine: vllm, engine_args: ['--port=9001 --api-key k-flag'], engine_env: ['VLLM_API_KEY=k-env']}") == \
        {"Authorization": "Bearer k-flag"}
    # SGLang reads no such variable
    assert headers("{model: m, engine: sglang, engine_args: ['--port=9001'], engine_env: ['VLLM_API_KEY=k-env']}") == {}
    assert headers(VLLM) == {}


# -- engine: openai (any OpenAI-compatible server, started by its own command) ----

def test_openai_command_as_one_string_or_a_list_with_the_port_from_its_flag() -> None:
    string = "{model: m, engine: openai, command: \"llama-server -m 'my model.gguf' --port 9001\"}"
    listed = "{model: m, engine: OpenAI, command: [llama-server, \"-m 'my model.gguf'\", '--port=9001']}"
    for inst in (string, listed):
        (a,) = parse_config(cfg_text(inst)).instances
        assert (a.engine, a.program, a.host, a.port, a.health_path) == ("openai", "llama-server", "127.0.0.1", 9001, "/health")
        assert a.engine_args[:2] == ("-m", "my model.gguf")
        assert a.served_names == ("m",) and a.url == "http://127.0.0.1:9001"


def test_openai_address_and_health_path_from_keys() -> None:
    inst = "{model: m, engine: openai, command: my-server, host: 0.0.0.0, port: 9001, health_path: /v1/models}"
    (a,) = parse_config(cfg_text(inst)).instances
    assert (a.program, a.engine_args, a.host, a.port, a.health_path) == ("my-server", (), "0.0.0.0", 9001, "/v1/models")
    # the flags and the keys may both say it, if they agree
    (a,) = parse_config(cfg_text("{model: m, engine: openai, command: 'srv --host ::1 --port 9001', host: '::1', port: 9001}")).instances
    assert (a.host, a.port) == ("::1", 9001)


def test_openai_started_elsewhere_needs_no_command() -> None:
    (a,) = parse_config(cfg_text("{model: m, engine: openai, launch: false, port: 9001}")).instances
    assert (a.program, a.port, a.launch) == (None, 9001, False)


def test_openai_engine_key_from_its_command() -> None:
    (a,) = parse_config(cfg_text("{model: m, engine: openai, command: 'srv --port 9001 --api-key sk-1'}")).instances
    assert a.auth_headers == {"Authorization": "Bearer sk-1"} and "sk-1" not in repr(a)


@pytest.mark.parametrize("instance, field, fragment", [
    ("{model: m, engine: openai, command: srv}", "instances[0].port", "no port: the router needs it"),
    ("{model: m, engine: openai, command: 'srv --port 0'}", "instances[0].command", "not a port number"),
    ("{model: m, engine: openai, command: srv, port: 70000}", "instances[0].port", "not a port number"),
    ("{model: m, engine: openai, command: srv, port: '9001'}", "instances[0].port", "not a port number"),
    ("{model: m, engine: openai, command: 'srv --port 9001', port: 9002}", "instances[0].port", "the command says --port 9001"),
    ("{model: m, engine: openai, command: 'srv --host a', host: b, port: 1}", "instances[0].host", "the command says --host a"),
    ("{model: m, engine: openai, command: srv, host: '', port: 1}", "instances[0].host", "not a host name"),
    ("{model: m, engine: openai, port: 9001}", "instances[0].command", "give the program and its arguments"),
    ("{model: m, engine: openai, command: [], port: 9001}", "instances[0].command", "give the program and its arguments"),
    ("{model: m, engine: openai, command: \"srv 'x\", port: 9001}", "instances[0].command", "check the quotes"),
    ("{model: m, engine: openai, command: {a: 1}, port: 9001}", "instances[0].command", "must be a list of strings"),
    ("{model: m, engine: openai, engine_args: ['--port 9001']}", "instances[0].engine_args", "put the program and all its arguments in 'command'"),
    ("{model: m, engine: openai, command: srv, port: 9001, health_path: health}", "instances[0].health_path", "start it with '/'"),
    ("{model: m, engine: openai, command: srv, port: 9001, health_path: '/a b'}", "instances[0].health_path", "not a URL path"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], command: srv}", "instances[0].command", "only for engines started by their own 'command'"),
    ("{model: m, engine: vllm, engine_args: ['--port=9001'], port: 9001}", "instances[0].port", "vllm is given its address as '--host'/'--port' in engine_args"),
    ("{model: m, engine: sglang, engine_args: ['--port=9001'], host: x}", "instances[0].host", "remove 'host'"),
    ("{model: m, engine: sglang, engine_args: ['--port=9001'], health_path: /x}", "instances[0].health_path", "answers health checks at /health"),
])
def test_openai_errors_name_the_field(instance: str, field: str, fragment: str) -> None:
    one_problem(cfg_text(instance), field, fragment)


def test_port_clashes_name_where_the_port_came_from() -> None:
    by_key = "{model: a, engine: openai, command: srv, port: 9001}"
    by_flag = "{model: b, engine: openai, command: 'srv --port 9001'}"
    one_problem(cfg_text(VLLM, by_key), "instances[1].port", "already used by instance 'm1'; give each instance its own port:")
    one_problem(cfg_text(by_key, by_flag), "instances[1].command", "give each instance its own --port")
    one_problem(cfg_text("{model: a, engine: openai, command: srv, port: 8080}"), "instances[0].port", "port: 8080 is the router's port")


def test_auto_sleep_warns_that_an_engine_without_a_sleep_api_never_sleeps() -> None:
    auto = "sleep_manager: {auto_sleep_enabled: true}"
    inst = "{model: m, engine: openai, command: 'srv --port 9001'}"
    (w,) = warnings_of(cfg_text(inst, top=auto))
    assert w == ("conf.yaml: instances[0]: auto sleep is on but engine 'openai' has no sleep API, so model 'm' "
                 "is never put to sleep; set 'sleep: false' to say so")
    assert warnings_of(cfg_text(inst)) == []
    assert warnings_of(cfg_text("{model: m, engine: openai, command: 'srv --port 9001', sleep: false}", top=auto)) == []


def test_openai_engines_take_no_part_in_the_gpu_fraction_check() -> None:
    vllm = "{model: a, engine: vllm, engine_args: ['--port=9001 --gpu-memory-utilization 0.6']}"
    other = "{model: b, engine: openai, command: 'srv --port 9002 --gpu-memory-utilization 0.6'}"
    assert warnings_of(cfg_text(vllm, other)) == []


# -- every problem in one run: checks across instances run beside per-instance errors (issue 27) ----

def test_a_per_instance_error_and_a_port_clash_are_reported_together() -> None:
    clash = "{model: m3, engine: vllm, engine_args: ['--port=9001'], max_concurrency: 0}"
    found = problems(cfg_text(VLLM, clash, "{model: m4, engine: tgi, engine_args: ['--port=9004']}"))
    assert [p.split(":")[0] for p in found] == ["instances[1].max_concurrency", "instances[2].engine",
                                                "instances[1].engine_args"]
    assert "is already used by instance 'm1'" in found[2]


def test_checks_across_instances_name_each_by_its_place_in_the_file_when_one_before_it_is_unreadable() -> None:
    found = problems(cfg_text("{model: m0, engine: tgi}", VLLM, "{name: m1, model: m9, engine: vllm, engine_args: ['--port=9001']}"))
    assert [p.split(":")[0] for p in found] == ["instances[0].engine", "instances[0].engine_args", "instances[2].name",
                                                "instances[2].engine_args"]
    assert "duplicate instance name 'm1' (also instances[1])" in found[2]


def test_checks_that_need_every_instance_wait_until_each_can_be_read() -> None:
    """A default model or group member named by an unreadable instance is not reported as unknown."""
    unreadable = "{name: b, model: mb, engine: vllm}"
    top = "router: {default_model: mb}\nresidency: {groups: [{name: g, members: [m1, b]}]}"
    assert [p.split(":")[0] for p in problems(cfg_text(VLLM, unreadable, top=top))] == ["instances[1].engine_args"]
    found = problems(cfg_text(VLLM, top="router: {default_model: mb}\nresidency: {groups: [{name: g, members: [m1, b]}]}"))
    assert [p.split(":")[0] for p in found] == ["residency.groups[0].members", "router.default_model"]


def test_render_check_prints_both_kinds_of_problem_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from router.render.cli import main
    path = tmp_path / "c.yaml"
    path.write_text(cfg_text(VLLM, "{model: m2, engine: vllm, engine_args: ['--port=9001'], launch: maybe}",
                             top="kvcached: {enable_kvcached: true}"))
    assert main(["--check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {path}: instances[1].launch: must be true or false, not 'maybe'",
                   f"error: {path}: instances[1].engine_args: 127.0.0.1:9001 is already used by instance 'm1'; give each "
                   "instance its own --port",
                   "Nothing was written."]
