"""What goes into a GGUF file for llama.cpp: tensor names, q/k order, storage types, metadata, vocabulary.

The inverse of the reader (minigrpo/models/gguf.py), built from the reader's own name tables:

* families -> `general.architecture`: llama, qwen2, qwen3 and phi3 keep their name; mistral is
  written as `llama` (what llama.cpp's converter does: the same graph).
* llama-architecture files hold q/k rows (weights and biases) permuted per head from HF's rotate_half
  order to interleaved pairs (`permute_qk`); qwen2/qwen3/phi3 files keep HF's order.
* architecture keys (`{arch}.context_length`, `.embedding_length`, `.block_count`,
  `.feed_forward_length`, `.attention.head_count[_kv]`, `.attention.key_length`/`.value_length`
  when the head dim is not hidden / heads, `.attention.layer_norm_rms_epsilon`, `.rope.freq_base`,
  `.rope.dimension_count`, `.vocab_size`, phi3's `.attention.sliding_window`) and rope scaling:
  Llama-3.1 scaling as a `rope_freqs` tensor of per-frequency divisors, Phi-3 longrope as
  `rope_factors_long`/`rope_factors_short` tensors plus `.rope.scaling.original_context_length` and
  `.rope.scaling.attn_factor`, linear and yarn as `.rope.scaling.type`/`.factor`
  (`.original_context_length` for yarn, and `.yarn_beta_fast`/`.yarn_beta_slow` when not 32/1; a yarn
  factor left out of config.json is written as the max_position_embeddings / original ratio the model
  uses; a yarn attention factor/mscale, which GGUF has no key for, is an error, as is a longrope
  factor/attention_factor whose attention scale is not the one the context lengths give). Dynamic NTK scaling
  has no GGUF form (llama.cpp knows none, linear, yarn and longrope): an error, not a file that runs
  default RoPE past max_position_embeddings.
* the vocabulary (`GGUFVocab`): byte-level BPE only (`tokenizer.ggml.model = "gpt2"`): tokens by id,
  token types (special added tokens and `<|...|>` ones CONTROL, other added tokens USER_DEFINED, `[PAD{id}]` fillers
  UNUSED), merges, special ids, add_bos/add_eos, the chat templates, and the pre-tokenizer name
  (`tokenizer.ggml.pre`) recognised from the tokenizer's own pre-tokenizer: "gpt-2" (the GPT-2
  regex; llama.cpp reads "gpt2" as an unknown name and falls back to another regex), "smollm"
  (single digits, then the GPT-2 regex), "llama-bpe" and "qwen2" (their Split regexes; qwen2 with NFC,
  "deepseek-r1-qwen" without). Anything else (a ByteLevel that prefixes a space included) cannot be
  described to llama.cpp: an error, not a guess.
  A SentencePiece vocabulary (what the reader builds from a `llama` GGUF vocabulary: BPE with byte
  fallback) is refused too: its scores are not kept, so it could not be written back as it was read.

Storage types per export type (`tensor_type`): 1-d tensors (norms, biases) and the rope tensors are
F32 always; f16/bf16 store every 2-d weight so; q8_0 every 2-d weight as Q8_0; q4_0/q5_0 every 2-d
weight so except the output head (the token embedding when tied), which gets Q6_K as llama.cpp's
quantizer gives it; q4_k_m follows `kquants.q4_k_m_type`. A row length a block type cannot hold
falls back (`kquants.fallback_type`; F16 for the 32-value types). A weight with inf/nan values, or one
beyond float16's range stored as F16, is an error (`check_storable`), not a file no reader can use.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType, RopeScalingType

from minigrpo.errors import UserError

from .args import ModelArgs
from .gguf import _BLOCK_NAMES_BY_ARCH, _TOP_NAMES
from .gguf_vocab import _END_TOKENS, _LLAMA3_REGEX, _QWEN2_REGEX
from .kquants import fallback_type, q4_k_m_type, quantize_q4_k, quantize_q6_k

# family (HF model_type) -> general.architecture
EXPORT_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
# export type -> (general.file_type, storage type of the 2-d weights)
QUANT_TYPES: dict[str, tuple[LlamaFileType, QT]] = {
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "f16": (LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, QT.Q5_0),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, QT.Q4_K),
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

_HF_TOP = {hf: name for name, hf in _TOP_NAMES.items()}
_HF_BLOCK = {arch: {hf: name for name, hf in table.items()} for arch, table in _BLOCK_NAMES_BY_ARCH.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFExportError(UserError, ValueError):
    """A model, tokenizer or export type that cannot be written as a GGUF file for llama.cpp."""


# ----------------------------------------------------------------------------------------------
# architecture, names, q/k order, storage types


def check_exportable(args: ModelArgs) -> str:
    """The GGUF architecture of a model, or a GGUFExportError saying what llama.cpp cannot express."""
    arch = EXPORT_ARCHITECTURES.get(args.model_type)
    if arch is None:
        raise GGUFExportError(
            f"model_type {args.model_type!r} cannot be exported to GGUF (supported: {', '.join(EXPORT_ARCHITECTURES)})"
        )
    if args.rope_type == "llama3" and arch != "llama":
        raise GGUFExportError(f"llama3 rope scaling on a {args.model_type} model cannot be written to GGUF")
    if args.rope_type == "longrope" and arch != "phi3":
        raise GGUFExportError(f"longrope scaling on a {args.model_type} model cannot be written to GGUF")
    if args.mlp_bias:
        raise GGUFExportError("MLP biases (mlp_bias=true) cannot be exported to GGUF")
    if args.rope_type == "yarn":
        _check_yarn(args.rope_params)
    if args.rope_type == "longrope":
        _check_longrope(args)
    if args.rope_type == "dynamic":  # llama.cpp's scaling types: none, linear, yarn, longrope
        raise GGUFExportError(
            "dynamic (NTK) rope scaling cannot be written to GGUF: llama.cpp has no such scaling type and would "
            f"run default RoPE past max_position_embeddings ({args.max_position_embeddings})"
        )
    if args.rotary_dim != args.head_dim and arch != "phi3":
        raise GGUFExportError(f"partial rotary embeddings on a {args.model_type} model cannot be written to GGUF")
    return arch


# yarn parameters: GGUF keys carry beta_fast/beta_slow (`.rope.scaling.yarn_beta_*`, defaults 32 and 1
# as in HF); the attention scale has no key of the same meaning (llama.cpp derives it from the factor,
# as HF does by default), and llama.cpp always rounds the ramp ends (HF's truncate=True)
_YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}
_YARN_UNWRITABLE = ("attention_factor", "mscale", "mscale_all_dim")


def _check_yarn(params: dict[str, Any]) -> None:
    """A GGUFExportError for yarn settings the file cannot describe: dropped silently, they would make
    llama.cpp (and the reader) run a model with other rotary frequencies or attention scale."""
    for key in _YARN_UNWRITABLE:
        if params.get(key) is not None:
            raise GGUFExportError(f"yarn rope scaling with {key}={params[key]!r} cannot be written to GGUF")
    if params.get("truncate", True) is False:
        raise GGUFExportError("yarn rope scaling with truncate=False cannot be written to GGUF")


def _longrope_attn_factor(scale: float, original: int) -> float:
    """LongRoPE's cos/sin scale for a context `scale` times the pretraining length `original`."""
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def _check_longrope(args: ModelArgs) -> None:
    """A GGUFExportError for a longrope `factor` or `attention_factor` that gives another attention scale
    than the file's context lengths do: llama.cpp (and the reader) derive it from those two alone."""
    params, max_pos = args.rope_params, args.max_position_embeddings
    original = int(params["original_max_position_embeddings"])
    written = _longrope_attn_factor(max_pos / original, original)
    for key in ("attention_factor", "factor"):
        if params.get(key) is None:
            continue
        model = float(params[key]) if key == "attention_factor" else _longrope_attn_factor(params[key], original)
        if not math.isclose(model, written, rel_tol=1e-6):
            raise GGUFExportError(
                f"longrope scaling with {key}={params[key]!r} (attention scale {model:.6g}, where GGUF's "
                f"context lengths give {written:.6g}) cannot be written to GGUF"
            )
        break  # an attention_factor overrides what the factor would give


