"""A model's files from the Hugging Face Hub: the small files first, the weights once those are checked.

    folder = download("Qwen/Qwen2.5-0.5B-Instruct", None, weights_to_fetch)

`weights_to_fetch(folder)` sees the snapshot with config.json, the shard index and the tokenizer files
(fast and slow), checks them and names the weights files to fetch: a repo the model cannot be read
from (an unsupported family, a GPTQ/AWQ checkpoint, a tokenizer minigrpo cannot read) is refused
without downloading gigabytes. Files are cached by huggingface_hub (HF_HUB_OFFLINE reads the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from minigrpo.errors import UserError

# A slow tokenizer's files (a few MB at most; minigrpo reads tokenizer.json): fetched so that a repo
# shipping only these is refused as a local folder holding only these is, naming them.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
# Files fetched from the hub before the weights: config, shard index, tokenizer (no .bin, no .pth).
HUB_PATTERNS = [
    *("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"),
    *("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "additional_chat_templates/*"),
    *SLOW_TOKENIZER_FILES,
    "adapter_config.json",  # only to say that a repo is a LoRA adapter, not a model
]


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model that is not there: a missing path, a folder that is no model, a repo that cannot be fetched."""


def download(repo_id: str, revision: str | None, weights_to_fetch: Callable[[Path], list[str]]) -> Path:
    """The local snapshot folder of hub repo `repo_id` with its weights. `weights_to_fetch` checks the
    small files first (its UserErrors pass through) and returns the weights patterns to fetch next.
    A network, auth or missing-repo failure is one ModelNotFoundError line naming the repo."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        weights = weights_to_fetch(folder)
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*HUB_PATTERNS, *weights]))
    except UserError:
        raise  # a config, shard index or tokenizer the model cannot be read from: named by the check
    except Exception as e:  # network, auth, missing repo: say which repo and why, on one line
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        if type(e).__name__ == "LocalEntryNotFoundError":  # its text is a paragraph of advice about the network
            reason = "it is not in the local cache, and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1)"
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub: {reason}"
        ) from e
    if not (folder / "model.safetensors.index.json").is_file() and not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{repo_id!r} on the Hugging Face Hub has no safetensors weights (pickled weights such as "
            "pytorch_model.bin are never loaded): pick a repo or revision that ships *.safetensors"
        )
    return folder


__all__ = ["HUB_PATTERNS", "SLOW_TOKENIZER_FILES", "ModelNotFoundError", "download"]
