"""KV-cache quantization: the per-layer `attention.kv_cache_scaling_factor` (the cache's codec is plugins.formats)."""

from __future__ import annotations

import torch

from builder.errors import ConfigError
from plugins.formats import FP8_MAX, INT8_MAX
KV_SCALE_NAME = "kv_cache_scaling_factor"  # full name: transformer.layers.{i}.attention.kv_cache_scaling_factor


def kv_cache_scale(algo: str, k_amax: float, v_amax: float, clamp_fp8: bool = True) -> torch.Tensor:
    """fp32 [1] scale from calibrated K/V amax: INT8 max/127; FP8 max/448, clamped to >= 1.0 like ModelOpt."""
    amax = max(float(k_amax), float(v_amax))
    if amax < 0 or amax != amax:
        raise ConfigError(f"K/V amax must be finite and >= 0, got k={k_amax}, v={v_amax}")
    if algo == "INT8":
        scale = amax / INT8_MAX if amax > 0 else 1.0
    elif algo == "FP8":
        scale = amax / FP8_MAX
        scale = max(scale, 1.0) if clamp_fp8 else (scale if amax > 0 else 1.0)
    else:
        raise ConfigError(f"kv cache algo {algo!r} is not supported; use INT8 or FP8")
    return torch.tensor([scale], dtype=torch.float32)


def rope_safe_amax(k: torch.Tensor, head_size: int) -> float:
    """Bound on |K| after rotate-half RoPE, from pre-RoPE k_proj outputs [..., heads*head_size]."""
    if k.shape[-1] % head_size or head_size % 2:
        raise ConfigError(f"k width {k.shape[-1]} is not a multiple of an even head_size {head_size}")
    heads = k.float().reshape(-1, k.shape[-1] // head_size, head_size)
    half = head_size // 2
    pair_norm = torch.sqrt(heads[..., :half] ** 2 + heads[..., half:] ** 2)
    return float(pair_norm.max()) if pair_norm.numel() else 0.0
