"""Tiny random models for fast tests (saved as HF checkpoints when a test needs files) and the copy task."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from minigrpo.models.loading import build_random, save_pretrained
from minigrpo.models.presets import preset_config

TINY_LLAMA: dict[str, Any] = preset_config("tiny-llama")  # 2 layers, 64 wide


def tiny_config(**overrides: Any) -> dict[str, Any]:
    return {**TINY_LLAMA, **overrides}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    return build_random(tiny_config(**overrides), dtype=dtype, seed=seed).eval()


def tiny_checkpoint(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    save_pretrained(tiny_model(seed, **overrides), None, directory)
    return directory


WORDS = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", "+", "-", "*", "=", "?", ":", "repeat", "what", "is"]


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (digits split one by one), no chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from minigrpo.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_run_checkpoint(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny model with the word-level tokenizer, saved as an HF checkpoint folder."""
    model = tiny_model(seed, vocab_size=len(WORDS), **overrides)
    save_pretrained(model, tiny_tokenizer(), directory)
    return directory


def write_copy_task(path, n: int = 200, seed: int = 0) -> None:
    """'repeat 7' -> '7': a one-token answer the policy must learn to copy."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            d = rng.randrange(10)
            f.write(json.dumps({"question": f"repeat {d}", "answer": str(d)}) + "\n")
