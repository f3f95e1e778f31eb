"""Torch reference implementations of the plugin ops: exact, readable, device-agnostic, not fast."""

from __future__ import annotations

import torch

from plugins.metadata import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed as HF Llama does: float32 statistics, cast back, then the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm; returns (normed, new residual)."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of the last dim, negating the second: (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE; cos/sin are cast to q's dtype first, as HF does."""
    cos = cos_cache[positions].to(q.dtype).unsqueeze(1)
    sin = sin_cache[positions].to(q.dtype).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata) -> None:
    """Scatter k/v rows into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len cached tokens [L, nkv, d] of one sequence, in position order."""
    tokens_per_block = cache.shape[1]
    num_blocks = -(-context_len // tokens_per_block)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Float32 attention of q [Lq, nq, d] over k/v [Lk, nkv, d]; query j sits at key position Lk - Lq + j."""
    group = q.shape[1] // k.shape[1]
    q32 = q.float()
    k32 = k.float().repeat_interleave(group, dim=1)
    v32 = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q32, k32) * scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v32).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Loop over sequences: gather each one's cached K/V through its block table and attend causally."""
    out = torch.empty_like(q)
    start = 0
    for i, (query_len, context_len) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        k = _gather_context(k_cache, meta.block_tables[i], context_len)
        v = _gather_context(v_cache, meta.block_tables[i], context_len)
        out[start:start + query_len] = _causal_attention(q[start:start + query_len], k, v, scale)
        start += query_len
    return out
