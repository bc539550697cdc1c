"""ModelArgs: every difference between the Llama, Mistral, Qwen2/2.5, Qwen3 and Phi-3/3.5/4 families
as an explicit field, read from a Hugging Face `config.json`.

One `Transformer` serves every family; it never asks "which family is this?", only these fields:

| family  | q/k/v bias          | o bias              | q/k RMSNorm | fused qkv, gate_up | sliding window      |
|---------|---------------------|---------------------|-------------|--------------------|---------------------|
| llama   | attention_bias      | attention_bias      | no          | no                 | no                  |
| mistral | no                  | no                  | no          | no                 | sliding_window      |
| qwen2   | yes                 | no                  | no          | no                 | per layer, if on    |
| qwen3   | attention_bias      | attention_bias      | yes         | no                 | per layer, if on    |
| phi3    | no                  | no                  | no          | yes                | sliding_window      |

Only Phi-3 rotates part of each head (`partial_rotary_factor`); the other families rotate all of it
under default RoPE, as transformers does, and refuse a factor below 1 with scaled RoPE (transformers
fails there). No dropout is implemented: a nonzero rate the family applies is refused. A key
config.json leaves out takes transformers' default for that family (`_HF_DEFAULTS`: Mistral's
4096-token window, Qwen's 28 full-attention layers below the window, Phi-3's rms_norm_eps 1e-5,
...), not one default for all.

RoPE parameters come from either key style (`rope_theta` + `rope_scaling`, or `rope_parameters`):
rope_args.py reads and checks them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from minigrpo.models.config_checks import ModelConfigError, UnsupportedModelError, is_int, is_number
from minigrpo.models.rope_args import SUPPORTED_ROPE_TYPES, read_rope

SILU_NAMES = ("silu", "swish")  # transformers maps both names to the same SiLU
# layer_types entries Qwen2/Qwen3 build: is the layer windowed? ("attention": transformers' older name
# for full attention, renamed as it loads; its other types, chunked_attention..., Qwen cannot build)
_LAYER_TYPES = {"full_attention": False, "sliding_attention": True, "attention": False}
# keys transformers types as non-nullable (max_position_embeddings: in every family): null is refused, not derived
_NOT_NULL = {"mistral": ("num_key_value_heads",), "qwen3": ("head_dim",)}


@dataclass(frozen=True)
class _Family:
    architecture: str
    qkv_bias: bool | str  # True/False, or the config key that decides
    o_bias: bool | str
    qk_norm: bool
    fused: bool  # Phi-3 stores qkv_proj and gate_up_proj as single matrices
    window: str  # "none" | "global" (sliding_window applies to all layers) | "per_layer" (layer_types)
    mlp_bias: bool | str = False  # only Llama reads the key; the others' MLPs never have biases
    partial_rotary: bool = False  # whether partial_rotary_factor applies (the others rotate the whole head)
    rope_types: tuple[str, ...] = SUPPORTED_ROPE_TYPES  # transformers' Phi-3 refuses all but LongRoPE
    # rates transformers applies in train mode, refused if nonzero (its Phi-3 never applies embd_pdrop)
    dropouts: tuple[str, ...] = ("attention_dropout",)


_PHI3: dict[str, Any] = dict(
    partial_rotary=True, rope_types=("default", "longrope"), dropouts=("attention_dropout", "resid_pdrop")
)
_FAMILIES: dict[str, _Family] = {
    "llama": _Family("LlamaForCausalLM", "attention_bias", "attention_bias", False, False, "none", "mlp_bias"),
    "mistral": _Family("MistralForCausalLM", False, False, False, False, "global"),
    "qwen2": _Family("Qwen2ForCausalLM", True, False, False, False, "per_layer"),
    "qwen3": _Family("Qwen3ForCausalLM", "attention_bias", "attention_bias", True, False, "per_layer"),
    "phi3": _Family("Phi3ForCausalLM", False, False, False, True, "global", **_PHI3),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# transformers' config defaults per family, for the keys a config.json may leave out that change the
# model: a missing key must build what transformers builds from the same file. (An explicit null is
# kept: it means "none" or "derive it", e.g. num_key_value_heads null is one kv head per query head.)
_QWEN_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "num_key_value_heads": 32,
    "sliding_window": 4096,  # used only with use_sliding_window
    "max_window_layers": 28,  # layers [0, 28) attend fully, the rest within the window
}
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "mistral": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096 * 32,
        "num_key_value_heads": 8,
        "sliding_window": 4096,
    },
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": {**_QWEN_DEFAULTS, "head_dim": 128},
    # Phi-3 always has a top-level original_max_position_embeddings, which LongRoPE reads before rope_scaling's
    "phi3": {
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
    },
}


@dataclass
class ModelArgs:
    """Architecture of one checkpoint. Built by `from_hf_config`; `hf_config` keeps the original dict."""

    model_type: str
    vocab_size: int
    dim: int  # D, hidden size
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # Hkv (GQA when < H)
    head_dim: int  # Dh (Qwen3: not always D / H)
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_type: str = "default"
    rope_params: dict[str, Any] = field(default_factory=dict)  # factor, low_freq_factor, long_factor, ...
    partial_rotary_factor: float = 1.0  # rotary dim R = int(Dh * factor); Phi-4-mini uses 0.75
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layer_windows: tuple[int | None, ...] = ()  # sliding window per layer (None: full attention)
    initializer_range: float = 0.02
    pad_token_id: int | None = None  # its embedding row gets no gradient from lookups (as transformers builds it)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_windows:
            self.layer_windows = (None,) * self.n_layers
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of {self.n_kv_heads=}")

    @property
    def rotary_dim(self) -> int:
        """R: how many channels of each head RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def embedding_padding_idx(self) -> int | None:
        """The embedding row whose lookups pass no gradient: `pad_token_id`, as transformers' embedding
        takes it (a negative id counts from the end), or None when there is none or it lies outside the
        vocabulary (transformers cannot build that model; the row simply trains here)."""
        pad = self.pad_token_id
        return pad if pad is not None and -self.vocab_size <= pad < self.vocab_size else None

    @property
    def architecture(self) -> str:
        return _FAMILIES[self.model_type].architecture

    def num_params(self) -> int:
        """Parameter count (embedding and untied head included), without building the model."""
        d, h, hkv, dh, f = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.intermediate_size
        attn = d * (h + 2 * hkv) * dh + h * dh * d
        attn += (h + 2 * hkv) * dh * self.qkv_bias + d * self.o_bias + 2 * dh * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read an HF `config.json` dict. Unknown families and RoPE types are errors that name them."""
        model_type = config.get("model_type")
        if model_type not in _FAMILIES:
            archs = config.get("architectures")
            arch = f" ({', '.join(map(str, archs))})" if isinstance(archs, list) and archs else ""
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}{arch}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _check_not_prequantized(config)
        fam = _FAMILIES[model_type]
        original, config = config, {**_HF_DEFAULTS[model_type], **config}
        get = config.get
        _check_sizes(config, model_type, fam)
        _check_flags(config, fam)
        _check_layer_types(config, fam)
        _check_no_dropout(config, fam)
        act = get("hidden_act", "silu")
        if act not in SILU_NAMES:
            raise UnsupportedModelError(
                f"unsupported config key 'hidden_act' {act!r} (only SiLU is implemented: 'silu' or 'swish')"
            )
        n_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // n_heads
        rope_theta, rope_type, rope_params, partial = read_rope(
            config, model_type, fam.rope_types, head_dim, partial_rotary=fam.partial_rotary
        )

        def flag(spec: bool | str) -> bool:
            return get(spec, False) if isinstance(spec, str) else spec  # a bool: _check_flags checked it

        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            dim=get("hidden_size"),
            n_layers=get("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=get("intermediate_size"),
            norm_eps=_positive_number(config, "rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings"),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope_params,
            partial_rotary_factor=partial,
            tie_word_embeddings=get("tie_word_embeddings", False),
            qkv_bias=flag(fam.qkv_bias),
            o_bias=flag(fam.o_bias),
            mlp_bias=flag(fam.mlp_bias),
            qk_norm=fam.qk_norm,
            fused_qkv=fam.fused,
            fused_gate_up=fam.fused,
            layer_windows=_layer_windows(config, fam.window),
            initializer_range=_positive_number(config, "initializer_range", 0.02),
            pad_token_id=_pad_token_id(config),
            hf_config=copy.deepcopy(original),
        )

    def to_hf_config(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The `config.json` to write next to saved weights: the loaded dict, kept as it was read, with the
        weights' dtype under both names transformers has read (`dtype` since 4.56, `torch_dtype` before)."""
        cfg = copy.deepcopy(self.hf_config)
        cfg.setdefault("architectures", [self.architecture])
        if torch_dtype is not None:
            cfg["dtype"] = cfg["torch_dtype"] = torch_dtype
        return cfg


