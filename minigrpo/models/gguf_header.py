"""The GGUF container (llama.cpp's format), read without the `gguf` package: header, metadata, tensor table.

    header = read_gguf_header("model.gguf")   # GGUFError naming the file unless it is a GGUF file
    f = GGUFFile("model.gguf")                # metadata parsed, tensor data memory-mapped (not read)
    f.metadata["general.architecture"], f.tensors[0].name, f.tensors[0].data

Layout (little-endian unless the file was written big-endian; every count is a u64):
* header: the magic b"GGUF", a format version (u32), the number of tensors and of metadata entries;
* metadata: per entry a key (string), a value type (u32) and the value. Strings are a length and
  UTF-8 bytes; an array is an item type (u32), a count and the items (arrays of arrays and of
  strings included);
* tensor table: per tensor a name, n_dims (u32), the dims fastest-first (ggml order: reversed they
  are PyTorch's), a ggml type (u32) and the data's offset from the start of the data section;
* the data section, at the next multiple of `general.alignment` (32 when absent) after the table;
  each tensor's offset is a multiple of it too.

Nothing is read into memory but the metadata: tensor data stays memory-mapped until `dequantize`
turns one tensor's blocks into float32 (the block layouts: gguf_blocks.py).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from minigrpo.errors import UserError

from .gguf_blocks import BLOCK_DEQUANTIZERS


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be read or holds something this reader does not support."""


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # version 1 used 32-bit counts and lengths
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 16  # arrays of arrays nest this deep at most (a corrupt file could nest past Python's stack)
# Smallest encodings: a tensor info is a name length (u64), n_dims (u32), type (u32) and offset
# (u64); a metadata entry a key length (u64), a value type (u32) and a value of at least one byte.
_MIN_TENSOR_INFO_BYTES, _MIN_METADATA_BYTES, _HEADER_BYTES = 24, 13, 24

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
}  # fmt: skip
_PLAIN_DTYPES = {"F32": "f4", "F16": "f2", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8", "F64": "f8"}

# metadata value type -> struct code (8 string and 9 array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
FLOAT32, STRING, ARRAY = 6, 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    """The fixed part at the start of a GGUF file: what tells a GGUF file from anything else."""

    version: int
    tensor_count: int
    metadata_count: int
    byte_order: str  # "<" little-endian (the usual), ">" big-endian


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Read and check a GGUF file's first 24 bytes (magic, version, tensor and metadata counts),
    nothing else: a cheap test, before any weight is read, that `path` is a GGUF file at all and is
    not cut short before its tables. A GGUFError names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: not a readable GGUF file (not a regular file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a readable GGUF file (it starts with {head[:4]!r}, not {GGUF_MAGIC!r})")
    if len(head) < _HEADER_BYTES:
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt ({size} bytes, no whole header)")
    byte_order = "<"
    version = struct.unpack("<I", head[4:8])[0]
    if version not in GGUF_VERSIONS and struct.unpack(">I", head[4:8])[0] in GGUF_VERSIONS:
        byte_order, version = ">", struct.unpack(">I", head[4:8])[0]
    if version not in GGUF_VERSIONS:
        raise GGUFError(
            f"{path}: not a readable GGUF file (format version {version}; supported: "
            f"{', '.join(map(str, GGUF_VERSIONS))})"
        )
    tensor_count, metadata_count = struct.unpack(f"{byte_order}QQ", head[8:24])
    least = _HEADER_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES + metadata_count * _MIN_METADATA_BYTES
    if tensor_count == 0 or least > size:
        raise GGUFError(
            f"{path}: not a readable GGUF file, truncated or corrupt (the header lists {tensor_count} tensors "
            f"and {metadata_count} metadata entries, the file has {size} bytes)"
        )
    return GGUFHeader(version, tensor_count, metadata_count, byte_order)


class _Truncated(Exception):
    """A read past the end of the file (reported as a GGUFError naming the file and what was read)."""


class _Cursor:
    """Reads the encoded values of a GGUF file's tables in order from a memory map."""

    def __init__(self, buf: mmap.mmap, byte_order: str, pos: int) -> None:
        self.buf, self.order, self.pos = buf, byte_order, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, code: str) -> Any:
        fmt = self.order + code
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        """Raw bytes: decoded as UTF-8 when the value is asked for (GGUFFile.value)."""
        return self.take(self.scalar("Q"))

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """One metadata value: a Python scalar, bytes for a string, a list or numpy array for an array
        (`depth`: how many arrays this value is inside)."""
        if vtype == FLOAT32:  # kept as float32: its shortest decimal is the value the writer meant
            return np.float32(self.scalar("f"))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise GGUFError(f"metadata key {key!r} has an unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"metadata key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item_type, count = self.scalar("I"), self.scalar("Q")
        if item_type in _SCALARS:  # one numpy read instead of one struct call per item (150k scores)
            dtype = np.dtype(self.order + _SCALARS[item_type])
            if count * dtype.itemsize > len(self.buf) - self.pos:
                raise _Truncated
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
        if count > len(self.buf) - self.pos:  # every string or array item takes at least one byte
            raise _Truncated
        return [self.value(item_type, key, depth + 1) for _ in range(count)]


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; `data` maps its bytes (nothing is read until used)."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (ggml's dims reversed)
    type_name: str  # "Q4_K", "F32", ...
    start: int  # absolute byte offset in the file
    n_bytes: int
    file: GGUFFile

    @property
    def data(self) -> np.ndarray:
        """The stored data, read-only and memory-mapped: float/int types as their numpy dtype in the file's
        byte order, shaped `shape`; block types as uint8 (rows, bytes per row)."""
        raw = np.frombuffer(self.file.buffer, np.uint8, self.n_bytes, self.start)
        if self.type_name in _PLAIN_DTYPES:
            return raw.view(self.file.header.byte_order + _PLAIN_DTYPES[self.type_name]).reshape(self.shape)
        if self.type_name == "BF16":
            return raw.view("<u2").reshape(self.shape)  # stored unswapped, as block data
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return raw.reshape(rows, -1)


class GGUFFile:
    """A GGUF file opened read-only: header, metadata (raw values) and tensor table parsed; data mapped.

    Every problem of the container (a cut file, an unknown value or tensor type, a bad alignment,
    a row that is no whole number of blocks, a tensor past the end of the file) is a GGUFError naming
    the file, raised here before any weight is read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.header = read_gguf_header(self.path)
        with open(self.path, "rb") as f:
            self.buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cursor = _Cursor(self.buffer, self.header.byte_order, _HEADER_BYTES)
        try:
            self.metadata: dict[str, Any] = self._read_metadata(cursor)
            self.alignment = self._alignment()
            table = [self._read_tensor_info(cursor) for _ in range(self.header.tensor_count)]
        except _Truncated:
            raise GGUFError(
                f"{self.path}: not a readable GGUF file, truncated or corrupt (it ends inside its metadata or "
                f"tensor table, {len(self.buffer)} bytes)"
            ) from None
        data_start = -(-cursor.pos // self.alignment) * self.alignment
        self.tensors = [self._place(data_start, *entry) for entry in table]
        if len(self.by_name) != len(self.tensors):
            seen: set[str] = set()
            dup = next(t.name for t in self.tensors if t.name in seen or seen.add(t.name))
            raise self._fail(f"tensor {dup!r} appears twice in the tensor table")

    def _fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def _read_metadata(self, cursor: _Cursor) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for _ in range(self.header.metadata_count):
            key = self._text(cursor.string(), "a metadata key")
            if key in metadata:
                raise self._fail(f"metadata key {key!r} appears twice")
            try:
                metadata[key] = cursor.value(cursor.scalar("I"), key)
            except GGUFError as e:
                raise self._fail(str(e)) from None
        return metadata

    def _alignment(self) -> int:
        value = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
            raise self._fail(f"general.alignment = {value!r} is not a power of two")
        return value

    def _read_tensor_info(self, cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = self._text(cursor.string(), "a tensor name")
        n_dims = cursor.scalar("I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r} has {n_dims} dims (ggml allows 1 to {MAX_DIMS})")
        dims = [cursor.scalar("Q") for _ in range(n_dims)]
        return name, tuple(reversed(dims)), cursor.scalar("I"), cursor.scalar("Q")

    def _place(self, data_start: int, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        """The tensor's TensorInfo, its type, block structure, alignment and byte range checked."""
        if type_id not in GGML_TYPES:
            raise self._fail(f"tensor {name!r} has an unknown ggml type {type_id}")
        type_name, block, type_bytes = GGML_TYPES[type_id]
        if any(d <= 0 for d in shape):
            raise self._fail(f"tensor {name!r} has an empty or negative dimension {shape}")
        if shape[-1] % block:
            raise self._fail(
                f"tensor {name!r} ({type_name}) has rows of {shape[-1]} values, not a multiple of its block of {block}"
            )
        if offset % self.alignment:
            raise self._fail(
                f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {self.alignment}"
            )
        n_bytes = int(np.prod(shape, dtype=object)) // block * type_bytes
        start = data_start + offset
        if start + n_bytes > len(self.buffer):
            raise self._fail(f"truncated file: tensor {name!r} ends past the end of the file")
        return TensorInfo(name, shape, type_name, start, n_bytes, self)

    def _text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"{what} is not UTF-8 ({e.reason}: {raw[:40]!r})") from None

    def value(self, key: str) -> Any:
        """Metadata value of `key` as Python data (strings decoded, arrays as lists), or None when absent."""
        if key not in self.metadata:
            return None
        return self._python(self.metadata[key], key)

    def _python(self, raw: Any, key: str) -> Any:
        if isinstance(raw, bytes):
            return self._text(raw, f"metadata key {key!r} holds a string that")
        if isinstance(raw, np.float32):
            return float(str(raw))  # 9.99999975e-06 -> 1e-05, as the HF config had it
        if isinstance(raw, np.ndarray):
            return raw.tolist()
        if isinstance(raw, list):
            return [self._python(item, key) for item in raw]
        return raw

    def length(self, key: str) -> int | None:
        """Number of items of an array value (None when absent), without converting it."""
        raw = self.metadata.get(key)
        return None if raw is None else len(raw)

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


FLOAT_TYPES = ("F32", "F16", "BF16")
_BLOCKS_PER_CHUNK = 1 << 15  # bounds the temporaries of one step to a few MB, whatever the tensor's size


def dequantize(t: TensorInfo) -> np.ndarray:
    """Tensor `t` as a float32 array of its shape that owns its memory, read from the map a chunk of
    blocks at a time (a big tensor is never held twice in its stored form)."""
    if t.type_name in ("F32", "F16"):
        return t.data.astype(np.float32)  # a copy in native byte order
    if t.type_name == "BF16":  # the top half of a float32
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    if t.type_name not in BLOCK_DEQUANTIZERS:
        raise ValueError(f"no dequantizer for {t.type_name}")
    _, block, type_bytes = next(v for v in GGML_TYPES.values() if v[0] == t.type_name)
    blocks = t.data.reshape(-1, type_bytes)  # (n_blocks, bytes)
    out = np.empty((blocks.shape[0], block), np.float32)  # (n_blocks, values)
    for i in range(0, blocks.shape[0], _BLOCKS_PER_CHUNK):
        out[i : i + _BLOCKS_PER_CHUNK] = BLOCK_DEQUANTIZERS[t.type_name](blocks[i : i + _BLOCKS_PER_CHUNK])
    return out.reshape(t.shape)


__all__ = [
    "BLOCK_DEQUANTIZERS",
    "FLOAT_TYPES",
    "GGML_TYPES",
    "GGUF_MAGIC",
    "GGUF_VERSIONS",
    "GGUFError",
    "GGUFFile",
    "GGUFHeader",
    "TensorInfo",
    "dequantize",
    "read_gguf_header",
]
