"""Hand-written kernels, each with its torch reference; imported as `minigrpo.kernels`."""

from ._triton import HAS_TRITON
from .cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_ref
from .flash_decode import decode_attention, decode_attention_ref
from .kv_write import rotary_into_cache, rotary_into_cache_ref
from .logprobs import fused_linear_logprobs, linear_logprobs_ref
from .policy_head import fused_linear_token_loss, linear_token_loss_ref
from .rmsnorm import rms_norm, rms_norm_ref
from .rope import apply_rotary, rotary_ref
from .sampling import sample_race, sample_race_ref
from .swiglu import swiglu, swiglu_halves, swiglu_ref
from .token_loss import clipped_token_loss, clipped_token_loss_and_grad

__all__ = [
    "HAS_TRITON",
    "apply_rotary",
    "clipped_token_loss",
    "clipped_token_loss_and_grad",
    "decode_attention",
    "decode_attention_ref",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_token_loss",
    "linear_cross_entropy_ref",
    "linear_logprobs_ref",
    "linear_token_loss_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_into_cache",
    "rotary_into_cache_ref",
    "rotary_ref",
    "sample_race",
    "sample_race_ref",
    "swiglu",
    "swiglu_halves",
    "swiglu_ref",
]
