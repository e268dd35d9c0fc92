"""vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``), as of vLLM 0.32.

Its sleep API, as verified (sources: vLLM ``vllm/entrypoints/serve/dev/sleep/
api_router.py`` and ``vllm/v1/engine/__init__.py``; vLLM docs
``features/sleep_mode``; tests/real_vllm/FINDINGS.md), and what the router's
sleep and wake (router/server/fleet/sleepwake.py) make of it:

- ``POST /sleep``: query parameters ``level`` and, in recent versions (0.32
  included), ``mode``: ``abort`` (the default) ends running requests at once,
  ``wait`` answers only once they have finished, ``keep`` freezes them until
  the wake. Older versions read only ``level`` and ignore ``mode``. The router
  sends ``sleep_manager.vllm_sleep_mode`` (kvcached's key; default ``wait``,
  after draining, as a second guard) and waits ``vllm_sleep_timeout_seconds``
  for the answer. 0.32 answers 200 ``{"status":"sleeping","level":N}`` and 400
  for an unknown level or mode; the router only looks at the status code.
- ``POST /wake_up``: optional repeated query parameter ``tags`` (``weights``,
  ``kv_cache``); none wakes everything. 200 (0.32:
  ``{"status":"awake","tags":null}``), also when the engine was awake.
- ``GET /is_sleeping``: ``{"is_sleeping": true|false}``; the router asks it at
  start-up and on every idle-loop check (reconcile), so a restarted router does
  not believe a sleeping engine is awake.

All three exist only with ``VLLM_SERVER_DEV_MODE=1`` (and
``--enable-sleep-mode`` on GPU). While asleep, vLLM 0.32 still answers
``/health`` 200 and holds (neither answers nor refuses) generation requests
until ``/wake_up``, so the router must know the state and wake the engine itself.
"""
from router.engines.spec import Call, EngineSpec, LoraApi, PythonModule, Tier

SPEC = EngineSpec(
    name="vllm",
    rank=0,
    spellings=(),
    launcher=PythonModule("vllm.entrypoints.openai.api_server", model_flag="--model"),
    client_paths=(
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/tokenize",
        "/detokenize",
        "/v1/chat/completions/batch",
        "/invocations",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    ),
    health_path="/health",
    image="vllm/vllm-openai:latest",
    sim_dialect="vllm",
    default_port=8000,
    served_name_flag="--served-model-name",
    priority_policy=("--scheduling-policy", "priority"),
    gpu_fraction_flag="--gpu-memory-utilization",
    gpu_fraction_default=0.9,
    # Level 1 offloads the weights to CPU RAM and /wake_up restores them. Level 2
    # discards them: /wake_up?tags=weights maps empty memory, reload_weights reads
    # them again from disk, the KV cache comes back, and the prefix cache is reset
    # (vLLM docs features/sleep_mode; a cache kept from before would serve stale KV).
    # mode (sleep_manager.vllm_sleep_mode, default wait): recent vLLM finishes
    # running requests instead of aborting them (its own default is abort);
    # older vLLM ignores the parameter. See the module's docstring.
    tiers={
        1: Tier(sleep=Call("POST", "/sleep", {"level": "1"}), wake=(Call("POST", "/wake_up"),)),
        # /sleep?level=2 while asleep at level 1 drops the offloaded weights (the simulator models it;
        # not verified on a GPU build, see docs/sleep-and-residency.md).
        2: Tier(sleep=Call("POST", "/sleep", {"level": "2"}), deepens=True, wake=(
            Call("POST", "/wake_up", {"tags": "weights"}),
            Call("POST", "/collective_rpc", json={"method": "reload_weights"}),
            Call("POST", "/wake_up", {"tags": "kv_cache"}),
            Call("POST", "/reset_prefix_cache"),
        )),
    },
    sleep_mode_param="mode",
    is_sleeping_path="/is_sleeping",
    sleep_needs_env={"VLLM_SERVER_DEV_MODE": "1"},
    # CPU builds refuse --enable-sleep-mode yet serve the sleep API in dev mode.
    sleep_needs_args={"--enable-sleep-mode": "GPU builds only; CPU builds refuse it and need just VLLM_SERVER_DEV_MODE=1"},
    api_key_env="VLLM_API_KEY",  # vLLM 0.32: --api-key wins over it
    # Run-time adapters (vLLM docs features/lora): the endpoints exist only with
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; --max-loras (default 1) bounds the adapters
    # in one batch, and the router holds no more than that on one engine.
    lora=LoraApi(load_path="/v1/load_lora_adapter", unload_path="/v1/unload_lora_adapter", enable_flag="--enable-lora",
                 max_flag="--max-loras", max_default=1, static_flag="--lora-modules", already_loaded="has already been loaded",
                 needs_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}),
)
