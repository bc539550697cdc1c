"""GGUF container reading: block formats to the bit against `gguf.quants`, metadata of every value type,
alignment, per-layer counts, broken tables, and no `gguf` package needed at run time."""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigrpo.models import gguf_header
from minigrpo.models.gguf import GGUFCheckpoint, GGUFError
from minigrpo.models.gguf_header import BLOCK_DEQUANTIZERS, GGUFFile, dequantize

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 32, 4, 2, 24, 64
_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_IDS = {"F32": 0, "F16": 1, "Q8_0": 8, "BF16": 30}


def encode(vtype: int, value) -> bytes:
    """One metadata value in GGUF's encoding; an array is (item type, items)."""
    if vtype in _CODES:
        return struct.pack("<" + _CODES[vtype], value)
    if vtype == 8:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    item_type, items = value
    return struct.pack("<IQ", item_type, len(items)) + b"".join(encode(item_type, v) for v in items)


def write_bytes_gguf(path: Path, kv: list, tensors: list, alignment: int = 32) -> Path:
    """A GGUF written byte by byte: kv [(key, value type, value)], tensors [(name, torch shape, type id, raw
    bytes)], each tensor and the data section at a multiple of `alignment` (general.alignment is not set)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    out += b"".join(encode(8, key) + struct.pack("<I", vtype) + encode(vtype, value) for key, vtype, value in kv)
    data = b""
    for name, shape, type_id, raw in tensors:
        out += encode(8, name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        out += struct.pack("<IQ", type_id, len(data))
        data += raw + b"\0" * (-len(raw) % alignment)
    path.write_bytes(out + b"\0" * (-len(out) % alignment) + data)
    return path


def model_kv(arch: str = "qwen2", heads=HEADS, kv_heads=KV_HEADS, ffn=FFN) -> list:
    """The metadata the reader needs; a list value becomes a u32 array (one count per layer)."""
    count = lambda v: (9, (4, v)) if isinstance(v, list) else (4, v)
    return [
        ("general.architecture", 8, arch),
        (f"{arch}.block_count", 4, 1),
        (f"{arch}.context_length", 4, 128),
        (f"{arch}.embedding_length", 4, HIDDEN),
        (f"{arch}.feed_forward_length", *count(ffn)),
        (f"{arch}.attention.head_count", *count(heads)),
        (f"{arch}.attention.head_count_kv", *count(kv_heads)),
        (f"{arch}.attention.layer_norm_rms_epsilon", 6, 1e-6),
    ]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def embedding(seed: int = 0) -> tuple:
    return ("token_embd.weight", (VOCAB, HIDDEN), 0, rand(VOCAB, HIDDEN, seed=seed).tobytes())


# ---- block formats ---------------------------------------------------------------------------------------


def stored_blocks(name: str, n_blocks: int) -> np.ndarray:
    """Stored bytes of `name`: random bytes (bit 6 clear, so every f16 field is finite) and, for the types
    gguf or kquants can quantize, real quantized values."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    from minigrpo.models import kquants

    qtype = gguf.GGMLQuantizationType[name]
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    parts = [rng.integers(0, 256, (n_blocks, size), dtype=np.uint8) & 0xBF]
    values = rand(n_blocks, block, seed=int(qtype)) * np.float32(3)
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        parts.append(gguf.quants.quantize(values, qtype))
    elif name in ("Q4_K", "Q6_K"):
        parts.append(getattr(kquants, f"quantize_{name.lower()}")(values))
    return np.concatenate(parts).reshape(-1, size)


