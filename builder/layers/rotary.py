"""Rotary position embeddings: inverse frequencies with the rope scalings HF applies (linear, llama3, yarn), the
attention factor some of them put on cos/sin (yarn), and the cos/sin tables the rotary op (plugins.rotary_embedding)
reads. The engine's model and the calibration pass share them."""

from __future__ import annotations

import math

import torch

from builder.config import ModelConfig
from builder.errors import ConfigError


SUPPORTED_SCALINGS = ("linear", "llama3", "yarn")


def _scaling(cfg: ModelConfig) -> tuple[str, dict]:
    """(rope type, its parameters) of cfg's rotary scaling; ("default", {}) without one."""
    scaling = cfg.rotary_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default")), scaling


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Float32 RoPE inverse frequencies [head_size / 2], with linear, llama3 or yarn scaling computed as HF does."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, scaling = _scaling(cfg)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inv_freq(cfg, scaling)
    raise ConfigError(f"rotary_scaling type {kind!r} is not supported; use none, {', '.join(SUPPORTED_SCALINGS)}")


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor the scaling puts on cos and sin (YaRN's mscale; 1 for the others): |K| after RoPE grows by it."""
    kind, scaling = _scaling(cfg)
    if kind != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = _yarn_factor(cfg, scaling), scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_original_len(cfg: ModelConfig, scaling: dict) -> int:
    """The pretraining context YaRN extends (its original_max_position_embeddings, else max_position_embeddings)."""
    return int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)


def _yarn_factor(cfg: ModelConfig, scaling: dict) -> float:
    """The context extension factor (config.json must give it: builder.models.hf_config requires it, as HF does)."""
    return float(scaling["factor"])


def _yarn_inv_freq(cfg: ModelConfig, scaling: dict) -> torch.Tensor:
    """YaRN (NTK-by-parts): dimensions that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those that turn more than beta_fast times are kept, a linear ramp between."""
    dim, base = cfg.head_size, cfg.rotary_base
    factor, original = _yarn_factor(cfg, scaling), _yarn_original_len(cfg, scaling)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by factor, the middle band interpolated."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 cos/sin tables [max_positions, head_size] for rotate-half RoPE (times the scaling's attention
    factor, as HF multiplies them)."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    factor = rope_attention_factor(cfg)
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(device), sin.to(device)
