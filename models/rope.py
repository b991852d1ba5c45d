"""Rotary position embeddings and their context-extension scalings.

Formulas follow the papers and match transformers' numerics (tests compare logits):
- linear: position interpolation (Chen et al., arXiv 2306.15595): inv_freq / factor.
- dynamic: NTK-aware base growth once the sequence exceeds the trained length (bloc97/emozilla).
- yarn: Peng et al., arXiv 2309.00071, §3: ramp between interpolated and extrapolated
  frequencies by wavelength, plus the attention temperature 0.1*ln(s)+1.
- llama3: Llama 3.1 (arXiv 2407.21783) wavelength-banded interpolation.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int):
    """Returns (inv_freq [head_dim/2] fp32, attention_scaling applied to cos/sin).

    `seq_len` only matters for `dynamic`, whose base grows with the sequence actually seen.
    """
    dim = head_dim
    if rope.type == "default":
        return _base_inv_freq(rope.theta, dim), 1.0
    if rope.type == "linear":
        return _base_inv_freq(rope.theta, dim) / rope.factor, 1.0
    if rope.type == "dynamic":
        seq_len = max(seq_len, max_position_embeddings)
        base = rope.theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope.type == "yarn":
        return _yarn(rope, dim)
    if rope.type == "llama3":
        return _llama3(rope, dim), 1.0
    raise ValueError(f"unknown rope type {rope.type!r}")


def _yarn(rope: RopeConfig, dim: int):
    factor, base, original = rope.factor, rope.theta, rope.original_max_position_embeddings
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the trained length.
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope.theta, dim)
    original = rope.original_max_position_embeddings
    low_freq_wavelen = original / rope.low_freq_factor
    high_freq_wavelen = original / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos/sin [B, S, head_dim] for integer positions, computed in fp32 then cast."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def apply_rope(x_BSHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, S, H, D] with cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x_BSHD.shape[-1] // 2
    rotated = torch.cat((-x_BSHD[..., half:], x_BSHD[..., :half]), dim=-1)
    return x_BSHD * cos + rotated * sin
