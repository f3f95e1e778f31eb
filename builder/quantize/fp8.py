"""FP8 (e4m3) per-tensor quantization of weights and activations, as ModelOpt exports and TensorRT-LLM runs it."""

from __future__ import annotations

import torch

from builder.errors import ConfigError
from plugins.formats import FP8_MAX, to_fp8


def tensor_amax(*tensors: torch.Tensor) -> float:
    """Largest |value| over all tensors: the shared amax of a fused qkv or of fc+gate (same input)."""
    if not tensors:
        raise ConfigError("tensor_amax needs at least one tensor")
    return max(float(t.detach().float().abs().max()) for t in tensors)


def fp8_scale(amax: float) -> torch.Tensor:
    """Per-tensor scale fp32 [1] = amax/448 (1.0 when amax is 0, so nothing divides by zero)."""
    if amax < 0 or amax != amax:
        raise ConfigError(f"amax must be a finite value >= 0, got {amax}")
    return torch.tensor([amax / FP8_MAX if amax > 0 else 1.0], dtype=torch.float32)


def quantize_fp8(weight: torch.Tensor, activation_amax: float,
                 weight_amax: float | None = None) -> dict[str, torch.Tensor]:
    """FP8 checkpoint tensors of one linear: weight e4m3 [out, in], weight and activation scales fp32 [1]."""
    weight = weight.detach()
    w_scale = fp8_scale(tensor_amax(weight) if weight_amax is None else weight_amax)
    return {
        "weight": to_fp8(weight, w_scale),
        "weights_scaling_factor": w_scale,
        "activation_scaling_factor": fp8_scale(activation_amax),
    }


def dequantize_fp8(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """FP8 weight times its scale -> float32 [out, in]."""
    return tensors["weight"].float() * tensors["weights_scaling_factor"].float()


def fp8_linear_reference(x: torch.Tensor, tensors: dict[str, torch.Tensor],
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 FP8 GEMM reference: quantize x with the static activation scale, then x_q @ w_q^T, in float32."""
    a_scale = tensors["activation_scaling_factor"].float()
    x_q = to_fp8(x, a_scale).float() * a_scale
    y = x_q @ dequantize_fp8(tensors).t()
    return y if bias is None else y + bias.float()
