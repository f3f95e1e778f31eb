"""Quantized linear layers prepared once at load: a weight description in, a callable op `op(x, bias)` out.

    op = plugins.prepare_weight_only(q, scales, group_size, dtype, pre_quant_scale)   # W8A16 / W4A16 / W4A16_AWQ
    op = plugins.prepare_fp8(weight_e4m3, input_scale, weight_scale, dtype)            # FP8 W8A8, per tensor
    y = op(x, bias)

On CPU (and for float32 engines on any device) the op is the torch reference: the weight is dequantized once and
held in the model dtype, and every call runs plugins.reference.quantized_linear. For fp16/bf16 on CUDA the op keeps
the compact weight and runs the Triton / cuBLAS kernels of plugins.gpu.linear, picked per call by the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from plugins.formats import dequantize_int4_groupwise
from plugins import reference

GPU_DTYPES = (torch.float16, torch.bfloat16)  # dtypes the GPU kernels serve; float32 runs the reference ops
INT4_KERNEL_K_MULTIPLE = 128  # plugins.gpu.int4_gemm packs K in chunks of 128


class LinearOp(Protocol):
    """A prepared linear layer: y = x W^T + bias in x's dtype."""

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...


def uses_gpu_kernels(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when ops on `tensor` in `dtype` run the GPU kernels (CUDA, fp16/bf16), else the torch reference."""
    return tensor.is_cuda and dtype in GPU_DTYPES


@dataclass
class ReferenceLinear:
    """The reference quantized GEMM over a weight held dequantized (or as exact e4m3 values) in the model dtype."""

    weight: torch.Tensor
    pre_quant_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """plugins.reference.quantized_linear with this layer's scales."""
        return reference.quantized_linear(x, self.weight, bias, self.pre_quant_scale, self.input_scale,
                                          self.weight_scale)


def dequantize_weight_only(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int values [out, in] times their group scales [out, groups] (one group: per channel), computed in float32 and
    rounded once to dtype."""
    return dequantize_int4_groupwise(q, scales).to(dtype)


def prepare_weight_only(q: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype,
                        pre_quant_scale: torch.Tensor | None = None) -> LinearOp:
    """A W8A16 / W4A16 (per channel: one group of all inputs) or W4A16_AWQ (groups of group_size) linear.

    q: int8 [out, in] holding the int8 or int4 values; scales: [out, in / group_size] in the model dtype (the
    dequantized weight is q * scale rounded to dtype, as TensorRT-LLM's weight-only kernels compute it);
    pre_quant_scale [in] (AWQ) multiplies the activations first."""
    if uses_gpu_kernels(q, dtype):
        from plugins.gpu.linear import Int4Linear, Int8Linear

        if bits == 8:
            return Int8Linear.prepare(q, scales, dtype)
        if q.shape[1] % INT4_KERNEL_K_MULTIPLE == 0 and (scales.shape[1] == 1 or group_size % 64 == 0):
            return Int4Linear.prepare(q, scales, group_size, dtype, pre_quant_scale)
        # shapes the INT4 kernel does not take (in_features not a multiple of 128): the reference GEMM
    return ReferenceLinear(dequantize_weight_only(q, scales, dtype), pre_quant_scale=pre_quant_scale)


def prepare_fp8(weight: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                dtype: torch.dtype) -> LinearOp:
    """An FP8 W8A8 linear: e4m3 weight [out, in], static per-tensor activation and weight scales (fp32 [1])."""
    if uses_gpu_kernels(weight, dtype):
        from plugins.gpu.linear import Fp8Linear

        return Fp8Linear(weight.contiguous(), input_scale.float(), weight_scale.float())
    return ReferenceLinear(weight.to(dtype), input_scale=input_scale, weight_scale=weight_scale)
