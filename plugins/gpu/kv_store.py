"""Scatter the step's new K/V rows into the paged caches, quantizing for an INT8 / FP8 KV cache (one Triton kernel).

    store_kv_cache(k, v, k_cache, v_cache, meta, kv_scale=None) -> None

Same signature and results as plugins.reference.store_kv_cache: k / v [T, nkv, d], caches
[num_blocks, tokens_per_block, nkv, d] (the per-layer views of the runtime's KV tensor), slot = block * tpb + offset
from meta.slot_mapping. An int8 cache stores round_half_even(x / kv_scale) saturated to [-128, 127]; a
float8_e4m3fn cache stores x / kv_scale saturated to +-448 and rounded to nearest even (kv_scale: fp32 [1], read on
the device, so the launch never syncs). Slots < 0 are skipped (padding rows of a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import KV_QUANT, next_pow2
from plugins.metadata import AttentionMetadata


@triton.jit
def _quantize(x, scale, QUANT: tl.constexpr):
    """x / scale as int8 (round half to even, saturate) or e4m3 (saturate, round to nearest even)."""
    y = tl.math.div_rn(x.to(tl.float32), scale)
    if QUANT == 1:
        y = tl.clamp(y, -128.0, 127.0)
        y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: round to nearest even in float32 arithmetic
        return y.to(tl.int8)
    else:
        return tl.clamp(y, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, scale_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ks, stride_kch, stride_vs, stride_vch, n_kv, D: tl.constexpr, D_P2: tl.constexpr,
                     BLOCK_H: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D_P2)[None, :]
    mask = (h < n_kv) & (d < D) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    if QUANT != 0:
        scale = tl.load(scale_ptr)
        k = _quantize(k, scale, QUANT)
        v = _quantize(v, scale, QUANT)
    tl.store(kc_ptr + slot * stride_ks + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + slot * stride_vs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _slot_stride(cache: torch.Tensor) -> int:
    """Elements between consecutive slots of a [blocks, tpb, nkv, d] cache (slot = block * tpb + offset)."""
    if cache.stride(0) != cache.shape[1] * cache.stride(1) or cache.stride(3) != 1:
        raise ValueError(f"KV cache strides {cache.stride()} do not allow flat slot indexing")
    return cache.stride(1)


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, kv_scale: torch.Tensor | None = None) -> None:
    """Write k/v [T, nkv, d] into the paged caches at meta.slot_mapping (quantized for int8 / e4m3 caches)."""
    quant = KV_QUANT.get(k_cache.dtype, 0)
    if quant and kv_scale is None:
        raise ValueError(f"a {k_cache.dtype} KV cache needs the layer's kv_cache_scaling_factor")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    tokens, n_kv, d = k.shape
    if not tokens:
        return
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, meta.slot_mapping, kv_scale if quant else k_cache, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), _slot_stride(k_cache), k_cache.stride(2), _slot_stride(v_cache), v_cache.stride(2),
        n_kv, D=d, D_P2=next_pow2(d), BLOCK_H=next_pow2(n_kv), QUANT=quant, num_warps=4)