@pytest.mark.parametrize("name", sorted(BLOCK_DEQUANTIZERS))
def test_block_types_dequantize_like_gguf_to_the_bit(tmp_path, name, monkeypatch):
    """Every block type read without `gguf` gives the float32 bits `gguf.quants.dequantize` gives, a few
    blocks at a time (the chunked path) as in one go."""
    import gguf

    qtype = gguf.GGMLQuantizationType[name]
    blocks = stored_blocks(name, 12)
    block = gguf.constants.GGML_QUANT_SIZES[qtype][0]
    rows = blocks.shape[0] // 3
    kv = model_kv()
    path = write_bytes_gguf(
        tmp_path / "q.gguf", kv, [("token_embd.weight", (rows, 3 * block), int(qtype), blocks.tobytes())]
    )
    expected = np.asarray(gguf.quants.dequantize(blocks.reshape(rows, -1), qtype), np.float32)
    [t] = GGUFFile(path).tensors
    got = dequantize(t)
    assert got.shape == (rows, 3 * block) and np.array_equal(got.view(np.uint32), expected.view(np.uint32)), name
    monkeypatch.setattr(gguf_header, "_BLOCKS_PER_CHUNK", 5)
    assert np.array_equal(dequantize(t).view(np.uint32), expected.view(np.uint32)), name


def test_reading_needs_no_gguf_package(tmp_path, monkeypatch):
    """A GGUF of every common storage type opens, configures and dequantizes with the `gguf` package
    unimportable: it is a test-only reference, the reader parses the format itself."""
    import gguf

    tensors, expected = [], {}
    for i, name in enumerate(["F32", "F16", "BF16", *sorted(BLOCK_DEQUANTIZERS)]):
        qtype = gguf.GGMLQuantizationType[name]
        block = gguf.constants.GGML_QUANT_SIZES[qtype][0]
        if name in ("F32", "F16", "BF16"):
            data = gguf.quants.quantize(rand(2, 256, seed=i), qtype)
        else:
            n_blocks = 2 * 256 // block
            data = stored_blocks(name, n_blocks)[-n_blocks:].reshape(2, -1)  # real values where quantizable
        tensors.append((f"blk.{i}.attn_v.weight", (2, 256), int(qtype), data.tobytes()))
        expected[f"model.layers.{i}.self_attn.v_proj.weight"] = np.asarray(gguf.quants.dequantize(data, qtype))
    path = write_bytes_gguf(tmp_path / "all.gguf", model_kv(), [embedding(), *tensors])
    for module in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config["num_key_value_heads"] == KV_HEADS
    got = dict(ckpt.tensors())
    for name, want in expected.items():
        assert torch.equal(got[name], torch.from_numpy(want)), name


# ---- metadata and the tensor table -------------------------------------------------------------------------


def test_metadata_of_every_value_type_nested_arrays_and_non_ascii(tmp_path):
    """Scalars of all twelve types, strings with multi-byte UTF-8, arrays of numbers, bools and strings,
    and arrays of arrays (nested, mixed item types) come back as Python values of the same structure."""
    scalars = [(0, 255), (1, -3), (2, 65535), (3, -300), (4, 2**32 - 1), (5, -(2**31)), (7, True)]
    scalars += [(10, 2**64 - 1), (11, -(2**63)), (12, 0.1), (6, 1e-5), (8, "héllo ✓ 日本")]
    kv = model_kv() + [(f"x.s{i}", vtype, value) for i, (vtype, value) in enumerate(scalars)]
    nested = (9, [(4, [1, 2, 3]), (8, ["é", "日本", ""]), (9, [(7, [True, False])])])
    kv += [("x.nested", 9, nested), ("x.strings", 9, (8, ["ñ", "Ġcafé", "<|im_end|>"])), ("x.empty", 9, (8, []))]
    kv += [("x.floats", 9, (6, [0.5, -2.0])), ("x.i64", 9, (11, [-5, 2**40]))]
    ckpt = GGUFCheckpoint(write_bytes_gguf(tmp_path / "m.gguf", kv, [embedding()]))
    assert [ckpt.get(f"x.s{i}") for i in range(len(scalars))] == [value for _, value in scalars]
    assert ckpt.get("x.nested") == [[1, 2, 3], ["é", "日本", ""], [[True, False]]]
    assert ckpt.get("x.strings") == ["ñ", "Ġcafé", "<|im_end|>"] and ckpt.get("x.empty") == []
    assert ckpt.get("x.floats") == [0.5, -2.0] and ckpt.get("x.i64") == [-5, 2**40]
    assert ckpt.get("x.missing", "default") == "default"