def hf_default(model_type: Any, key: str) -> Any:
    """transformers' default for `key` in the config of `model_type`, for a config.json without the key."""
    return _HF_DEFAULTS.get(model_type, {}).get(key)


def _check_sizes(config: dict[str, Any], model_type: str, fam: _Family) -> None:
    """A ModelConfigError naming the key unless every size and count the model is built from is a
    positive integer, and the head counts divide as the attention layout needs."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if config.get(key) is None:
            raise ModelConfigError(f"config of model_type {model_type!r} has no {key!r}")
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ):
        value = config.get(key)
        nullable = key not in _NOT_NULL.get(model_type, ()) and key != "max_position_embeddings"
        if (value is not None or not nullable) and not (is_int(value) and value > 0):
            raise ModelConfigError(f"config key {key!r} must be a positive integer, got {value!r}")
    n_heads = config["num_attention_heads"]
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise ModelConfigError(
            f"config key 'num_attention_heads' ({n_heads}) must be a multiple of 'num_key_value_heads' ({n_kv_heads})"
        )
    if not config.get("head_dim") and config["hidden_size"] % n_heads:
        raise ModelConfigError(
            f"config key 'hidden_size' ({config['hidden_size']}) must be a multiple of 'num_attention_heads' "
            f"({n_heads}) when there is no 'head_dim'"
        )
    window = config.get("sliding_window")
    if fam.window != "none" and window is not None and not (is_int(window) and window > 0):
        raise ModelConfigError(f"config key 'sliding_window' must be a positive integer or null, got {window!r}")
    types = config.get("layer_types")
    bad_types = not isinstance(types, list) or len(types) != config["num_hidden_layers"]
    if fam.window == "per_layer" and types is not None and bad_types:
        raise ModelConfigError(
            f"config key 'layer_types' must list one attention type per layer "
            f"({config['num_hidden_layers']} layers), got {types!r}"
        )


def _bool_keys(fam: _Family) -> list[str]:
    """The config.json keys a family reads as true/false."""
    biases = (fam.qkv_bias, fam.o_bias, fam.mlp_bias)
    keys = ["tie_word_embeddings", *(spec for spec in biases if isinstance(spec, str))]
    if fam.window == "per_layer":
        keys.append("use_sliding_window")
    return list(dict.fromkeys(keys))


def _check_flags(config: dict[str, Any], fam: _Family) -> None:
    """A ModelConfigError naming the key unless each boolean key the family reads is a JSON true/false:
    a string "false" would count as true, and transformers refuses anything but a bool too."""
    for key in _bool_keys(fam):
        value = config.get(key, False)
        if not isinstance(value, bool):
            raise ModelConfigError(f"config key {key!r} must be true or false, got {value!r}")


def _check_not_prequantized(config: dict[str, Any]) -> None:
    """An UnsupportedModelError for a checkpoint stored quantized (FP8, GPTQ, AWQ, bitsandbytes...): its
    weights are not the plain floats the model reads, and its scales would be unexpected tensors."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModelError(
            f"config key 'quantization_config' marks a pre-quantized checkpoint (quant_method {method!r}), which "
            "is not supported: load the unquantized model (lora.quantize_base: nf4 quantizes it as it loads)"
        )