def gguf_tensor_name(hf_name: str, arch: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the reader's tables, inverted)."""
    m = _HF_LAYER.match(hf_name)
    if m is not None and m.group(2) in _HF_BLOCK[arch]:
        return f"blk.{m.group(1)}.{_HF_BLOCK[arch][m.group(2)]}.{m.group(3)}"
    module, _, suffix = hf_name.rpartition(".")
    if m is None and module in _HF_TOP:
        return f"{_HF_TOP[module]}.{suffix}"
    raise GGUFExportError(f"tensor {hf_name!r} has no GGUF name for architecture {arch!r}")


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order of a q/k weight (rows, in) or bias (rows,) -> llama.cpp's interleaved
    pairs, per head: rows [first half | second half] become (first[0], second[0], first[1], ...)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(name: str, arch: str, args: ModelArgs) -> int | None:
    """How many heads `permute_qk` splits a GGUF tensor into; None when it is stored as it is."""
    if arch != "llama":
        return None
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return {"attn_q": args.n_heads, "attn_k": args.n_kv_heads}.get(kind)


def tensor_type(name: str, shape: tuple[int, ...], quant: str, *, n_layers: int, has_output: bool) -> QT:
    """The storage type of one GGUF tensor in an export of type `quant` (see the module docstring)."""
    if len(shape) < 2:
        return QT.F32
    if quant == "q4_k_m":
        return q4_k_m_type(name, shape, n_layers=n_layers, has_output=has_output)
    qtype = QUANT_TYPES[quant][1]
    is_head = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if quant in ("q4_0", "q5_0") and is_head:
        qtype = QT.Q6_K
    if qtype in (QT.F16, QT.BF16):
        return qtype
    return fallback_type(qtype, shape[-1])


_F16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_storable(w: np.ndarray, qtype: QT, name: str | None = None) -> None:
    """A GGUFExportError for a tensor the file cannot hold as `qtype`: inf/nan values (a diverged model;
    the file would load nowhere), or F16 values beyond float16's range (written as inf)."""
    what = f"tensor {name!r}" if name else f"a tensor of shape {tuple(w.shape)}"
    finite = np.isfinite(w)
    if not finite.all():
        raise GGUFExportError(f"{what} holds {int(w.size - finite.sum())} inf/nan values: it cannot be exported")
    peak = float(np.abs(w).max(initial=0.0))
    if qtype == QT.F16 and peak > _F16_MAX:
        raise GGUFExportError(
            f"{what} holds values up to {peak:.6g}, beyond float16's range ({_F16_MAX:g}): export it as bf16 or q8_0"
        )


def encode_tensor(w: np.ndarray, qtype: QT, name: str | None = None) -> np.ndarray:
    """float32 (rows, cols) -> what the file stores for `qtype` (float32/float16, or uint8 blocks);
    `check_storable` first (`name` names the tensor in its error)."""
    from gguf.quants import quantize

    check_storable(w, qtype, name)
    if qtype == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if qtype == QT.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    if qtype == QT.Q4_K:
        return quantize_q4_k(w)
    if qtype == QT.Q6_K:
        return quantize_q6_k(w)
    return quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


# ----------------------------------------------------------------------------------------------
# architecture metadata and rope tensors


def add_model_metadata(writer: Any, args: ModelArgs, arch: str) -> None:
    """The `{arch}.*` keys llama.cpp (and the reader) build the model from."""
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    if args.head_dim != args.dim // args.n_heads or arch == "qwen3":
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.rotary_dim)
    writer.add_vocab_size(args.vocab_size)
    windows = {w for w in args.layer_windows if w is not None}
    if arch == "phi3" and windows:
        writer.add_sliding_window(max(windows))
    elif windows and min(windows) < args.max_position_embeddings:
        warnings.warn(
            f"the {arch} architecture of llama.cpp has no sliding-window attention: the GGUF file attends to "
            f"the whole context, where this model attends to the last {min(windows)} tokens",
            UserWarning,
            stacklevel=3,
        )
    params = args.rope_params
    original = params.get("original_max_position_embeddings") or args.hf_config.get("original_max_position_embeddings")
    if args.rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(RopeScalingType(args.rope_type))
        writer.add_rope_scaling_factor(_rope_factor(args, original))
        if args.rope_type == "yarn" and original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        if args.rope_type == "yarn":
            for key, default in _YARN_BETAS.items():
                if params.get(key) is not None and float(params[key]) != default:
                    writer.add_float32(f"{arch}.rope.scaling.yarn_{key}", float(params[key]))
    if arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(int(original or args.max_position_embeddings))
        if args.rope_type == "longrope":
            scale = args.max_position_embeddings / int(original or args.max_position_embeddings)
            writer.add_rope_scaling_attn_factors(_longrope_attn_factor(scale, int(original)))


