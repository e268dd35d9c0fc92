"""SGLang's server (``sglang.launch_server``); paths from its http_server.py (current main).

Its sleep API, as verified (sources: SGLang ``python/sglang/srt/entrypoints/
http_server.py``, ``managers/io_struct.py`` and the scheduler's
``release_memory_occupation``):

- ``POST /release_memory_occupation`` and ``POST /resume_memory_occupation``:
  JSON body ``{"tags": [...]}`` with ``tags`` optional (absent/null = weights
  and KV cache); the router sends ``{}``, which every version accepts. Needs
  ``--enable-memory-saver``. Recent SGLang asserts the server is idle before
  releasing (hence the router drains first) and answers 400 with
  ``{"success": false, "message"}`` on failure.
- SGLang has NO call that says whether memory is released (no
  ``/is_sleeping``; ``/get_server_info`` does not report it), and resuming a
  server that was not released fails inside its scheduler. So for SGLang the
  router's own memory is the state: a router restarted while an SGLang engine
  was released believes it awake (README "Sleep and wake").
"""
from router.engines.spec import Call, EngineSpec, PythonModule

SPEC = EngineSpec(
    name="sglang",
    rank=1,
    spellings=("sgl",),
    launcher=PythonModule("sglang.launch_server", model_flag="--model-path"),
    client_paths=(
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/classify",
        "/v1/tokenize",
        "/tokenize",
        "/v1/detokenize",
        "/detokenize",
        "/v1/score",
        "/v1/rerank",
        "/invocations",
    ),
    health_path="/health",
    image="lmsysorg/sglang:latest",
    sim_dialect="sglang",
    default_port=30000,
    served_name_flag="--served-model-name",
    one_served_name=True,
    gpu_fraction_flag="--mem-fraction-static",
    gpu_fraction_default=None,  # SGLang sizes it from the GPU itself
    sleep_call=Call("POST", "/release_memory_occupation", json={}),
    wake_call=Call("POST", "/resume_memory_occupation", json={}),
    sleep_needs_args={"--enable-memory-saver": ""},
)
