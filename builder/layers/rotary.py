"""Rotary position embeddings: inverse frequencies with the rope scalings HF applies, and the cos/sin tables
the rotary op (plugins.rotary_embedding) reads. The engine's model and the calibration pass share them."""

from __future__ import annotations

import math

import torch

from builder.config import ModelConfig
from builder.errors import ConfigError


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Float32 RoPE inverse frequencies [head_size / 2], with linear or llama3 scaling computed as HF does."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rotary_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ConfigError(f"rotary_scaling type {kind!r} is not supported; use none, linear or llama3")


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
    """Float32 cos/sin tables [max_positions, head_size] for rotate-half RoPE."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)
