"""Causal attention of query chunks over paged KV: prefill, chunked prefill, prefix hits and mixed batches.

    paged_prefill_attention(q, k_cache, v_cache, meta, scale, kv_scale=None, config=None) -> out [T, nq, d]

Same signature and semantics as plugins.reference.paged_attention, for any query lengths: sequence i owns query rows
query_start[i] : query_start[i + 1], its cache holds context_lens[i] tokens (the chunk's own K/V already stored,
last), and query row j sits at position context_lens[i] - query_len + j, so it sees the cached prefix and the chunk
causally. Keys and values are always read from the paged cache (INT8 / FP8 caches dequantized with kv_scale as
read), so prefill and chunked prefill behave the same with a quantized cache.

Kernel: flash-attention forward, one program per (query head, sequence, BLOCK_M query rows; the last rows, which
see the most keys, start first); Q tile in registers, K/V tiles of BLOCK_N tokens gathered through the block table,
online softmax in float32 (exp2). The KV loop runs in two parts: keys every row of the tile sees (no mask), then the
diagonal band (causal mask). Programs past a sequence's query length do nothing. Layout requirements as in
plugins.gpu.paged_attention; tiles by query length and KV dtype from the H100 sweep (_config).

Measured on H100 (docs/kernels-h100.md): 240-380 TFLOP/s on bf16 KV, 0.55-0.75x the speed of SDPA (flash) over a
contiguous pre-gathered KV for full prefill; 1.1-1.3x faster than SDPA with a lower-right causal mask for chunked
prefill over a cached prefix. An FP8 KV cache runs 20-50% slower than bf16 (conversion in the inner loop).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import KV_QUANT, cdiv, check_attention_shapes
from plugins.metadata import AttentionMetadata

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_head, v_head, bt_row, start_n, pos, ctx, s_scale, stride_kb, stride_kt,
                 stride_vb, stride_vt, d, D: tl.constexpr, TPB: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr):
    n = start_n + tl.arange(0, BLOCK_N)
    nmask = n < ctx
    if MASKED:
        blk = tl.load(bt_row + n // TPB, mask=nmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + n // TPB).to(tl.int64)
    off = (n % TPB).to(tl.int64)
    if MASKED:
        k = tl.load(k_head + (blk * stride_kb + off * stride_kt)[:, None] + d[None, :], mask=nmask[:, None],
                    other=0.0)
    else:
        k = tl.load(k_head + (blk * stride_kb + off * stride_kt)[:, None] + d[None, :])
    dt = q.dtype
    s = tl.dot(q, tl.trans(k.to(dt))) * s_scale
    if MASKED:
        s = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_head + (blk * stride_vb + off * stride_vt)[:, None] + d[None, :], mask=nmask[:, None],
                    other=0.0)
    else:
        v = tl.load(v_head + (blk * stride_vb + off * stride_vt)[:, None] + d[None, :])
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), v.to(dt))
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, qs_ptr, scale_ptr, out_ptr, qk_scale,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_bt, stride_ot, stride_oh,
                    G: tl.constexpr, D: tl.constexpr, TPB: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_SCALE: tl.constexpr):
    h = tl.program_id(0)
    seq = tl.program_id(1)
    mb = tl.num_programs(2) - 1 - tl.program_id(2)  # the longest rows (most keys) start first
    q_start = tl.load(qs_ptr + seq)
    q_len = tl.load(qs_ptr + seq + 1) - q_start
    ctx = tl.load(ctx_ptr + seq)
    kvh = h // G

    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    pos = ctx - q_len + m  # rows past q_len get positions >= ctx: they see every key and are never stored
    d = tl.arange(0, D)
    rows = (q_start + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)
    kv_s = 1.0
    if HAS_SCALE:
        kv_s = tl.load(scale_ptr)
    s_scale = qk_scale * kv_s

    active = mb * BLOCK_M < q_len
    first_pos = ctx - q_len + mb * BLOCK_M
    last_pos = ctx - q_len + tl.minimum((mb + 1) * BLOCK_M, q_len) - 1
    hi = tl.where(active, last_pos + 1, 0)                                   # keys [0, hi) matter to this tile
    full = tl.where(active, (first_pos + 1) // BLOCK_N * BLOCK_N, 0)        # keys [0, full) are seen by every row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh
    for start_n in range(0, full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_head, v_head, bt_row, start_n, pos, ctx, s_scale,
                                     stride_kb, stride_kt, stride_vb, stride_vt, d, D, TPB, BLOCK_N, False)
    for start_n in range(full, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_head, v_head, bt_row, start_n, pos, ctx, s_scale,
                                     stride_kb, stride_kt, stride_vb, stride_vt, d, D, TPB, BLOCK_N, True)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc * (kv_s / l_safe)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(q.dtype), mask=mmask[:, None])


def _config(max_query_len: int, quantized: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by the longest query chunk (H100 sweep, docs/kernels-h100.md)."""
    if max_query_len <= 16:
        return 16, 64, 4, 3
    if quantized:
        return (128, 64, 4, 3) if max_query_len >= 1024 else (128, 128, 8, 3) if max_query_len >= 128 else \
            (64, 64, 4, 4)
    return (128, 128, 8, 3) if max_query_len >= 2048 else (64, 64, 4, 4)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                            scale: float, kv_scale: torch.Tensor | None = None,
                            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Causal attention of every query chunk over its sequence's paged KV; returns out [T, nq, d].

    config: (BLOCK_M, BLOCK_N, num_warps, num_stages), default by the longest query chunk."""
    check_attention_shapes(q, k_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    tokens, n_q, d = q.shape
    n_kv, tpb = k_cache.shape[2], k_cache.shape[1]
    quant = KV_QUANT.get(k_cache.dtype, 0)
    if quant and kv_scale is None:
        raise ValueError(f"a {k_cache.dtype} KV cache needs the layer's kv_cache_scaling_factor")
    out = torch.empty((tokens, n_q, d), dtype=q.dtype, device=q.device)
    if not meta.num_seqs or not tokens:
        return out
    block_m, block_n, warps, stages = config or _config(meta.max_query_len, bool(quant))
    grid = (n_q, meta.num_seqs, cdiv(meta.max_query_len, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start,
        kv_scale if quant else meta.context_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=n_q // n_kv, D=d, TPB=tpb, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SCALE=bool(quant),
        num_warps=warps, num_stages=stages)
    return out
