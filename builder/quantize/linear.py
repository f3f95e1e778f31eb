"""One entry point per direction: float linear weight -> checkpoint tensors, checkpoint tensors -> float weight.

Call per linear and per rank while streaming: split the float weight for the rank first, then quantize it with
statistics taken on the whole (unsplit) layer, so every rank shares them as ModelOpt's TP split does:
FP8 `weight_amax` = tensor_amax over the full fused weight (q,k,v together; fc and gate together), AWQ `awq_scales`
= the full search result for column-parallel linears, its slice [rank*in/tp:(rank+1)*in/tp] for row-parallel ones.
"""

from __future__ import annotations

import torch

from builder.errors import ConfigError
from builder.quantize.awq import dequantize_awq, quantize_awq
from builder.quantize.calibrate import ActivationStats
from builder.quantize.fp8 import dequantize_fp8, fp8_linear_reference, quantize_fp8
from builder.quantize.weight_only import weight_only_bits, weight_only_quantize
from plugins.formats import weight_only_dequantize

LINEAR_ALGOS = (None, "W8A16", "W4A16", "W4A16_AWQ", "FP8")


def quantize_linear(weight: torch.Tensor, algo: str | None, *, group_size: int = 128,
                    dtype: torch.dtype = torch.float16, act_stats: ActivationStats | None = None,
                    awq_scales: torch.Tensor | None = None, awq_x_abs_mean: torch.Tensor | None = None,
                    weight_amax: float | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (suffix after the module name -> tensor) of one linear weight [out, in]."""
    _check_algo(algo)
    weight = weight.detach()
    if algo in (None, "W8A16", "W4A16"):
        # W8A16/W4A16: trtllm-build quantizes float weights itself (decisions.md, "Quantization").
        return {"weight": weight.to(dtype)}
    if algo == "W4A16_AWQ":
        return quantize_awq(weight, group_size, awq_scales, dtype, awq_x_abs_mean)
    if act_stats is None:
        raise ConfigError("FP8 needs calibrated activation statistics for every quantized linear; "
                          "run calibration (--calib-data) or exclude the layer")
    return quantize_fp8(weight, act_stats.input_amax, weight_amax)


def dequantize_linear(tensors: dict[str, torch.Tensor], algo: str | None, group_size: int = 128) -> torch.Tensor:
    """Float32 weight [out, in] that the quantized linear effectively multiplies by (runtime reference math)."""
    _check_algo(algo)
    if algo is None:
        return tensors["weight"].float()
    if algo in ("W8A16", "W4A16"):
        q, scale = weight_only_quantize(tensors["weight"], weight_only_bits(algo), tensors["weight"].dtype)
        return weight_only_dequantize(q, scale)
    if algo == "W4A16_AWQ":
        _check_awq_groups(tensors, group_size)
        return dequantize_awq(tensors)
    return dequantize_fp8(tensors)


def reference_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], algo: str | None, group_size: int = 128,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) in float32 as the quantized engine computes it (FP8 also quantizes x)."""
    if algo == "FP8":
        return fp8_linear_reference(x, tensors, bias)
    y = x.float() @ dequantize_linear(tensors, algo, group_size).t()
    return y if bias is None else y + bias.float()


def _check_awq_groups(tensors: dict[str, torch.Tensor], group_size: int) -> None:
    """Raise ConfigError when the AWQ scales do not have one column per group of group_size inputs."""
    in_features, groups = tensors["weight"].shape[1], tensors["weights_scaling_factor"].shape[1]
    if groups * group_size != in_features:
        raise ConfigError(f"W4A16_AWQ tensors have {groups} scale groups for {in_features} inputs, which does not "
                          f"match group_size {group_size}; the checkpoint's config.json and weights disagree")


def _check_algo(algo: str | None) -> None:
    """Raise ConfigError for a quant_algo this module cannot produce."""
    if algo not in LINEAR_ALGOS:
        raise ConfigError(f"quant_algo {algo!r} is not supported; use one of "
                          f"{', '.join(str(a) for a in LINEAR_ALGOS)}")
