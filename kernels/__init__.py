"""Hand-written kernels, each with its torch reference; imported as `minigrpo.kernels`."""

from ._triton import HAS_TRITON
from .rmsnorm import rms_norm, rms_norm_ref
from .rope import apply_rotary, rotary_ref

__all__ = ["HAS_TRITON", "apply_rotary", "rms_norm", "rms_norm_ref", "rotary_ref"]
