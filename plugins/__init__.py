"""Model ops with one dispatch point each: paged attention, KV-cache store, RMSNorm, rotary embedding, quantized
linear.

Every op takes and returns plain tensors plus an explicit AttentionMetadata (no global context). `_backend` picks
the implementation from the tensor: fp16/bf16 CUDA tensors run the Triton kernels of `plugins.gpu`; CPU tensors and
float32 (on any device, so float32 engines stay exact: the kernels' dots would run in TF32) run the torch reference
in `plugins.reference`. Quantized linears are prepared once at load (plugins.linear: prepare_weight_only,
prepare_fp8) and pick their kernel the same way.
"""

from __future__ import annotations

from types import ModuleType

import torch

from plugins import reference
from plugins.linear import GPU_DTYPES, LinearOp, prepare_fp8, prepare_weight_only, uses_gpu_kernels
from plugins.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "LinearOp", "fused_add_rms_norm", "paged_attention", "prepare_fp8",
           "prepare_weight_only", "rms_norm", "rotary_embedding", "silu_and_mul", "store_kv_cache",
           "uses_gpu_kernels"]


def _backend(tensor: torch.Tensor) -> ModuleType:
    """plugins.gpu for fp16/bf16 CUDA tensors, plugins.reference otherwise."""
    if tensor.is_cuda and tensor.dtype in GPU_DTYPES:
        import plugins.gpu

        return plugins.gpu
    return reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in float32, cast back to x's dtype, scale by weight."""
    return _backend(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual): the residual add fused into the norm."""
    return _backend(x).fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused [fc | gate] GEMM output y [..., 2I]: silu(y[..., :I]) * y[..., I:]."""
    return _backend(y).silu_and_mul(y)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half (GPT-NeoX) RoPE of q [T, nq, d] and k [T, nkv, d] at `positions` from float32 cos/sin tables."""
    return _backend(q).rotary_embedding(q, k, positions, cos_cache, sin_cache)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, kv_scale: torch.Tensor | None = None) -> None:
    """Write the new tokens' k/v [T, nkv, d] into the paged caches [blocks, tokens_per_block, nkv, d] in place.

    An int8 / float8_e4m3fn cache stores k/v divided by kv_scale (fp32 [1], the layer's kv_cache_scaling_factor),
    rounded and saturated (INT8 / FP8 KV cache)."""
    _backend(k).store_kv_cache(k, v, k_cache, v_cache, meta, kv_scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the flat query batch q [T, nq, d] over each sequence's paged KV (prefill, chunk, decode).

    A quantized (int8 / e4m3) cache is dequantized with kv_scale as it is read."""
    return _backend(q).paged_attention(q, k_cache, v_cache, meta, scale, kv_scale)