@pytest.mark.parametrize("alignment", [1, 8, 64, 256])
def test_general_alignment_other_than_32(tmp_path, alignment):
    """Tensor data starts at multiples of general.alignment; a small first tensor makes every offset differ
    from the 32-aligned one, so a reader that ignores the key reads shifted values."""
    norm = rand(HIDDEN, seed=3)
    tensors = [("output_norm.weight", (HIDDEN - 1,), 0, norm[:-1].tobytes()), embedding(seed=4)]
    kv = [*model_kv(), ("general.alignment", 4, alignment)]
    ckpt = GGUFCheckpoint(write_bytes_gguf(tmp_path / "a.gguf", kv, tensors, alignment=alignment))
    got = dict(ckpt.tensors())
    assert torch.equal(got["model.norm.weight"], torch.from_numpy(norm[:-1]))
    assert torch.equal(got["model.embed_tokens.weight"], torch.from_numpy(rand(VOCAB, HIDDEN, seed=4)))


@pytest.mark.parametrize(
    ("kv", "tensor", "problem"),
    [
        ([("general.alignment", 4, 48)], None, "general.alignment = 48 is not a power of two"),
        ([], ("token_embd.weight", (VOCAB, 40), 8, bytes(VOCAB * 40 // 32 * 34)), "rows of 40 values, not a multiple"),
        (
            [],
            ("token_embd.weight", (VOCAB, HIDDEN), 77, bytes(8)),
            "tensor 'token_embd.weight' has an unknown ggml type 77",
        ),
        ([("x.bad", 8, b"caf\xe9")], None, "metadata key 'x.bad' holds a string that is not UTF-8"),
        ([("x.odd", 13, 0)], None, "metadata key 'x.odd' has an unknown value type 13"),
    ],
)
def test_broken_container_is_one_line_naming_the_file(tmp_path, kv, tensor, problem):
    """Bad alignment, rows that are no whole number of blocks, unknown types, non-UTF-8 strings: one
    GGUFError line naming the file, when it is opened or the key is read, before any weight is."""
    path = tmp_path / "broken.gguf"
    if kv and kv[0][1] == 13:  # a value type the encoder does not know: the entry goes in first, by hand
        raw = write_bytes_gguf(path, model_kv(), [embedding()]).read_bytes()
        count = struct.unpack("<Q", raw[16:24])[0] + 1
        path.write_bytes(raw[:16] + struct.pack("<Q", count) + encode(8, "x.odd") + struct.pack("<I", 13) + raw[24:])
    else:
        write_bytes_gguf(path, model_kv() + kv, [tensor or embedding()])
    with pytest.raises(GGUFError, match=rf"^{re.escape(str(path))}: .*{re.escape(problem)}"):
        ckpt = GGUFCheckpoint(path)
        ckpt.get("x.bad")


def test_per_layer_head_and_ffn_arrays(tmp_path):
    """llama.cpp's converter writes head_count, head_count_kv and feed_forward_length as one value per layer
    for some models: equal values are the count, differing ones an error naming the key."""
    kv = model_kv(heads=[HEADS], kv_heads=[KV_HEADS], ffn=[FFN])
    cfg = GGUFCheckpoint(write_bytes_gguf(tmp_path / "same.gguf", kv, [embedding()])).config
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (HEADS, KV_HEADS, FFN)
    differ = GGUFCheckpoint(write_bytes_gguf(tmp_path / "d.gguf", model_kv(ffn=[FFN, 2 * FFN]), [embedding()]))
    with pytest.raises(GGUFError, match=re.escape("d.gguf: metadata key qwen2.feed_forward_length differs")):
        _ = differ.config
