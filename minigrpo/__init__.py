"""minigrpo: GRPO for reasoning LLMs in plain PyTorch.

    from minigrpo import load_pretrained, save_pretrained
    model, tokenizer = load_pretrained("Qwen/Qwen2.5-0.5B-Instruct")   # or a local dir, or a .gguf file

Heavy modules load on first use, so `import minigrpo` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "minigrpo.models.loading",
    "save_pretrained": "minigrpo.models.loading",
    "Transformer": "minigrpo.models.transformer",
    "ModelArgs": "minigrpo.models.args",
    "Tokenizer": "minigrpo.tokenizer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minigrpo' has no attribute {name!r}")
