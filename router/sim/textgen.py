"""The simulator's "model": deterministic text and token counts tests can predict.

Rules (stable; tests and benchmarks rely on them):

- A token is a word. The prompt of a completion is its text; the prompt of a
  chat request is its messages rendered one per line as ``role: content``
  (content parts of type ``text`` joined by spaces). A prompt given as a list
  of token ids is that many tokens and reads as the ids joined by spaces.
- Prompt tokens = the number of whitespace-separated words of the prompt,
  at least 1.
- Output token i (0-based) of choice j is ``" " + WORDS[(h + 7*j + i) % 64]``
  where ``h = zlib.crc32(prompt.encode("utf-8"))``. So the text depends only on
  the prompt, choices of one request differ, and every token is one word.
- An engine whose weights are lost (router.sim.memory) answers garbage instead:
  output token i of choice j is ``GARBAGE[(h + 7*j + i) % 8]``, replacement
  characters and punctuation runs no model would print, still one word each (counts hold).
- Token ids (/tokenize): a word of WORDS is its index there; any other word is
  ``64 + crc32(word) % (VOCAB_SIZE - 64)``. Detokenizing reads id i < 64 as
  ``" " + WORDS[i]`` (so generated text round-trips) and any other id as ``" <i>"``.
- The transcript of an audio file (/v1/audio/...) is ``generate(hex of crc32(bytes),
  n)``: n = one word per AUDIO_BYTES_PER_WORD bytes (1 to 64), one second of audio per
  AUDIO_BYTES_PER_SECOND bytes (at least 1).
- The embedding of a text is `dims` (default 16) numbers drawn by
  ``random.Random(h).uniform(-1, 1)`` (h as above), scaled to length 1.
"""
from __future__ import annotations

import math
import random
import zlib
from typing import Any

WORDS: tuple[str, ...] = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
    "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu", "amber", "bronze", "cobalt", "denim", "ember", "fern",
    "garnet", "hazel", "ivory", "jade", "khaki", "lemon", "maroon", "navy",
    "olive", "pearl", "quartz", "ruby", "sage", "teal", "umber", "violet",
    "wheat", "xanadu", "yellow", "zinc", "apple", "birch", "cedar", "dune",
    "elm", "flint", "grove", "heath", "iris", "juniper", "kelp", "lotus",
)
#: Each token, with its leading space, ready to send.
TOKENS: tuple[str, ...] = tuple(" " + w for w in WORDS)

#: What an engine with lost weights prints (see the module rules): visibly no words.
#: No letter or digit in them, so a stop string of words never matches garbage by chance.
GARBAGE: tuple[str, ...] = (" \ufffd\ufffd", " ##", " \u2581\u2581", " ]]", " ,,", " ..", " ~~", " \u00bf\u00bf")


def prompt_seed(prompt: str) -> int:
    return zlib.crc32(prompt.encode("utf-8", "surrogatepass"))


def token(seed: int, choice: int, i: int) -> str:
    return TOKENS[(seed + 7 * choice + i) % len(TOKENS)]


def garbage(seed: int, choice: int, i: int) -> str:
    return GARBAGE[(seed + 7 * choice + i) % len(GARBAGE)]


def generate(prompt: str, n_tokens: int, choice: int = 0) -> str:
    """The full text the simulator produces for `prompt` (without stop strings)."""
    seed = prompt_seed(prompt)
    return "".join(token(seed, choice, i) for i in range(n_tokens))


#: Length of an embedding when the request asks none.
EMBEDDING_DIMS = 16


def embedding(text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    draw = random.Random(prompt_seed(text))
    vector = [draw.uniform(-1.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


#: Token ids are below this.
VOCAB_SIZE = 32000
_WORD_IDS = {w: i for i, w in enumerate(WORDS)}
#: 16 kHz 16-bit mono.
AUDIO_BYTES_PER_SECOND = 32000
AUDIO_BYTES_PER_WORD = 1000


def token_ids(text: str) -> list[int]:
    """The ids of the words of `text` (see the module rules)."""
    return [_WORD_IDS.get(w, len(WORDS) + zlib.crc32(w.encode("utf-8", "surrogatepass")) % (VOCAB_SIZE - len(WORDS)))
            for w in text.split()]


def detokenize(ids: list[int]) -> str:
    return "".join(TOKENS[i] if 0 <= i < len(TOKENS) else f" <{i}>" for i in ids)


def transcript(audio: bytes) -> tuple[str, int]:
    """(text, seconds) for an audio file's bytes."""
    words = min(64, max(1, len(audio) // AUDIO_BYTES_PER_WORD))
    seconds = max(1, -(-len(audio) // AUDIO_BYTES_PER_SECOND))
    return generate(f"{zlib.crc32(audio):08x}", words).lstrip(), seconds


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def chat_prompt(messages: list[Any]) -> str:
    """Render chat messages as the prompt text; raises ValueError on a malformed message."""
    lines = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{k}] must be an object with a string 'role'")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{k}].content parts must be {{'type': 'text', 'text': str}}")
                parts.append(part["text"])
            content = " ".join(parts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{k}].content must be a string or a list of parts")
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines)
