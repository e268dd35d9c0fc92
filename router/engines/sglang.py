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
from router.engines.spec import MODEL_PATH, Call, EngineSpec, LoraApi, PythonModule, Tier

#: Tags absent: the weights and the KV cache; ``{}`` is what every version accepts.
RELEASE = Call("POST", "/release_memory_occupation", json={})
RESUME = Call("POST", "/resume_memory_occupation", json={})

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
    # The memory saver frees the weights on release rather than moving them
    # (sglang#6367, #19442): level 1 keeps a host copy with
    # --enable-weights-cpu-backup (PR #10873); level 2 keeps none, and its wake
    # reads the weights again from the model path and drops the radix cache,
    # whose KV was computed in the freed memory.
    tiers={
        1: Tier(sleep=RELEASE, wake=(RESUME,), needs_when=("--enable-memory-saver",), needs_args={
            "--enable-weights-cpu-backup": "without it a release frees the weights and the answers after the resume "
                                           "are garbage"}),
        2: Tier(sleep=RELEASE, wake=(
            RESUME,
            Call("POST", "/update_weights_from_disk", json={"model_path": MODEL_PATH}),
            Call("POST", "/flush_cache"),
        )),
    },
    sleep_needs_args={"--enable-memory-saver": ""},
    # Run-time adapters (SGLang docs advanced_features/lora): /load_lora_adapter and
    # /unload_lora_adapter with --enable-lora; --max-loaded-loras bounds the adapters held
    # (unbounded by default; --max-loras-per-batch, default 8, only bounds one batch).
    lora=LoraApi(load_path="/load_lora_adapter", unload_path="/unload_lora_adapter", enable_flag="--enable-lora",
                 max_flag="--max-loaded-loras", max_default=None, static_flag="--lora-paths", static_enables=True,
                 bound_enforced=True),
)
