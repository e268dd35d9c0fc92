"""Build a tiny, randomly initialised Llama model directory for real-engine tests.

Run with a Python that has ``torch``, ``transformers`` and ``tokenizers``
(the prepared vLLM venv has all three)::

    VENV/bin/python tests/real_vllm/make_tiny_model.py OUT_DIR

The model is a random ``LlamaForCausalLM`` (hidden 256, 2 layers, 4 heads,
vocab 1024). Its tokenizer is a byte-level BPE trained here, on a generated
corpus, with the ``tokenizers`` library: no download of any kind. Its
vocabulary is restricted to tokens that decode to ASCII, so whatever the random
weights generate decodes to valid text. The output is gibberish, which is all a
router test needs. The result is deterministic for a given library version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

VOCAB_SIZE = 1024
HIDDEN = 256
LAYERS = 2
HEADS = 4
INTERMEDIATE = 512
MAX_POSITIONS = 2048

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WORDS = (
    "the a an router engine model request token stream chat completion sleep wake "
    "health metrics server client vllm tiny random answer question hello world "
    "system user assistant prompt reply supervisor process port host json error "
    "status ready queue batch cache memory layer head vocab python test run stop "
    "start data time fast slow one two three four five six seven eight nine ten"
).split()


def _corpus(seed: int = 0, lines: int = 6000) -> list[str]:
    """Generated ASCII text: words, numbers, punctuation and random letters."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    punct = ".,;:!?-()'\"/"
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.6:
                w = rng.choice(WORDS)
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif r < 0.8:
                parts.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 7))))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 99999)))
            else:
                parts.append(rng.choice(punct))
        out.append(" ".join(parts))
    # Make sure every printable ASCII character occurs.
    out.append("".join(chr(c) for c in range(32, 127)))
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # The byte-level alphabet restricted to the bytes of ASCII (tab, newline, printable).
    full = pre_tokenizers.ByteLevel.alphabet()  # 256 chars, one per byte
    ascii_bytes = [9, 10, 13] + list(range(32, 127))
    # ByteLevel maps byte b to a unicode char; reproduce its table to pick ASCII ones.
    table = _bytes_to_unicode()
    alphabet = [table[b] for b in ascii_bytes]
    assert set(alphabet) <= set(full)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = tok.get_vocab()
    inverse = {v: k for k, v in table.items()}
    for token in vocab:
        if token in SPECIAL_TOKENS:
            continue
        raw = bytes(inverse[ch] for ch in token)
        if any(b > 126 or (b < 32 and b not in (9, 10, 13)) for b in raw):
            raise SystemExit(f"make_tiny_model: non-ASCII token in vocabulary: {token!r}")
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(
            f"make_tiny_model: tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}"
        )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode table, the one ByteLevel uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(out_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = build_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-model-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the engine may run as another user
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        fast.save_pretrained(tmp)
        # Check the result loads back and round-trips text before publishing it.
        check = PreTrainedTokenizerFast.from_pretrained(tmp)
        text = "Hello router, this is a tiny test."
        if check.decode(check(text)["input_ids"]) != text:
            raise SystemExit("make_tiny_model: tokenizer does not round-trip ASCII text")
        prompt = check.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        if not prompt.endswith("<|assistant|>\n"):
            raise SystemExit(f"make_tiny_model: unexpected chat prompt {prompt!r}")
        with open(os.path.join(tmp, "tiny_model_info.json"), "w") as f:
            json.dump(
                {"vocab_size": VOCAB_SIZE, "hidden_size": HIDDEN, "layers": LAYERS,
                 "heads": HEADS, "random_seed": 0},
                f, indent=1,
            )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="directory to create (replaced if it exists)")
    args = p.parse_args(argv)
    build(args.out_dir)
    print(f"tiny model written to {os.path.abspath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