def _rope_factor(args: ModelArgs, original: int | None) -> float:
    """The scaling factor of linear or yarn RoPE; a yarn config may leave it out (or null), and then
    it is max_position_embeddings / original_max_position_embeddings, as the model computes it."""
    factor = args.rope_params.get("factor")
    if factor is None and args.rope_type == "yarn" and original:
        factor = args.max_position_embeddings / int(original)
    return float(factor)


def rope_tensors(args: ModelArgs) -> dict[str, np.ndarray]:
    """The F32 tensors that carry rope scaling: `rope_freqs` (llama3) or the longrope factors (phi3)."""
    params = args.rope_params
    if args.rope_type == "longrope":
        return {
            "rope_factors_long.weight": np.asarray(params["long_factor"], np.float32),
            "rope_factors_short.weight": np.asarray(params["short_factor"], np.float32),
        }
    if args.rope_type != "llama3":
        return {}
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    inv_freq = args.rope_theta ** -(np.arange(0, args.rotary_dim, 2, dtype=np.float64) / args.rotary_dim)
    wavelen = 2 * math.pi / inv_freq  # (R/2,)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)  # 0: long waves, 1: short ones
    divisors = 1.0 / ((1 - smooth) / factor + smooth)  # factor for long waves, 1 for short, blended between
    return {"rope_freqs.weight": divisors.astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# vocabulary


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp's `gpt2` vocabulary describes it."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unknown, padding, eot, eom
    add_bos: bool = False
    add_eos: bool = False
    templates: dict[str, str] = field(default_factory=dict)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name of a tokenizer.json pre-tokenizer + normalizer, or None if it has none.

    A ByteLevel step that prefixes a space (`add_prefix_space`, true unless the file says false) has
    no GGUF form: llama.cpp never adds one to a `gpt2` vocabulary, so "hi" would become other tokens.
    Qwen2's regex without Qwen2's NFC normalizer is "deepseek-r1-qwen" (DeepSeek's Qwen distills):
    llama.cpp splits both alike, and the reader normalizes only "qwen2" files."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds[-1:] != ["ByteLevel"] or parts[-1].get("add_prefix_space", True):
        return None
    name = None
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        ok = parts[0].get("behavior") == "Isolated" and not parts[0].get("invert", False)
        name = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}.get(regex) if ok else None
    if name == "qwen2" and norm is None:
        return "deepseek-r1-qwen"
    expected_norm = {"type": "NFC"} if name == "qwen2" else None
    return name if norm == expected_norm else None


def tokenizer_vocab(tokenizer: Any, n_vocab: int) -> GGUFVocab:
    """The GGUF vocabulary of a minigrpo Tokenizer for a model of `n_vocab` embedding rows (ids the
    tokenizer does not use become `[PAD{id}]` UNUSED entries, as llama.cpp's converter writes them)."""
    if tokenizer is None:
        raise GGUFExportError("a GGUF file needs the tokenizer: the model has none (no tokenizer.json)")
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise GGUFExportError(
            "SentencePiece vocabularies (BPE with byte fallback, as read from a 'llama' GGUF vocabulary: "
            "Llama 2, Mistral, Phi-3) cannot be exported to GGUF; only byte-level BPE ('gpt2') can"
        )
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"only byte-level BPE tokenizers can be exported to GGUF; this one is {model.get('type')} with a "
            f"{decoder.get('type')} decoder"
        )
    pre = _pre_tokenizer_name(spec)
    if pre is None:
        raise GGUFExportError(
            "the tokenizer's pre-tokenizer/normalizer is not one llama.cpp names (gpt-2, smollm, llama-bpe, qwen2, "
            "deepseek-r1-qwen; ByteLevel with add_prefix_space=false): "
            f"{json.dumps(spec.get('pre_tokenizer'))[:200]}"
        )
    tokens, types = _tokens_by_row(tokenizer, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unknown": tokenizer.unk_token_id,
        "padding": tokenizer.pad_token_id,
    }
    # stop ids the reader would not find again (eos, and control tokens it knows by name): eot, eom
    found = {tokenizer.eos_token_id} | {i for i, t in enumerate(tokens) if t in _END_TOKENS and types[i] == 3}
    extra = [i for i in tokenizer.stop_ids if i not in found]
    ids.update(zip(("eot", "eom"), extra))
    if len(extra) > 2:
        warnings.warn(f"GGUF keeps two extra stop ids (eot, eom); ids {extra[2:]} are dropped", UserWarning, 2)
    return GGUFVocab(
        pre=pre,
        tokens=tokens,
        types=types,
        merges=merges,
        special_ids={k: v for k, v in ids.items() if v is not None},
        add_bos=tokenizer.add_bos_token,
        add_eos=tokenizer.add_eos_token,
        templates=dict(tokenizer.chat_templates),
    )