def _check_layer_types(config: dict[str, Any], fam: _Family) -> None:
    """A ModelConfigError naming the key and the value for a `layer_types` entry Qwen cannot build (a
    typo would otherwise be a full-attention layer), or a `max_window_layers` that is no layer count."""
    if fam.window != "per_layer":
        return  # Llama, Mistral and Phi-3 never read layer_types (nor does transformers)
    for i, kind in enumerate(config.get("layer_types") or ()):
        if not isinstance(kind, str) or kind not in _LAYER_TYPES:
            raise ModelConfigError(
                f"config key 'layer_types' has {kind!r} for layer {i}; supported: 'full_attention', 'sliding_attention'"
            )
    first = config.get("max_window_layers")
    # read only to type the layers of a window that is on, when layer_types does not: null is no count then
    read = config.get("use_sliding_window") and config.get("sliding_window") and config.get("layer_types") is None
    if (first is not None or read) and not (is_int(first) and first >= 0):
        when = " (it types the layers: use_sliding_window is true and there is no 'layer_types')" * bool(read)
        raise ModelConfigError(f"config key 'max_window_layers' must be an integer >= 0, got {first!r}{when}")


def _check_no_dropout(config: dict[str, Any], fam: _Family) -> None:
    """A ModelConfigError naming the key for a nonzero dropout rate the family's transformers model applies
    in train mode: the model here has no dropout, so it would train silently without it."""
    for key in fam.dropouts:
        rate = config.get(key)
        if rate is not None and not is_number(rate):
            raise ModelConfigError(f"config key {key!r} must be a number, got {rate!r}")
        if rate:
            raise ModelConfigError(
                f"config key {key!r} is {rate!r}: dropout is not implemented (training would silently run "
                "without it); set it to 0.0 in config.json"
            )


def _pad_token_id(config: dict[str, Any]) -> int | None:
    """`pad_token_id` (an integer or null), or a ModelConfigError naming the key."""
    pad = config.get("pad_token_id")
    if pad is not None and not is_int(pad):
        raise ModelConfigError(f"config key 'pad_token_id' must be an integer or null, got {pad!r}")
    return pad


def _positive_number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if not (is_number(value) and value > 0):
        raise ModelConfigError(f"config key {key!r} must be a positive number, got {value!r}")
    return float(value)


def _layer_windows(config: dict[str, Any], rule: str) -> tuple[int | None, ...]:
    n, window = config["num_hidden_layers"], config.get("sliding_window")
    if rule == "global":
        return (window,) * n
    if rule == "per_layer":  # Qwen: the window is off unless use_sliding_window, whatever layer_types say
        window = window if config.get("use_sliding_window", False) else None
        types = config.get("layer_types")
        if types is None:
            first = config.get("max_window_layers", n)
            types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
        return tuple(window if _LAYER_TYPES[t] else None for t in types)
    return (None,) * n
