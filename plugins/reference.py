"""Torch reference implementations of the plugin ops: exact, readable, device-agnostic, not fast."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugins.formats import KV_CACHE_DTYPES, dequantize_kv, quantize_kv, to_fp8
from plugins.metadata import AttentionMetadata

KV_ALGOS = {dtype: algo for algo, dtype in KV_CACHE_DTYPES.items()}  # cache dtype -> kv_cache_quant_algo


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


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused [fc | gate] output [..., 2I]: silu(first half) * second half, in y's dtype."""
    fc, gate = y.chunk(2, dim=-1)
    return F.silu(fc) * gate


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
                   meta: AttentionMetadata, kv_scale: torch.Tensor | None = None) -> None:
    """Scatter k/v rows into their cache slots (quantized with kv_scale when the cache is int8 / e4m3)."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        algo = KV_ALGOS.get(cache.dtype)
        if algo is None:
            cache.view(-1, *cache.shape[2:]).index_copy_(0, meta.slot_mapping, x.to(cache.dtype))
            continue
        if kv_scale is None:
            raise ValueError(f"a {cache.dtype} KV cache needs the layer's kv_cache_scaling_factor")
        q = quantize_kv(x, kv_scale, algo)
        # index_copy_ has no float8 kernel on CPU: copy the bytes
        cache.view(torch.uint8).view(-1, *cache.shape[2:]).index_copy_(0, meta.slot_mapping, q.view(torch.uint8))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int,
                    kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first context_len cached tokens [L, nkv, d] of one sequence, in position order (dequantized to float32
    when the cache is int8 / e4m3)."""
    tokens_per_block = cache.shape[1]
    num_blocks = -(-context_len // tokens_per_block)
    if cache.dtype not in KV_ALGOS:
        return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]
    raw = cache.view(torch.uint8)[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]
    return dequantize_kv(raw.view(cache.dtype), kv_scale, torch.float32)


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
                    scale: float, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over sequences: gather each one's cached K/V through its block table and attend causally.

    All keys and values, the step's own tokens included, are read back from the cache, so a quantized cache is
    used the same way in prefill, chunked prefill and decode."""
    out = torch.empty_like(q)
    start = 0
    for i, (query_len, context_len) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        k = _gather_context(k_cache, meta.block_tables[i], context_len, kv_scale)
        v = _gather_context(v_cache, meta.block_tables[i], context_len, kv_scale)
        out[start:start + query_len] = _causal_attention(q[start:start + query_len], k, v, scale)
        start += query_len
    return out


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     pre_quant_scale: torch.Tensor | None, input_scale: torch.Tensor | None,
                     weight_scale: torch.Tensor | None) -> torch.Tensor:
    """Reference quantized GEMMs on a dequantized weight held in x's dtype.

    FP8 (input_scale set): x is quantized to e4m3 with the static per-tensor scale (saturating at +-448), multiplied
    by the e4m3 weight values in float32, and scaled by input_scale * weight_scale (the GEMM's alpha), then the
    bias is added; W4A16_AWQ (pre_quant_scale set): x * pre_quant_scale in x's dtype, then the GEMM; otherwise a
    plain GEMM (W8A16 / W4A16 dequantized at load)."""
    if input_scale is not None:
        x_q = to_fp8(x, input_scale).float()
        y = F.linear(x_q, weight.float()) * (input_scale.float() * weight_scale.float())
        return (y if bias is None else y + bias.float()).to(x.dtype)
    if pre_quant_scale is not None:
        x = x * pre_quant_scale
    return F.linear(x, weight, bias)
