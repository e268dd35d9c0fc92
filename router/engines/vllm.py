"""vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``), as of vLLM 0.32."""
from router.engines.spec import Call, EngineSpec, PythonModule

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
    gpu_fraction_flag="--gpu-memory-utilization",
    gpu_fraction_default=0.9,
    # level=1 offloads the weights to CPU RAM and /wake_up restores them; level 2
    # discards them and would need a weight reload the router does not do.
    # mode (sleep_manager.vllm_sleep_mode, default wait): recent vLLM finishes
    # running requests instead of aborting them (its own default is abort);
    # older vLLM ignores the parameter. See lifecycle.py.
    sleep_call=Call("POST", "/sleep", {"level": "1"}),
    sleep_mode_param="mode",
    wake_call=Call("POST", "/wake_up"),
    is_sleeping_path="/is_sleeping",
    sleep_needs_env={"VLLM_SERVER_DEV_MODE": "1"},
    # CPU builds refuse --enable-sleep-mode yet serve the sleep API in dev mode.
    sleep_needs_args={"--enable-sleep-mode": "GPU builds only; CPU builds refuse it and need just VLLM_SERVER_DEV_MODE=1"},
    api_key_env="VLLM_API_KEY",  # vLLM 0.32: --api-key wins over it
)
