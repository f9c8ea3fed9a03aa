"""Passkey retrieval (a needle in a haystack): the prompts the sparse-quality tests and benchmarks share.

A five-digit key is stated three times at a chosen depth of a public-domain haystack (the shipped
Shakespeare), then asked for. SmolLM2-135M with its whole cache finds it at every depth, so a
miss measures what the cache policy lost.
"""

from __future__ import annotations

import random
from importlib import resources

QUESTION = "\n\nWhat is the pass key? The pass key is"


def haystack(chars: int) -> str:
    return (resources.files("runtime") / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]


def passkey_prompt(tokenizer, key: str, depth: float, haystack_tokens: int = 1800) -> list[int]:
    """Token ids: the instruction, the haystack with the needle at `depth` (0..1), the question."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler = tokenizer.encode(haystack(haystack_tokens * 8))[:haystack_tokens]
    cut = int(len(filler) * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. The pass key is {key}."
    text = tokenizer.decode(filler[:cut]) + "\n" + needle + "\n" + tokenizer.decode(filler[cut:])
    return tokenizer.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n" + text + QUESTION
    )


def passkeys(count: int, low: float = 0.05, high: float = 0.95, seed: int = 0) -> list[tuple[str, float]]:
    """`count` (key, depth) pairs: seeded random five-digit keys at depths spread evenly over [low, high]."""
    rng = random.Random(seed)
    step = (high - low) / max(count - 1, 1)
    return [(str(rng.randrange(10_000, 100_000)), low + i * step) for i in range(count)]
