"""RoPE inverse frequencies for each `model.rope_scaling.type`, equal to Hugging Face transformers'.

Megatron-Core's RotaryEmbedding knows only plain RoPE and a llama3 variant with fixed constants
(low/high frequency factors 1 and 4, original context 8192), and its YaRN embedding belongs to
Multi-Latent Attention configs. The trainer therefore builds the plain RotaryEmbedding and replaces
its inverse frequencies with the ones computed here, from the formulas of each method:

- linear: every frequency divided by the factor (position interpolation);
- llama3: wavelengths longer than original / low_freq_factor divided by the factor, shorter than
  original / high_freq_factor kept, a linear blend in between (Llama 3.1);
- yarn: per-dimension blend of interpolated and original frequencies over the correction range
  [beta_fast, beta_slow] rotations, plus an attention factor that multiplies cos and sin.

YaRN's attention factor multiplies both rotated queries and keys, so it scales every attention
score by its square: the model applies it as the softmax scale factor^2 / sqrt(head_dim)
(`attention_softmax_scale`). tests/test_convert_families.py compares these frequencies with
transformers' rope init functions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kumihimo.pretrain.config import ModelConfig


def plain_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _llama3(inv_freq: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    scaling = model.rope_scaling
    original = scaling.original_max_position_embeddings
    long_wavelength = original / scaling.low_freq_factor  # longer: fully interpolated
    short_wavelength = original / scaling.high_freq_factor  # shorter: kept
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / scaling.factor, inv_freq)
    blend = (original / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - blend) * scaled / scaling.factor + blend * scaled
    between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(between, blended, scaled)


def _yarn(inv_freq: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    scaling = model.rope_scaling
    dim, base = model.head_dim, float(model.rotary_base)

    def dimension_of(rotations: float) -> float:
        # the dimension whose wavelength makes `rotations` turns over the original context
        return (
            dim
            * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-point range would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the original frequency (high frequencies), 0: interpolated
    interpolated = inv_freq / scaling.factor
    return interpolated * (1 - keep) + inv_freq * keep


def rope_inv_freq(model: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (fp32, CPU) of the model's RoPE, scaling included."""
    inv_freq = plain_inv_freq(float(model.rotary_base), model.head_dim)
    kind = model.rope_scaling.type
    if kind == "linear":
        return inv_freq / model.rope_scaling.factor
    if kind == "llama3":
        return _llama3(inv_freq, model)
    if kind == "yarn":
        return _yarn(inv_freq, model)
    return inv_freq


def attention_factor(model: ModelConfig) -> float:
    """The factor RoPE's cos and sin are multiplied by (1 except for YaRN)."""
    scaling = model.rope_scaling
    if scaling.type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return _yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(
            scaling.factor, scaling.mscale_all_dim
        )
    return _yarn_mscale(scaling.factor)


def attention_softmax_scale(model: ModelConfig) -> float | None:
    """Softmax scale carrying YaRN's attention factor (None: the default 1 / sqrt(head_dim))."""
    factor = attention_factor(model)
    if factor == 1.0:
        return None
    return factor**2 / math.sqrt(model.head_dim)
