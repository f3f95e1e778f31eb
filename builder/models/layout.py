"""The engine's files, one rank at a time: every tensor of a rank{N}.safetensors (name, dtype, per-rank shape) from the
family's weight table, the tensor-parallel split and the quantization layout. The converter writes this layout and the
runtime and the repository validator check the files against it, each reading it here (not from each other)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from builder.config import ModelConfig
from builder.models import arch_spec
from builder.models.parallel import shard_shape
from builder.quantize.modes import linear_quant_algo
from plugins.formats import TORCH_DTYPES


def expected_weights(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Engine name -> full (unsplit) shape of every float tensor, in write order (the family's weight table)."""
    return {row.engine: row.shape for row in arch_spec(cfg.architecture).weights(cfg)}


KV_SCALE_SUFFIX = "attention.kv_cache_scaling_factor"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a rank{N}.safetensors: name, dtype, per-rank shape, and the float tensor it is made from.

    `source` is the full-model TRT-LLM float tensor (a WeightSpec name) for weights and their quantization
    tensors, or the tensor's own name for a per-layer KV-cache scale.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str


def quantized_linear_layout(algo: str | None, out: int, in_features: int, group_size: int,
                            dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of one rank's linear [out, in] under quant_algo (trtllm-checkpoint.md section 3).

    W8A16/W4A16 keep the float weight (trtllm-build quantizes it); W4A16_AWQ: int8 [out/2, in] packed int4,
    fp32 [out, in/g] group scales, model-dtype [in] prequant scale; FP8: e4m3 [out, in] + fp32 [1] scales.
    """
    if algo == "W4A16_AWQ":
        return [("weight", torch.int8, (out // 2, in_features)),
                ("weights_scaling_factor", torch.float32, (out, in_features // group_size)),
                ("prequant_scaling_factor", dtype, (in_features,))]
    if algo == "FP8":
        return [("weight", torch.float8_e4m3fn, (out, in_features)),
                ("weights_scaling_factor", torch.float32, (1,)),
                ("activation_scaling_factor", torch.float32, (1,))]
    return [("weight", dtype, (out, in_features))]


def rank_layout(cfg: ModelConfig, full_shapes: dict[str, tuple[int, ...]], tp: int) -> list[TensorSpec]:
    """Every tensor of one rank's file, in write order, from the full float shapes (plan_weights/expected_weights).

    The layout is the same on every rank. Quantized linears follow cfg.quantization (exclude_modules honoured);
    with a quantized KV cache each layer also holds `attention.kv_cache_scaling_factor` fp32 [1].
    """
    quant, dtype = cfg.quantization, TORCH_DTYPES[cfg.dtype]
    linears = {row.engine for row in arch_spec(cfg.architecture).weights(cfg) if row.is_linear_weight}
    specs = []
    for name, shape in full_shapes.items():
        module, suffix = name.rsplit(".", 1)
        if quant.kv_cache_quant_algo is not None and module.endswith(".post_layernorm"):
            kv_name = module.removesuffix("post_layernorm") + KV_SCALE_SUFFIX
            specs.append(TensorSpec(kv_name, torch.float32, (1,), kv_name))
        local = shard_shape(name, shape, cfg, tp)
        algo = linear_quant_algo(quant, module) if name in linears else None
        if algo is None:
            specs.append(TensorSpec(name, dtype, tuple(local), name))
            continue
        for part, part_dtype, part_shape in quantized_linear_layout(algo, local[0], local[1], quant.group_size, dtype):
            specs.append(TensorSpec(f"{module}.{part}", part_dtype, part_shape, name))
    return specs
