"""GPU quantized linear ops (fp16/bf16 on CUDA), prepared once at load and picked per call by the row count M.

    Int8Linear   W8A16 per channel: plugins.gpu.int8_gemm for every M.
    Int4Linear   W4A16 per channel or AWQ groups: torch's tinygemm (torch._weight_int4pack_mm) at M = 1 for bf16,
                 our Triton kernel (plugins.gpu.int4_gemm) otherwise.
    Fp8Linear    FP8 W8A8 per tensor: plugins.gpu.fp8_gemm's `auto` (Triton GEMV for M <= 4, quantize +
                 torch._scaled_mm above).

The choices follow the H100 sweep in docs/kernels-h100.md (Llama-3-8B shapes): tinygemm is 2x faster than our INT4
kernel at M = 1 and 2-4x slower from M = 16; our INT4 / INT8 kernels beat bf16 cuBLAS up to M ~ 64 and lose 2-2.5x at
M = 256 (large-M prefill of weight-only engines pays that; a dequantize-then-cuBLAS path is the known fix).
An INT4 layer therefore holds two packed copies of its weight on bf16 engines (ours and tinygemm's): 1 byte per
weight in all, still half of bf16; every call reads one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plugins.gpu.fp8_gemm import fp8_linear
from plugins.gpu.int4_gemm import Int4Weight, int4_linear, make_int4_weight
from plugins.gpu.int8_gemm import int8_linear

TINYGEMM_GROUPS = (32, 64, 128, 256)  # group sizes torch._weight_int4pack_mm supports
TINYGEMM_INNER_K_TILES = 8


@dataclass
class Int8Linear:
    """W8A16: int8 weight [out, in] and per-output-channel scale [out] in the model dtype."""

    weight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def prepare(cls, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> "Int8Linear":
        """From int8 values [out, in] and scales [out, 1]."""
        return cls(q.contiguous(), scales.reshape(-1).to(dtype).contiguous())

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ (q * scale)^T + bias."""
        return int8_linear(x, self.weight, self.scale, bias)


def tinygemm_pack(q: torch.Tensor, scales: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(packed weight, scales_and_zeros, group) for torch._weight_int4pack_mm, or None where it does not apply.

    tinygemm dequantizes (u - 8) * scale + zero with u in [0, 15]; the symmetric int4 q in [-8, 7] maps to u = q + 8
    with zero = 0. Per-channel scales (one group of all inputs) are repeated over groups of 128."""
    out_features, in_features = q.shape
    if dtype != torch.bfloat16 or out_features % 8 or in_features % (TINYGEMM_INNER_K_TILES * 16):
        return None
    if group_size not in TINYGEMM_GROUPS:
        if scales.shape[1] != 1:
            return None
        group_size = 128
        scales = scales.expand(out_features, in_features // group_size)
    u = (q.to(torch.int32) + 8)
    packed = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    try:
        weight = torch._convert_weight_to_int4pack(packed.contiguous(), TINYGEMM_INNER_K_TILES)
    except (RuntimeError, NotImplementedError):
        return None  # this torch build has no CUDA tinygemm for the shape
    s = scales.to(dtype).t().contiguous()  # [groups, out]
    scales_and_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
    return weight, scales_and_zeros, group_size


@dataclass
class Int4Linear:
    """W4A16 (per channel or AWQ groups): our packed weight, tinygemm's pack for M = 1 (bf16), AWQ pre-quant scale."""

    weight: Int4Weight
    pre_quant_scale: torch.Tensor | None
    tinygemm: tuple[torch.Tensor, torch.Tensor, int] | None

    @classmethod
    def prepare(cls, q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
                pre_quant_scale: torch.Tensor | None) -> "Int4Linear":
        """From int4 values int8 [out, in] and scales [out, in / group_size] (one group of `in` per channel)."""
        group = group_size if scales.shape[1] > 1 else q.shape[1]
        pre = None if pre_quant_scale is None else pre_quant_scale.to(dtype).contiguous()
        return cls(make_int4_weight(q, scales, group, dtype), pre, tinygemm_pack(q, scales, group, dtype))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(x * pre_quant_scale) @ W^T + bias."""
        rows = x.numel() // x.shape[-1]
        if rows == 1 and self.tinygemm is not None:
            packed, scales_and_zeros, group = self.tinygemm
            x2 = x.reshape(1, -1)
            if self.pre_quant_scale is not None:
                x2 = x2 * self.pre_quant_scale
            y = torch._weight_int4pack_mm(x2.contiguous(), packed, group, scales_and_zeros)
            if bias is not None:
                y = y + bias
            return y.view(*x.shape[:-1], self.weight.out_features)
        return int4_linear(x, self.weight, bias, self.pre_quant_scale)


@dataclass
class Fp8Linear:
    """FP8 W8A8: e4m3 weight [out, in], static activation and weight scales (fp32 [1])."""

    weight: torch.Tensor
    input_scale: torch.Tensor
    weight_scale: torch.Tensor

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """quantize(x) @ W^T * input_scale * weight_scale + bias."""
        return fp8_linear(x, self.weight, self.input_scale, self.weight_scale, bias)


__all__ = ["Fp8Linear", "Int4Linear", "Int8Linear", "tinygemm_pack"]
