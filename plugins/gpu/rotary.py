"""Rotate-half (GPT-NeoX) rotary embedding of q and k in one Triton kernel (one program per token).

    rotary_embedding(q, k, positions, cos_cache, sin_cache) -> (q_rot, k_rot)

Same signature and rounding as plugins.reference.rotary_embedding: q [T, nq, d], k [T, nkv, d] (any strides with a
contiguous last dim, e.g. views of the fused qkv output), positions int [T], cos/sin float32 tables
[max_positions, d] cast to q's dtype before use; each product is rounded to q's dtype before the add, as torch
does (on the H100 results still differ from torch's by an ulp or two in some elements: tested to relative error
< 3e-3 fp16 / 1e-2 bf16). Returns new contiguous tensors. One kernel instead of ~10 torch ops: 2 us at T <= 256,
89% of copy bandwidth at T = 4096 (docs/kernels-h100.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import next_pow2


@triton.jit
def _rotate(x_ptr, o_ptr, stride_xh, stride_oh, n_heads, c1, c2, s1, s2,
            HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    mask = (h < n_heads) & (d < HALF)
    x1 = tl.load(x_ptr + h * stride_xh + d, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + h * stride_xh + HALF + d, mask=mask, other=0.0)
    dt = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # q * cos + rotate_half(q) * sin with each product rounded to the model dtype first (no fused multiply-add)
    o1 = (x1f * c1).to(dt).to(tl.float32) - (x2f * s1).to(dt).to(tl.float32)
    o2 = (x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)
    tl.store(o_ptr + h * stride_oh + d, o1.to(dt), mask=mask)
    tl.store(o_ptr + h * stride_oh + HALF + d, o2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                 stride_cos, n_q, n_kv, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_P2)[None, :]
    dm = d < HALF
    dt = q_ptr.dtype.element_ty
    c1 = tl.load(cos_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * stride_cos + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * stride_cos + HALF + d, mask=dm, other=0.0).to(dt).to(tl.float32)
    _rotate(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, n_q, c1, c2, s1, s2,
            HALF, HALF_P2, BLOCK_HQ)
    _rotate(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, n_kv, c1, c2, s1, s2,
            HALF, HALF_P2, BLOCK_HK)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q [T, nq, d] and k [T, nkv, d] at positions [T]; returns new (q, k)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_cache.stride(-1) != 1 or sin_cache.stride() != cos_cache.stride():
        cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    tokens, n_q, d = q.shape
    n_kv = k.shape[1]
    q_out = torch.empty((tokens, n_q, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, n_kv, d), dtype=k.dtype, device=k.device)
    if tokens:
        half = d // 2
        _rope_kernel[(tokens,)](
            q, k, positions, cos_cache, sin_cache, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_cache.stride(0), n_q, n_kv,
            HALF=half, HALF_P2=next_pow2(half), BLOCK_HQ=next_pow2(n_q), BLOCK_HK=next_pow2(n_kv), num_warps=4)
    return q_out, k_out
