"""Read and write safetensors files one tensor at a time, with plain file reads and writes.

The format is simple: an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} (plus an optional "__metadata__" of strings), then the raw
bytes of every tensor, back to back.

Why not `safetensors.safe_open` for reading: it maps the whole file, and every page touched while
copying out counts as resident memory next to the model we are filling, so peak memory approaches
twice the checkpoint. Reading each tensor's bytes straight into its own buffer keeps the peak at
about the model plus one tensor.

Why not `safetensors.torch.save_file` for writing: it wraps every I/O error in its own exception
type, so a full disk cannot be told from a bug, and it serialises all tensors before writing.
Writing the header and then each tensor's bytes with ordinary file writes keeps one tensor in memory
at a time and lets a full disk surface as `OSError(ENOSPC, ..., path)`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from minigrpo.errors import UserError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The low-precision formats of quantized checkpoints (FP8, MX scales, FP6, packed FP4): their headers are
# checked, their tensors never read (minigrpo builds its models from F32, F16 or BF16 weights).
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4")
_BITS = {  # bits per element of every safetensors dtype (F4 and F6 pack several elements in a byte)
    **{name: dtype.itemsize * 8 for name, dtype in DTYPES.items()},
    **{"F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "C64": 64},
}
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(UserError, ValueError):
    """A checkpoint (model folder, weights file, training checkpoint) that cannot be used as it is."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be parsed or is shorter (or longer) than its header says."""


def read_header(path: str | Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file, validated against its size.

    Every tensor must lie inside the file with exactly the byte count its dtype and shape need, and
    the data must end where the file ends: a truncated (or padded) file is a CorruptCheckpointError
    naming it. The returned offsets are absolute file offsets.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []  # (start, end, name) relative to the data
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            bits = _BITS.get(info["dtype"])
            numel = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r}") from e
        if not all(_is_size(n) for n in (*info["shape"], start, end)):  # a float or negative size: no tensor
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r}")
        if bits is None and isinstance(info["dtype"], str):  # a format newer than this table: no damage
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which minigrpo does not know")
        if bits is None:
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r}")
        if not 0 <= start <= end <= data_size or 8 * (end - start) != numel * bits:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} lies outside the file or has the wrong byte count "
                f"(offsets {start}..{end}, data {data_size} bytes): the file is truncated or corrupt"
            )
        spans.append((start, end, name))
        info["data_offsets"] = (start + 8 + n, end + 8 + n)  # absolute file offsets
    _check_tiled(path, sorted(spans))
    data_end = max((end for _, end, _ in spans), default=0)
    if data_end != data_size:
        raise CorruptCheckpointError(
            f"{path}: the header describes {data_end} bytes of data, the file holds {data_size}: corrupt"
        )
    return header


def unloadable_dtype(path: Path, name: str, dtype: str) -> CheckpointError:
    """The error for weight `name` of file `path` stored as `dtype`, which no model is built from: a
    quantized format, or an integer / bool / complex tensor where a weight should be."""
    if dtype in QUANTIZED_DTYPES:
        return CheckpointError(
            f"{path}: tensor {name!r} is {dtype}, a quantized format minigrpo does not load: load the model's "
            "16-bit original (F32, F16 or BF16 weights)"
        )
    return CheckpointError(
        f"{path}: tensor {name!r} is {dtype}, not floating point: minigrpo loads F32, F16 or BF16 weights "
        "(a quantized checkpoint? load its 16-bit original)"
    )


def _check_tiled(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """The tensors' byte ranges, in order, follow each other with no gap and no overlap (as the format and
    the safetensors library require): two tensors sharing bytes would load each other's values."""
    end, previous = 0, None
    for start, stop, name in spans:
        if start != end:
            what = f"overlaps {previous!r}" if start < end else f"starts {start - end} bytes after the previous one"
            raise CorruptCheckpointError(f"{path}: tensor {name!r} {what} (offsets {start}..{stop}): corrupt header")
        end, previous = stop, name


def _is_size(value) -> bool:
    """A shape entry or byte offset: a non-negative int (JSON true is no size)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def iter_tensors(path: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) for each tensor (or those in `names`), in file order, one at a time."""
    path = Path(path)
    header = read_header(path)
    wanted = set(header) if names is None else set(names)
    entries = sorted((info["data_offsets"][0], name) for name, info in header.items() if name in wanted)
    for _, name in entries:
        if header[name]["dtype"] not in DTYPES:  # F4, F6, F8_E8M0...: no torch dtype reads them here
            raise unloadable_dtype(path, name, header[name]["dtype"])
    with open(path, "rb", buffering=0) as f:
        for start, name in entries:
            info = header[name]
            out = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            if out.numel():
                f.seek(start)
                if _read_into(f, out.view(-1).view(torch.uint8).numpy()) != out.numel() * out.element_size():
                    raise CorruptCheckpointError(f"{path}: tensor {name!r} is truncated")
            yield name, out


def _read_into(f: BinaryIO, buf) -> int:
    """Fill `buf` from `f`; returns the bytes read (fewer only at the end of the file).

    One read may return less than asked without the file ending: Linux moves at most 2 GiB - 4 KiB
    per read call, less than one tensor of a large model (Llama-3.1-70B's bf16 embedding is 2.1 GB),
    so the read is repeated until the buffer is full or the file ends."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors: the header, then each tensor's bytes (one CPU copy at a time).

    Any dtype in DTYPES; a full disk raises OSError(ENOSPC) from the write, naming `path`.
    """
    path = Path(path)
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        end = offset + t.numel() * t.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t in tensors.values():
                if t.numel():
                    cpu = t.detach().to("cpu").contiguous()
                    f.write(cpu.view(-1).view(torch.uint8).numpy().data)  # little-endian, as the format wants
                    del cpu
    except OSError as e:
        if e.filename is None:  # name the file (a write's error does not)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
