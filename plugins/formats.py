"""Number formats the kernels read and write, at the floor of the import graph (nothing here imports builder).

- dtype names: the one map from a config's dtype name to its torch dtype;
- FP8 e4m3: saturating conversion with a per-tensor scale;
- int4: two signed nibbles per int8 (rows 2r and 2r+1 of one column), group-wise scales;
- per-channel weight-only (W8A16 / W4A16) values times their row scale;
- the quantized KV cache: int8 (round half to even, saturate) or e4m3 (saturate) over a per-layer scale.

Quantizers (builder.quantize) produce these formats; the reference ops and GPU kernels (plugins) consume them.
"""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_MIN, INT4_MAX = -8, 7
KV_CACHE_DTYPES = {"INT8": torch.int8, "FP8": FP8_DTYPE}  # kv_cache_quant_algo -> cache dtype
KV_CACHE_ALGOS = tuple(KV_CACHE_DTYPES)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to +-448 and rounded to float8_e4m3fn."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] of two nibbles each -> signed int4 values as int8 [out, in] (row 2r low, 2r+1 high)."""
    p = packed.to(torch.int16) & 0xFF
    low, high = p & 0x0F, p >> 4
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    out = torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return out.to(torch.int8)


def expand_groups(scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Repeat [out, in/g] group scales to [out, in]."""
    return scales.repeat_interleave(in_features // scales.shape[1], dim=1)


def dequantize_int4_groupwise(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Unpacked int4 values [out, in] times their group scales -> float32 [out, in]."""
    return q.float() * expand_groups(scales.float(), q.shape[1])


def weight_only_dequantize(q: torch.Tensor, per_channel_scale: torch.Tensor) -> torch.Tensor:
    """Int values [out, in] times the per-channel scale [out] -> float32 [out, in]."""
    return q.float() * per_channel_scale.float()[:, None]


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    """K or V values -> int8 (round to nearest even, saturate) or float8_e4m3fn (saturate), divided by scale."""
    y = x.float() / scale.float()
    if algo == "INT8":
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    if algo == "FP8":
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    raise ValueError(f"kv cache algo {algo!r} is not one of {KV_CACHE_ALGOS}")


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cached int8/e4m3 values times the scale, in dtype."""
    return (q.float() * scale.float()).to(dtype)
