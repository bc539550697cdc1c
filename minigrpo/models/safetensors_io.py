"""Read safetensors files one tensor at a time with plain reads, and write them through `safetensors`.

Why not `safetensors.safe_open`: it maps the whole file, and every page touched while copying out
counts as resident memory next to the model we are filling, so peak memory approaches twice the
checkpoint. Reading each tensor's bytes straight into its own buffer keeps the peak at about the
model plus one tensor. The format is simple: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be parsed or is shorter than its header says."""


def read_header(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file, validated against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype = DTYPES[info["dtype"]]
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r}") from e
        if not 0 <= start <= end <= data_size or end - start != numel * dtype.itemsize:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong byte count "
                f"(offsets {start}..{end}, data {data_size} bytes): the file is truncated or corrupt"
            )
        info["data_offsets"] = (start + 8 + n, end + 8 + n)  # absolute file offsets
    return header


def iter_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for each tensor (or those in `names`), in file order, one at a time."""
    path = Path(path)
    header = read_header(path)
    wanted = set(header) if names is None else set(names)
    entries = sorted((info["data_offsets"][0], name) for name, info in header.items() if name in wanted)
    with open(path, "rb", buffering=0) as f:
        for start, name in entries:
            info = header[name]
            out = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
            if buf is not None:
                f.seek(start)
                got = f.readinto(memoryview(buf))
                if got != buf.nbytes:
                    raise CorruptCheckpointError(f"{path}: tensor {name!r} is truncated")
            yield name, out


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (contiguous CPU copies are made one at a time by the library)."""
    from safetensors.torch import save_file as _save

    _save({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
