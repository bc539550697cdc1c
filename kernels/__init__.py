"""Hand-written kernels, each with its torch reference; imported as `minigrpo.kernels`."""

from ._triton import HAS_TRITON
from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_ref
from .logprobs import fused_linear_logprobs, linear_logprobs_ref
from .rmsnorm import rms_norm, rms_norm_ref
from .rope import apply_rotary, rotary_ref

__all__ = [
    "HAS_TRITON",
    "apply_rotary",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "linear_cross_entropy_ref",
    "linear_logprobs_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_ref",
]