def _tokens_by_row(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """(token, type) of every embedding row, by id: the ids of a vocabulary may leave holes (and a model
    may have more rows than tokens, as Qwen2.5's 151936 for 151665), so tokens are placed by their id,
    not their count; a row no token uses is `[PAD{id}]` UNUSED, as llama.cpp's converter writes it (in more
    brackets where another id's token is that text)."""
    by_id = {i: tok for tok, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    outside = sorted(i for i in by_id if not 0 <= i < n_vocab)
    if outside:
        raise GGUFExportError(
            f"the tokenizer's token {by_id[outside[-1]]!r} has id {outside[-1]}, but the model has only {n_vocab} "
            f"embedding rows (ids 0..{n_vocab - 1}); {len(outside)} token(s) have no row"
        )
    added = tokenizer.backend.get_added_tokens_decoder()
    taken = set(by_id.values())  # a filler may not repeat a token of another id (a reader maps text to one id)
    tokens, types = [], []
    for i in range(n_vocab):
        tok = by_id.get(i)
        if tok is None or tok == f"[PAD{i}]":
            filler = f"[PAD{i}]"
            while tok is None and filler in taken:
                filler = f"[{filler}]"
            tokens.append(filler)
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(tok)
            types.append(
                TOKEN_NORMAL if i not in added else TOKEN_CONTROL if _control(added[i]) else TOKEN_USER_DEFINED
            )
    return tokens, types


def _control(token: Any) -> bool:
    """Whether an added token is CONTROL: special, or written as a control token is (`<|fim_prefix|>`,
    `<｜begin▁of▁sentence｜>`), which some tokenizers leave unmarked; llama.cpp's converter types both
    CONTROL, so that its output never prints them. Other added tokens (`<think>`) are USER_DEFINED."""
    text = token.content
    return (
        token.special
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
    )


def add_vocab_metadata(writer: Any, vocab: GGUFVocab) -> None:
    """The `tokenizer.*` keys of a GGUFVocab."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for key, tid in vocab.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.templates:
        writer.add_chat_template([{"name": k, "template": v} for k, v in vocab.templates.items()])


__all__ = [
    "EXPORT_ARCHITECTURES",
    "QUANT_TYPES",
    "GGUFExportError",
    "GGUFVocab",
    "add_model_metadata",
    "add_vocab_metadata",
    "check_exportable",
    "check_storable",
    "encode_tensor",
    "gguf_tensor_name",
    "permute_qk",
    "qk_heads",
    "rope_tensors",
    "tensor_type",
    "tokenizer_vocab",
]
