"""INT4 weight-only GEMM (W4A16, AWQ or per-channel) with in-kernel dequantization, one Triton kernel for all M.

    w = repack_awq(weight, weights_scaling_factor, dtype)          # once at load; checkpoint tensors, see below
    w = repack_int4_per_channel(q, per_channel_scale, dtype)       # W4A16 per-channel (q int8 values [out, in])
    y = int4_linear(x, w, bias=None, pre_quant_scale=None)          # y = (x * pre_quant_scale) @ W^T + bias

Checkpoint layout (builder.quantize.awq): weight int8 [out/2, in], int4 values of output rows 2r (low nibble) and
2r+1 (high nibble) per byte; weights_scaling_factor fp32 [out, in/g]; prequant_scaling_factor [in] in the model
dtype. The effective weight is W = round_to_dtype(q * scale.to(dtype)), exactly as the runtime dequantizes it.

Kernel layout (Int4Weight.qweight, int8 [in/2, out]): K is cut into chunks of 128; byte (c * 64 + i, n) holds
W[128c + i, n] in its low nibble and W[128c + 64 + i, n] in its high nibble (signed two's complement), so one
[64, BLOCK_N] byte tile unpacks with two shifts into two [64, BLOCK_N] weight tiles that multiply the two 64-column
halves of the activation tile: no register shuffles. Scales are [in/g, out] in the model dtype; g must be a multiple
of 64 (AWQ uses 64 or 128; per-channel uses g = in). in_features must be a multiple of 128.

Per K chunk a program loads the [BLOCK_M, 128] activation tile (times pre_quant_scale, rounded to the dtype, as the
reference multiplies first), the packed tile and two scale rows, dequantizes in registers (shift, convert, multiply
by the group scale, round to the dtype: bit-identical to the reference weight) and runs two tensor-core dots with
float32 accumulation (BLOCK_M = 1 selects a GEMV form with FMAs instead; measured slower for int4, kept for
experiments). Small M is weight-bandwidth bound and has too few output tiles to fill the GPU, so K is split across
programs (split-K, float32 atomic adds into a zeroed buffer, cast at the end); large M runs one program per tile.

Measured on H100 (docs/kernels-h100.md, GPU time under CUDA graphs, Llama-3-8B shapes): at M = 1 and 16 it is
1.0-1.25x faster than bf16 cuBLAS and at M = 16 1.7-1.9x faster than torch._weight_int4pack_mm (tinygemm), but at
M = 1 tinygemm is 2x faster; M = 64 runs at 0.8-1.0x bf16's speed, M = 256 2.5-2.8x slower than bf16. So: dispatch
M = 1 to tinygemm, and large M to a dequantized bf16 weight where memory allows (or a better kernel, TODO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from plugins.formats import unpack_int4
from plugins.gpu._common import cdiv, num_sms

CHUNK = 128  # K values per packed chunk (two halves of 64)


@dataclass
class Int4Weight:
    """A W4A16 weight repacked for int4_linear."""

    qweight: torch.Tensor  # int8 [in/2, out] (see the module docstring)
    scales: torch.Tensor   # model dtype [in/g, out]
    group_size: int
    in_features: int
    out_features: int


def pack_int4_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values int8 [out, in] -> the kernel's int8 [in/2, out] layout."""
    out_features, in_features = q.shape
    if in_features % CHUNK:
        raise ValueError(f"in_features {in_features} is not a multiple of {CHUNK}")
    t = q.t().to(torch.int16).reshape(in_features // CHUNK, 2, CHUNK // 2, out_features)
    packed = (t[:, 0] & 0x0F) | ((t[:, 1] & 0x0F) << 4)
    packed = torch.where(packed > 127, packed - 256, packed)
    return packed.reshape(in_features // 2, out_features).to(torch.int8).contiguous()


def make_int4_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Weight:
    """Int4Weight from int4 values int8 [out, in] and scales [out, in / group_size] (any float dtype)."""
    if group_size % (CHUNK // 2):
        raise ValueError(f"group size {group_size} is not a multiple of {CHUNK // 2}")
    return Int4Weight(pack_int4_kernel_layout(q), scales.to(dtype).t().contiguous(), group_size, q.shape[1],
                      q.shape[0])


def repack_awq(weight: torch.Tensor, weights_scaling_factor: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Checkpoint W4A16_AWQ tensors (weight int8 [out/2, in], scales fp32 [out, in/g]) -> Int4Weight."""
    q = unpack_int4(weight)
    return make_int4_weight(q, weights_scaling_factor, q.shape[1] // weights_scaling_factor.shape[1], dtype)


def repack_int4_per_channel(q: torch.Tensor, per_channel_scale: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Per-channel W4A16 (int4 values int8 [out, in], scale [out]) -> Int4Weight with one group per row."""
    return make_int4_weight(q, per_channel_scale.reshape(-1, 1), q.shape[1], dtype)


@triton.jit
def _int4_kernel(a_ptr, w_ptr, s_ptr, pre_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_cm, iters_per_split,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PRE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    HALF: tl.constexpr = 64
    DOT: tl.constexpr = BLOCK_M >= 16  # tensor cores; BLOCK_M == 1 is a GEMV (one row per program, FMAs)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, HALF)
    mmask = m < M
    nmask = n < N
    a_rows = a_ptr + m.to(tl.int64)[:, None] * stride_am
    dt = a_ptr.dtype.element_ty
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc2 = tl.zeros([HALF, BLOCK_N], tl.float32)  # per-k partial sums, reduced once at the end
    it0 = pid_k * iters_per_split
    it1 = tl.minimum(it0 + iters_per_split, K // 128)
    for it in range(it0, it1):
        k0 = it * 128
        a_lo = tl.load(a_rows + (k0 + kk)[None, :], mask=mmask[:, None], other=0.0)
        a_hi = tl.load(a_rows + (k0 + HALF + kk)[None, :], mask=mmask[:, None], other=0.0)
        if HAS_PRE:
            p_lo = tl.load(pre_ptr + k0 + kk).to(tl.float32)
            p_hi = tl.load(pre_ptr + k0 + HALF + kk).to(tl.float32)
            a_lo = (a_lo.to(tl.float32) * p_lo[None, :]).to(dt)
            a_hi = (a_hi.to(tl.float32) * p_hi[None, :]).to(dt)
        b = tl.load(w_ptr + (it * HALF + kk).to(tl.int64)[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
        s_lo = tl.load(s_ptr + (k0 // GROUP) * N + n, mask=nmask, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + ((k0 + HALF) // GROUP) * N + n, mask=nmask, other=0.0).to(tl.float32)
        w_lo = (((b << 4) >> 4).to(tl.float32) * s_lo[None, :]).to(dt)
        w_hi = ((b >> 4).to(tl.float32) * s_hi[None, :]).to(dt)
        if DOT:
            acc = tl.dot(a_lo, w_lo, acc)
            acc = tl.dot(a_hi, w_hi, acc)
        else:
            acc2 += w_lo.to(tl.float32) * tl.reshape(a_lo, [HALF, 1]).to(tl.float32)
            acc2 += w_hi.to(tl.float32) * tl.reshape(a_hi, [HALF, 1]).to(tl.float32)
    if not DOT:
        acc = tl.reshape(tl.sum(acc2, axis=0), [1, BLOCK_N])
    c = c_ptr + m.to(tl.int64)[:, None] * stride_cm + n[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(c, acc, mask=cmask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def gemm_config(m: int, n: int, k_iters: int, device: torch.device,
                kind: str = "int8") -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, split_k) for an [m, n] output with k_iters K chunks of 128.

    kind: "int4", "int8" or "fp8". Chosen from the H100 sweep in docs/kernels-h100.md (Llama-3-8B shapes): tensor-core
    tiles everywhere except FP8 at M <= 4, where the GEMV form (BLOCK_M = 1: one activation row per program, FMAs,
    K reduced once at the end) was fastest; split-K fills the GPU when the output has few tiles."""
    waves = 2
    if kind == "fp8" and m <= 4:
        bm, bn, warps, stages = 1, 64, 4, 4
    elif m <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        bm, bn, warps, stages = (64, 64, 4, 3) if kind == "int4" else (64, 128, 4, 3)
    elif kind == "int4":
        bm, bn, warps, stages, waves = 128, 64, 4, 3, 1
    else:
        bm, bn, warps, stages = 128, 256, 8, 3
    return bm, bn, warps, stages, split_k_for(cdiv(m, bm) * cdiv(n, bn), k_iters, device, waves)


def split_k_for(tiles: int, k_iters: int, device: torch.device, waves: int = 2) -> int:
    """Split K so that tiles * split is about `waves` programs per multiprocessor (each with >= 2 K chunks)."""
    if tiles >= waves * num_sms(device):
        return 1
    split = min(cdiv(waves * num_sms(device), tiles), max(1, k_iters // 2))
    return cdiv(k_iters, cdiv(k_iters, split))  # no empty splits


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None,
                pre_quant_scale: torch.Tensor | None = None,
                config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """y = (x * pre_quant_scale) @ W^T + bias for x [..., in] (fp16/bf16); returns [..., out] in x's dtype.

    config: (BLOCK_M, BLOCK_N, num_warps, num_stages, split_k), default gemm_config(..., "int4")."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, k = x2.shape[0], w.out_features, w.in_features
    k_iters = k // CHUNK
    bm, bn, warps, stages, split = config or gemm_config(m, n, k_iters, x.device, "int4")
    atomic = split > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        iters = cdiv(k_iters, split)
        _int4_kernel[(cdiv(n, bn), split, cdiv(m, bm))](
            x2, w.qweight, w.scales, pre_quant_scale if pre_quant_scale is not None else x2,
            bias if bias is not None else x2, out, m, n, k, x2.stride(0), out.stride(0), iters,
            GROUP=w.group_size, BLOCK_M=bm, BLOCK_N=bn, HAS_PRE=pre_quant_scale is not None,
            HAS_BIAS=bias is not None, ATOMIC=atomic, num_warps=warps, num_stages=stages)
    if atomic:
        out = (out if bias is None else out + bias.float()).to(x.dtype)
    return out.view(*shape[:-1], n)
