"""A linear layer of one tensor-parallel rank with its quantization method: the shared linear of every family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import plugins
from builder.errors import ConfigError
from builder.quantize.weight_only import weight_only_bits, weight_only_quantize
from plugins import LinearOp
from plugins.formats import unpack_int4


@dataclass
class Linear:
    """One linear layer of this rank: its weight prepared for the GEMM that runs it, and its bias.

    Unquantized layers hold the checkpoint weight (torch's F.linear). Quantized layers hold a plugins.LinearOp:
      W8A16 / W4A16  the float checkpoint weight quantized per output channel with TensorRT-LLM's quantizer
                     (weight_only_quantize: amax/128 or amax/8, scale in the model dtype); under tensor parallelism a
                     row-parallel shard uses the amax of its whole rows (all-reduced), so TP=N runs exactly the TP=1
                     weights (trtllm-build takes each rank's own amax instead: decisions.md);
      W4A16_AWQ      the checkpoint's packed int4 values and group scales (cast to the model dtype as trtllm-build
                     does); the activations are multiplied by prequant_scaling_factor in every forward;
      FP8            the e4m3 weight values; every forward quantizes the activations with the static
                     activation_scaling_factor and rescales by activation * weight scale.
    On CPU (and for float32 engines) the op holds the weight dequantized in the model dtype (int * scale rounded to
    the dtype, as the weight-only kernels dequantize) and runs the torch reference; on CUDA in fp16/bf16 it keeps the
    int8 / int4 / e4m3 weight and runs the GPU kernels (plugins/linear.py).
    """

    weight: torch.Tensor | LinearOp
    bias: torch.Tensor | None = None

    @classmethod
    def load(cls, weights: dict[str, torch.Tensor], module: str, algo: str | None, group_size: int,
             dtype: torch.dtype, row_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "Linear":
        """Build module's linear from the rank's checkpoint tensors (`module`.weight, .bias, scales).

        row_amax, for a row-parallel shard under tensor parallelism, turns the shard's per-row amax into the whole
        rows' amax (an all-reduce max over the ranks)."""
        weight, bias = weights[module + ".weight"], weights.get(module + ".bias")
        if algo is None:
            return cls(weight, bias)
        if algo in ("W8A16", "W4A16"):
            amax = None if row_amax is None else row_amax(weight.float().abs().amax(dim=1))
            bits = weight_only_bits(algo)
            q, scale = weight_only_quantize(weight, bits, dtype, amax)
            return cls(plugins.prepare_weight_only(q, scale[:, None], q.shape[1], bits, dtype), bias)
        if algo == "W4A16_AWQ":
            scales = weights[module + ".weights_scaling_factor"]
            q = unpack_int4(weight)
            if scales.shape[1] * group_size != q.shape[1]:
                raise ConfigError(f"{module}: {scales.shape[1]} scale groups for {q.shape[1]} inputs do not match "
                                  f"group_size {group_size}; rebuild the engine")
            return cls(plugins.prepare_weight_only(q, scales.to(dtype), group_size, 4, dtype,
                                                   weights[module + ".prequant_scaling_factor"]), bias)
        if algo == "FP8":
            return cls(plugins.prepare_fp8(weight, weights[module + ".activation_scaling_factor"],
                                           weights[module + ".weights_scaling_factor"], dtype), bias)
        raise ConfigError(f"quant_algo {algo!r} is not supported by this runtime; rebuild with `builder build`")

    def __call__(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x @ weight^T (+ bias unless with_bias is False)."""
        bias = self.bias if with_bias else None
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight, bias)
        return self.weight(x, bias)
