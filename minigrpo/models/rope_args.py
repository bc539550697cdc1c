"""RoPE settings of a config.json, from either key style, checked before a model is built.

Older checkpoints write `rope_theta` plus `rope_scaling` (with `type` or `rope_type`), recent
transformers writes `rope_parameters` (`rope_type`, `rope_theta`); both read as one mapping here.
"""

from __future__ import annotations

from typing import Any

from minigrpo.models.config_checks import ModelConfigError, UnsupportedModelError, first_set, is_number

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def read_rope(
    config: dict[str, Any], model_type: str, supported: tuple[str, ...], head_dim: int, partial_rotary: bool
) -> tuple[float, str, dict[str, Any], float]:
    """(rope_theta, rope_type, scaling params, partial_rotary_factor) from either key style, each checked:
    `supported` are the family's RoPE types; without `partial_rotary` the whole head turns."""
    rope_theta, rope_type, params, partial = _read_keys(config, model_type, supported)
    partial = partial if partial_rotary else _whole_head_factor(model_type, rope_type, head_dim, partial)
    _check_rotary_dim(config, head_dim, partial)
    _check_scaling_keys(rope_type, params, int(head_dim * partial) // 2)
    return rope_theta, rope_type, params, partial


def _read_keys(
    config: dict[str, Any], model_type: str, supported: tuple[str, ...]
) -> tuple[float, str, dict[str, Any], float]:
    """(rope_theta, rope_type, scaling params, partial_rotary_factor) as config.json writes them."""
    params = _rope_mapping(config)
    rope_type = params.pop("rope_type", None) or "default"
    rope_theta = first_set(params.pop("rope_theta", None), config.get("rope_theta"), 10000.0)
    if not (is_number(rope_theta) and rope_theta > 0):
        raise ModelConfigError(f"config key 'rope_theta' must be a positive number, got {rope_theta!r}")
    partial = first_set(params.pop("partial_rotary_factor", None), config.get("partial_rotary_factor"), 1.0)
    if not (is_number(partial) and 0 < partial <= 1):
        raise ModelConfigError(f"config key 'partial_rotary_factor' must be in (0, 1], got {partial!r}")
    rope_theta, partial = float(rope_theta), float(partial)
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's early names for LongRoPE
        rope_type = "longrope"
    if rope_type not in supported:
        key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rope_type!r} (config key {key!r}) for model_type {model_type!r}; "
            f"supported: {', '.join(supported)}" + (" (su and yarn read as longrope)" if model_type == "phi3" else "")
        )
    if rope_type in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pretraining length at the top level; it takes priority there.
        orig = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = orig or config.get("max_position_embeddings")
    required = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor",),
        "longrope": ("long_factor", "short_factor"),
    }.get(rope_type, ())
    # as transformers: a null yarn factor is max_position_embeddings / original (rotary.py), a missing one an error
    missing = [k for k in required if k not in params or (params[k] is None and (rope_type, k) != ("yarn", "factor"))]
    if missing:
        raise ModelConfigError(f"rope scaling type {rope_type!r} needs {missing} in config.json")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        value = params.get(key)
        if value is not None and not (is_number(value) and value > 0):
            raise ModelConfigError(f"rope scaling key {key!r} must be a positive number, got {value!r}")
    return rope_theta, rope_type, params, partial


def _whole_head_factor(model_type: str, rope_type: str, head_dim: int, partial: float) -> float:
    """1.0 (the whole head turns) outside Phi-3: transformers ignores partial_rotary_factor under default RoPE,
    but its scaled variants make R/2 frequencies for Dh/2 pairs and fail, so a factor below 1 is refused there."""
    if rope_type != "default" and int(head_dim * partial) != head_dim:
        raise ModelConfigError(
            f"config key 'partial_rotary_factor' ({partial}) with rope scaling type {rope_type!r} cannot be built for "
            f"model_type {model_type!r} (transformers fails on it; only default RoPE ignores it): remove it or set 1.0"
        )
    return 1.0


def _check_scaling_keys(rope_type: str, params: dict[str, Any], pairs: int) -> None:
    """A ModelConfigError naming the key for an optional yarn / longrope parameter of the wrong type (a string
    would fail later in rotary.py), or longrope factors that are not one number per rotary pair."""
    if rope_type == "longrope":
        for key in ("long_factor", "short_factor"):
            factors = params[key]
            if not isinstance(factors, list) or len(factors) != pairs or not all(map(is_number, factors)):
                raise ModelConfigError(
                    f"rope scaling key {key!r} must list {pairs} numbers (one per rotary pair), got {factors!r}"
                )
    numbers = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"), "longrope": ()}.get(rope_type)
    if numbers is None:
        return  # the other types read none of these keys (nor does transformers)
    for key in (*numbers, "attention_factor"):
        value = params.get(key)
        positive = key == "attention_factor"
        if value is not None and not (is_number(value) and (value > 0 if positive else value >= 0)):
            need = "a positive number" if positive else "a number >= 0 (0: the default)"
            raise ModelConfigError(f"rope scaling key {key!r} must be {need} or null, got {value!r}")
    if rope_type == "yarn" and not isinstance(params.get("truncate", True), bool):
        raise ModelConfigError(f"rope scaling key 'truncate' must be true or false, got {params['truncate']!r}")


def _check_rotary_dim(config: dict[str, Any], head_dim: int, partial: float) -> None:
    """A ModelConfigError naming the key when RoPE would rotate a whole head of an odd size: it turns
    channels in pairs (transformers refuses the same configs)."""
    if int(head_dim * partial) == head_dim and head_dim % 2:
        key = "head_dim" if config.get("head_dim") else "hidden_size' / 'num_attention_heads"
        raise ModelConfigError(f"config key '{key}' gives an odd head size {head_dim}: RoPE rotates channel pairs")


def _rope_mapping(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE keys of either style as one dict. With both keys set, transformers reads `rope_scaling`
    alone (rope_parameters' rope_theta too is dropped): where they differ, that is an error naming the key."""
    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise ModelConfigError(f"config key {key!r} must be a mapping or null, got {config[key]!r}")
    for key in ("rope_parameters", "rope_scaling"):
        nested = [name for name, value in (config.get(key) or {}).items() if isinstance(value, dict)]
        if nested:  # read flat, its type and theta would silently be the defaults
            raise ModelConfigError(
                f"config key {key!r} nests parameters per layer type ({nested[0]!r}), which this model does not "
                "read: give one flat mapping (rope_type, rope_theta, ...) for all layers"
            )
    parameters, scaling = (_typed(config.get(key) or {}) for key in ("rope_parameters", "rope_scaling"))
    if parameters and scaling:
        for key in sorted(parameters.keys() | scaling.keys()):
            if parameters.get(key) != scaling.get(key):
                raise ModelConfigError(
                    f"config keys 'rope_parameters' and 'rope_scaling' disagree on {key!r} "
                    f"({parameters.get(key)!r} vs {scaling.get(key)!r}); keep one of the two"
                )
    return {**parameters, **scaling}


def _typed(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of RoPE params with the older `type` key read as `rope_type` (which wins if both are set)."""
    out = {k: v for k, v in params.items() if k != "type"}
    if out.get("rope_type") is None and params.get("type") is not None:
        out["rope_type"] = params["type"]
    return out
