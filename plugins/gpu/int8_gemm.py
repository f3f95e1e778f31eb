"""INT8 weight-only GEMM (W8A16, per-output-channel scales), one Triton kernel for all M.

    y = int8_linear(x, weight, per_channel_scale, bias=None)

weight: int8 values [out, in] as builder.quantize.weight_only.weight_only_quantize returns them (no repacking: the
kernel reads [BLOCK_N, BLOCK_K] tiles along the contiguous K dim); per_channel_scale [out] (model dtype or fp32);
x [..., in] fp16/bf16; y [..., out] in x's dtype.

The int8 tile is converted exactly to the activation dtype, multiplied on the tensor cores with float32
accumulation, and the per-channel scale is applied once to the accumulator (y = (x @ q^T) * s): the same product as
the reference F.linear(x, q * s) up to rounding (the reference rounds each q * s to the dtype first). Half the weight
bytes of bf16. Small M uses split-K (float32 atomics into a zeroed buffer) to fill the GPU, as int4_linear;
config (BLOCK_M, BLOCK_N, num_warps, num_stages, split_k) defaults to gemm_config(..., "int8").

Measured on H100 (docs/kernels-h100.md, GPU time under CUDA graphs, Llama-3-8B shapes): 1.35-1.7x faster than bf16
cuBLAS at M <= 16 (up to 75% of copy bandwidth), 0.95-1.1x at M = 64, 2-2.3x slower at M = 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import cdiv
from plugins.gpu.int4_gemm import gemm_config

BLOCK_K = 128


@triton.jit
def _int8_kernel(a_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm, iters_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ATOMIC: tl.constexpr, EVEN_K: tl.constexpr):
    DOT: tl.constexpr = BLOCK_M >= 16  # tensor cores; BLOCK_M == 1 is a GEMV (one row per program, FMAs)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    mmask = m < M
    nmask = n < N
    a_rows = a_ptr + m.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + n.to(tl.int64)[:, None] * stride_wn
    dt = a_ptr.dtype.element_ty
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # per-k partial sums, reduced once at the end
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, tl.cdiv(K, BLOCK_K))
    for it in range(it0, it1):
        k = it * BLOCK_K + kk
        if EVEN_K:
            a = tl.load(a_rows + k[None, :], mask=mmask[:, None], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0)
        else:
            a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0)
        if DOT:
            acc = tl.dot(a, tl.trans(b.to(dt)), acc)
        else:
            acc2 += b.to(tl.float32) * a.to(tl.float32)
    if not DOT:
        acc = tl.reshape(tl.sum(acc2, axis=1), [1, BLOCK_N])
    acc = acc * tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + m.to(tl.int64)[:, None] * stride_cm + n[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(c, acc, mask=cmask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, per_channel_scale: torch.Tensor,
                bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias for int8 weight [out, in] and scale [out]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m, (n, k) = x2.shape[0], weight.shape
    k_iters = cdiv(k, BLOCK_K)
    bm, bn, warps, stages, split = config or gemm_config(m, n, k_iters, x.device, "int8")
    atomic = split > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        _int8_kernel[(cdiv(n, bn), split, cdiv(m, bm))](
            x2, weight, per_channel_scale, bias if bias is not None else x2, out, m, n, k, x2.stride(0),
            weight.stride(0), out.stride(0), cdiv(k_iters, split),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, HAS_BIAS=bias is not None, ATOMIC=atomic,
            EVEN_K=k % BLOCK_K == 0, num_warps=warps, num_stages=stages)
    if atomic:
        out = (out if bias is None else out + bias.float()).to(x.dtype)
    return out.view(*shape[:-1], n)
