"""save_pretrained: a model and its tokenizer as a Hugging Face checkpoint folder (config.json,
generation_config.json, safetensors shards with their index, tokenizer files), each file written
under a temporary name and renamed into place, so a crash never leaves half a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from minigrpo.atomic import atomic_path, write_json

from .safetensors_io import save_file
from .transformer import Transformer


def save_pretrained(
    model: Transformer,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write an HF-format checkpoint (config, generation config, safetensors shards, tokenizer).

    Each file is written under a temporary name and renamed into place.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not (model.lm_head is None and k == "lm_head.weight")}
    dtype = dtype or model.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    write_json(out / "config.json", model.args.to_hf_config(torch_dtype=dtype_name))
    # every stop id (multi-EOS models) goes to generation_config.json, or they are lost on reload
    gen = {
        "bos_token_id": model.args.hf_config.get("bos_token_id"),
        "eos_token_id": model.args.hf_config.get("eos_token_id"),
    }
    if tokenizer is not None and hasattr(tokenizer, "generation_config"):
        gen.update({k: v for k, v in tokenizer.generation_config().items() if v is not None})
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for fname, shard in zip(names, shards):
        with atomic_path(out / fname) as tmp:
            save_file({k: v.detach().to("cpu", dtype) for k, v in shard.items()}, tmp, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        total = sum(t.numel() * dtype.itemsize for t in state.values())
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": weight_map},
        )
    if tokenizer is not None:
        tokenizer.save(out)
    return out
