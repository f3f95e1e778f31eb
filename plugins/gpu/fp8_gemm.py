"""FP8 (e4m3) W8A8 GEMM with static per-tensor scales: a Triton kernel with the activation quantization fused in,
and torch._scaled_mm (cuBLASLt) behind one function.

    y = fp8_linear(x, weight, input_scale, weight_scale, bias=None, backend="auto")
    x_q = quantize_fp8(x, input_scale)

Semantics of plugins.reference.quantized_linear's FP8 branch: x_q = e4m3(x / input_scale saturated to +-448),
y = (x_q @ weight^T) * (input_scale * weight_scale) + bias, in x's dtype. weight: float8_e4m3fn [out, in] (the
checkpoint tensor as is); input_scale / weight_scale: fp32 [1] (read on the device, no host sync).

backend "triton": one kernel; each program quantizes its activation tile in registers (IEEE division, saturate,
round to nearest even: bit-identical to the reference x_q), multiplies e4m3 x e4m3 on the tensor cores into float32
and applies the scales and bias; split-K with float32 atomics for small M. backend "scaled_mm": quantize_fp8 (one
small kernel) then torch._scaled_mm with tensor-wise scales. backend "auto": the Triton kernel for
M <= TRITON_MAX_M, cuBLASLt above (set from the H100 microbenchmark, docs/kernels-h100.md: at M = 1 the Triton GEMV
form is 0-8% faster than quantize + _scaled_mm; from M = 16 on cuBLASLt wins, by 4-7x at M = 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import cdiv
from plugins.gpu.int4_gemm import gemm_config

BLOCK_K = 128
TRITON_MAX_M = 4  # measured: the Triton GEMV matches or beats quantize + _scaled_mm only at M = 1
FP8_MAX = 448.0


@triton.jit
def _to_e4m3(x, scale):
    return tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def _quant_kernel(x_ptr, y_ptr, s_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * stride_y + cols, _to_e4m3(x, tl.load(s_ptr)), mask=mask)


@triton.jit
def _fp8_kernel(a_ptr, w_ptr, in_s_ptr, w_s_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                iters_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, EVEN_K: tl.constexpr):
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
    in_s = tl.load(in_s_ptr)
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
            b = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0)
        else:
            a = tl.load(a_rows + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
        if DOT:
            acc = tl.dot(_to_e4m3(a, in_s), tl.trans(b), acc)
        else:
            acc2 += b.to(tl.float32) * _to_e4m3(a, in_s).to(tl.float32)
    if not DOT:
        acc = tl.reshape(tl.sum(acc2, axis=1), [1, BLOCK_N])
    acc = acc * (in_s * tl.load(w_s_ptr))
    c = c_ptr + m.to(tl.int64)[:, None] * stride_cm + n[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(c, acc, mask=cmask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(x / scale), saturated to +-448 (plugins.formats.to_fp8 on the device); x [..., K]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    block = 1024
    if x2.shape[0]:
        _quant_kernel[(x2.shape[0], cdiv(x2.shape[1], block))](x2, y, scale, x2.shape[1], x2.stride(0), y.stride(0),
                                                               BLOCK=block, num_warps=4)
    return y.view(x.shape)


def _fp8_triton(x2: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, config: tuple[int, int, int, int, int] | None) -> torch.Tensor:
    m, (n, k) = x2.shape[0], weight.shape
    k_iters = cdiv(k, BLOCK_K)
    bm, bn, warps, stages, split = config or gemm_config(m, n, k_iters, x2.device, "fp8")
    atomic = split > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x2.device) if atomic else \
        torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m:
        _fp8_kernel[(cdiv(n, bn), split, cdiv(m, bm))](
            x2, weight, input_scale, weight_scale, bias if bias is not None else x2, out, m, n, k, x2.stride(0),
            weight.stride(0), out.stride(0), cdiv(k_iters, split),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K, HAS_BIAS=bias is not None, ATOMIC=atomic,
            EVEN_K=k % BLOCK_K == 0, num_warps=warps, num_stages=stages)
    if atomic:
        out = (out if bias is None else out + bias.float()).to(x2.dtype)
    return out


def _fp8_scaled_mm(x2: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    x_q = quantize_fp8(x2, input_scale)
    m = x_q.shape[0]
    pad = (-m) % 16
    if pad:  # cuBLASLt fp8 wants every dim a multiple of 16
        x_q = torch.cat([x_q, x_q.new_zeros((pad, x_q.shape[1]))])
    y = torch._scaled_mm(x_q, weight.t(), scale_a=input_scale.reshape(()).float(),
                         scale_b=weight_scale.reshape(()).float(),
                         bias=None if bias is None else bias.to(x2.dtype), out_dtype=x2.dtype)
    return y[:m] if pad else y


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, backend: str = "auto",
               config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """FP8 W8A8 linear with static per-tensor scales; x [..., in] fp16/bf16 -> [..., out] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if backend == "auto":
        backend = "triton" if x2.shape[0] <= TRITON_MAX_M or x.device.type != "cuda" else "scaled_mm"
    if backend == "triton":
        y = _fp8_triton(x2, weight, input_scale, weight_scale, bias, config)
    elif backend == "scaled_mm":
        y = _fp8_scaled_mm(x2, weight, input_scale, weight_scale, bias)
    else:
        raise ValueError(f"unknown FP8 GEMM backend {backend!r}; use auto, triton or scaled_mm")
    return y.view(*shape[:-1], weight.shape[0])
