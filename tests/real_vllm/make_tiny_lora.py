"""Write tiny LoRA adapters for the tiny test model (make_tiny_model.py), offline, with peft.

Run with a Python that has ``torch``, ``transformers`` and ``peft`` (the prepared vLLM venv
plus ``pip install peft``)::

    VENV/bin/python tests/real_vllm/make_tiny_lora.py MODEL_DIR OUT_DIR NAME [NAME ...]

Each adapter is a rank-8 LoRA on the attention's q/k/v/o projections with seeded random
weights (``init_lora_weights=False``, so it changes the model's output: the test can tell an
adapter's answer from the base model's). ``OUT_DIR/NAME`` then holds ``adapter_config.json``
and ``adapter_model.safetensors``, which is what vLLM's ``/v1/load_lora_adapter`` reads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

RANK = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(args.names):
        torch.manual_seed(1000 + i)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
        model = get_peft_model(base, config)
        final = os.path.join(args.out, name)
        tmp = tempfile.mkdtemp(dir=args.out, prefix=f".{name}-")
        model.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        print(final)


if __name__ == "__main__":
    main()
