"""Rotary frequencies: inverse frequencies per RoPE variant, and cos/sin per (row, position).

The rotation itself is a kernel (`minigrpo.kernels.apply_rotary`); this module only decides the
angles. Variants (facts from the papers / reference implementations):
- default:  inv_freq[i] = theta^(-2i/R)
- linear:   inv_freq / factor
- dynamic:  (NTK) the default frequencies up to max_position_embeddings; a forward whose positions
            go past it, L of them, uses theta * (factor * L / max_pos - (factor - 1))^(R / (R - 2)).
            Chosen per forward from its largest position, without a host sync (transformers keeps the
            longest length it has seen instead, until a forward falls back below max_pos: the two
            agree on every forward of a fresh model). Rollouts stay below max_pos
            (prompt_fit.position_limit), where it is the default RoPE.
- llama3:   low frequencies divided by `factor`, high ones kept, a smooth blend in between
- yarn:     blend of interpolated and extrapolated frequencies over a linear ramp; cos/sin scaled by
            an attention factor (0.1 ln(factor) + 1 unless given)
- longrope: per-frequency factors, `long_factor` once a forward's positions exceed the pretraining
            length and `short_factor` otherwise; cos/sin scaled by sqrt(1 + ln(s) / ln(L_orig)).
            A rollout stays below that length (prompt_fit.position_limit): a KV cache filled with
            the short factors cannot follow a switch to the long ones mid-sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs


def _wavelengths(theta: float, rotary_dim: int) -> torch.Tensor:
    """theta^(2i/R), (R/2,) fp32: each pair's wavelength over 2 pi, the default frequencies' inverse."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return theta**exponents


def _base_inv_freq(theta: float, rotary_dim: int, factors: list[float] | None = None) -> torch.Tensor:
    """theta^(-2i/R), (R/2,) fp32; with `factors` (longrope, one per pair) 1 / (factor_i * theta^(2i/R)),
    rounded as that product (dividing the default frequencies by the factors rounds differently, and
    the angles of positions in the thousands inherit the last-bit difference: 1.5e-4 in cos at 4000)."""
    wavelengths = _wavelengths(theta, rotary_dim)  # (R/2,) fp32
    if factors is not None:
        wavelengths = torch.tensor(factors, dtype=torch.float32) * wavelengths
    return 1.0 / wavelengths


def _dynamic_theta(
    theta: float, rotary_dim: int, factor: float, length: int | torch.Tensor, max_pos: int
) -> float | torch.Tensor:
    """Dynamic NTK's base for a sequence of `length` (>= max_pos) positions: theta itself at max_pos (up to
    rounding). factor * length is divided by max_pos in that order, as the reference does: (factor * (length
    / max_pos)) rounds differently in fp32, by up to 5e-4 in cos past 3000 positions (max_pos 3000, factor 1.7)."""
    return theta * ((factor * length / max_pos) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(theta: float, rotary_dim: int, p: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # the interpolated frequencies rounded as 1 / (factor * theta^(2i/R)), as the reference rounds them:
    # dividing the default ones by a factor such as 3 rounds differently, 1.7e-5 in cos at 131072 positions
    wavelengths = _wavelengths(theta, rotary_dim)  # (R/2,) fp32
    extrapolation, interpolation = 1.0 / wavelengths, 1.0 / (factor * wavelengths)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    return interpolation * (1 - keep) + extrapolation * keep, float(attn)


def _longrope_scale(p: dict, max_pos: int) -> float:
    orig = p["original_max_position_embeddings"]
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor = p.get("factor") or max_pos / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


class RotaryAngles(nn.Module):
    """cos/sin (B, T, R/2) fp32 for given positions, for the model's RoPE variant.

    Holds only small fp32 frequency buffers; recomputed by `reset()` after meta-device init.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        half = args.rotary_dim // 2
        self.register_buffer("inv_freq", torch.empty(half), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(half), persistent=False)
        self.scale = 1.0
        self.long_threshold: int | None = None  # longrope: positions >= this switch to long factors
        self.dynamic_from: int | None = None  # dynamic: sequences longer than this rescale the base

    @torch.no_grad()
    def reset(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequencies in fp32 on `device` (default: where the buffers are)."""
        a, p = self.args, self.args.rope_params
        device = device if device is not None else self.inv_freq.device
        if str(device) == "meta":
            return
        base = _base_inv_freq(a.rope_theta, a.rotary_dim)
        long = base
        if a.rope_type == "linear":
            base = base / p["factor"]
        elif a.rope_type == "dynamic":
            max_pos = self.dynamic_from = a.max_position_embeddings
            theta = _dynamic_theta(a.rope_theta, a.rotary_dim, p["factor"], max_pos, max_pos)
            base = _base_inv_freq(theta, a.rotary_dim)
        elif a.rope_type == "llama3":
            base = _llama3(base, p)
        elif a.rope_type == "yarn":
            base, self.scale = _yarn(a.rope_theta, a.rotary_dim, p, a.max_position_embeddings)
        elif a.rope_type == "longrope":
            long = _base_inv_freq(a.rope_theta, a.rotary_dim, p["long_factor"])
            base = _base_inv_freq(a.rope_theta, a.rotary_dim, p["short_factor"])
            self.scale = _longrope_scale(p, a.max_position_embeddings)
            self.long_threshold = p["original_max_position_embeddings"]
        self.inv_freq = base.to(device)
        self.long_inv_freq = long.to(device)

    def _apply(self, fn, recurse=True):
        """After any .to()/.cuda()/.half(), re-derive the frequencies in fp32 on the new device."""
        super()._apply(fn, recurse)
        self.reset(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) int -> cos, sin (B, T, R/2) fp32."""
        inv_freq = self.inv_freq
        if self.long_threshold is not None:
            # one choice per forward, as the reference does; a tensor op, so no host synchronisation
            use_long = position_ids.max() + 1 > self.long_threshold
            inv_freq = torch.where(use_long, self.long_inv_freq, self.inv_freq)
        if self.dynamic_from is not None:
            inv_freq = self._dynamic_inv_freq(position_ids)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, R/2)
        cos, sin = angles.cos(), angles.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin

    def _dynamic_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """dynamic: the frequencies (R/2,) fp32 for this forward's length, as tensor ops (no host sync)."""
        a = self.args
        length = position_ids.max().long() + 1  # () int64: factor * length is fp32, as in the reference
        factor = a.rope_params["factor"]
        theta = _dynamic_theta(a.rope_theta, a.rotary_dim, factor, length, self.dynamic_from)  # () fp32
        exponents = torch.arange(0, a.rotary_dim, 2, dtype=torch.int64, device=theta.device).float() / a.rotary_dim
        return torch.where(length > self.dynamic_from, 1.0 / theta**exponents, self.inv_freq)
