"""The fixed start of a GGUF file (llama.cpp's format), read without the `gguf` package.

    header = read_gguf_header("model.gguf")   # GGUFError naming the file unless it is a GGUF file

A GGUF file opens with the magic b"GGUF", a format version (u32) and the number of tensors and of
metadata entries (u64 each), little-endian unless the file was written big-endian. These 24 bytes
tell a GGUF file from anything else (a zip, a safetensors file, an HTML error page) and a file cut
before its tables, before `GGUFCheckpoint` parses the metadata or any weight is read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from minigrpo.errors import UserError


class GGUFError(UserError, ValueError):
    """A GGUF file that cannot be read or holds something this reader does not support."""


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what the gguf package reads (version 1 used 32-bit counts)
# Smallest encodings: a tensor info is a name length (u64), n_dims (u32), type (u32) and offset
# (u64); a metadata entry a key length (u64), a value type (u32) and a value of at least one byte.
_MIN_TENSOR_INFO_BYTES, _MIN_METADATA_BYTES, _HEADER_BYTES = 24, 13, 24


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


__all__ = ["GGUF_MAGIC", "GGUF_VERSIONS", "GGUFError", "GGUFHeader", "read_gguf_header"]
