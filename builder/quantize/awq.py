"""AWQ (activation-aware weight quantization) for W4A16_AWQ: per-input-channel scale search and export tensors.

Checkpoint tensors of one linear (ModelOpt's TensorRT-LLM export layout):
  weight                  int8 [out/2, in]  Q(W * s), int4 packed two adjacent output rows per byte
  weights_scaling_factor  fp32 [out, in/g]  (r * amax)/7 of each group of W * s, clip ratio r from AWQ's clip search
  prequant_scaling_factor model dtype [in]  1/s, multiplied into the activations before the GEMM
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from builder.errors import ConfigError
from builder.quantize.weight_only import (clipped_groupwise_scales, fake_quantize_int4_groupwise, pack_int4,
                                          quantize_int4_groupwise)
from plugins.formats import dequantize_int4_groupwise, unpack_int4

SCALE_CLAMP = (1e-4, 1e4)


def default_alphas(step: float = 0.05) -> list[float]:
    """The alpha grid 0, step, ..., 1 searched by awq_search."""
    n = round(1.0 / step)
    return [i / n for i in range(n + 1)]


@dataclass
class AwqScales:
    """Result of the AWQ search for the linears sharing one input."""

    scales: torch.Tensor  # s, fp32 [in]: weights are stored as Q(W * s), activations are multiplied by 1/s
    alpha: float          # the exponent chosen: s = mean|x| ** alpha (normalised)
    loss: float           # mean squared output error on the calibration rows with these scales
    plain_loss: float     # the same error for plain group-wise int4 (s = 1)


def scales_for_alpha(x_abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x| ** alpha, clamped and normalised so that sqrt(max(s) * min(s)) = 1."""
    s = x_abs_mean.float().clamp(min=SCALE_CLAMP[0]).pow(alpha).clamp(*SCALE_CLAMP)
    return s / torch.sqrt(s.max() * s.min())


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean squared difference of x @ weight^T and x @ approx^T."""
    return float(((x @ (approx - weight).t()) ** 2).mean())


def awq_search(weights: Sequence[torch.Tensor], x: torch.Tensor, group_size: int,
               x_abs_mean: torch.Tensor | None = None, alphas: Sequence[float] | None = None) -> AwqScales:
    """Grid-search alpha minimising ||X W^T - X (Q(W s) / s)^T|| jointly over linears that share input X.

    The error is accumulated over the weights and SEARCH_CHUNK_ROWS output rows at a time (group-wise int4 is per
    row), so the search never holds more than a few row chunks in float32, whatever the layer size.
    """
    in_features = weights[0].shape[1]
    x = x.detach().float().reshape(-1, in_features)
    if x.shape[0] == 0:
        raise ConfigError("AWQ needs calibration activations; the sample is empty (check --calib-data)")
    mean = x.abs().mean(dim=0) if x_abs_mean is None else x_abs_mean.float()
    best: tuple[float, float, torch.Tensor] | None = None
    plain = _grouped_error(weights, x, group_size, None)
    for alpha in default_alphas() if alphas is None else alphas:
        s = scales_for_alpha(mean, alpha)
        loss = plain if alpha == 0 else _grouped_error(weights, x, group_size, s)
        if best is None or loss < best[0]:
            best = (loss, float(alpha), s)
    if best is None:
        raise ConfigError("AWQ alpha grid is empty; pass at least one alpha")
    return AwqScales(scales=best[2], alpha=best[1], loss=best[0], plain_loss=plain)


SEARCH_CHUNK_ROWS = 4096


def _grouped_error(weights: Sequence[torch.Tensor], x: torch.Tensor, group_size: int,
                   s: torch.Tensor | None) -> float:
    """output_error of X against the concatenated weights quantized as Q(W s)/s (plain int4 when s is None)."""
    total, rows = 0.0, 0
    for weight in weights:
        for start in range(0, weight.shape[0], SEARCH_CHUNK_ROWS):
            w = weight[start:start + SEARCH_CHUNK_ROWS].detach().float()
            approx = fake_quantize_int4_groupwise(w, group_size) if s is None else \
                fake_quantize_int4_groupwise(w * s, group_size) / s
            total += float(((x @ (approx - w).t()) ** 2).sum())
            rows += w.shape[0]
    return total / (x.shape[0] * rows)


def quantize_awq(weight: torch.Tensor, group_size: int, scales: torch.Tensor | None,
                 dtype: torch.dtype = torch.float16, x_abs_mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """W4A16_AWQ tensors of one linear; scales=None stores plain group-wise int4 (prequant scale 1).

    x_abs_mean [in] (calibration mean |x| per input channel) makes the clip search activation-aware: the error of
    input channel j of W * s is weighted by (mean|x_j| / s_j)^2, the activation it meets after the prequant scale.
    """
    weight, in_features = weight.detach(), weight.shape[1]
    s = torch.ones(in_features) if scales is None else scales.float()
    if s.shape != (in_features,):
        raise ConfigError(f"AWQ scales have shape {tuple(s.shape)}, expected ({in_features},)")
    pre_quant = (1.0 / s).to(dtype)
    scaled = weight.float() / pre_quant.float()  # W * s, with s exactly the inverse of the stored prequant scale
    channel_weight = None if x_abs_mean is None else (x_abs_mean.float() * pre_quant.float()) ** 2
    w_scales = clipped_groupwise_scales(scaled, group_size, channel_weight)
    return {
        "weight": pack_int4(quantize_int4_groupwise(scaled, w_scales)),
        "weights_scaling_factor": w_scales,
        "prequant_scaling_factor": pre_quant,
    }


def dequantize_awq(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Effective float32 weight [out, in] of W4A16_AWQ tensors (dequantized Q(W s), times 1/s per input)."""
    q = unpack_int4(tensors["weight"])
    w = dequantize_int4_groupwise(q, tensors["weights_scaling_factor"])
    return w * tensors["prequant_scaling_factor"].float()[None, :]
