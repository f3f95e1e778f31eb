"""RMSNorm and fused residual-add + RMSNorm in one Triton kernel (one program per row).

    rms_norm(x, weight, eps) -> y
    fused_add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)

Same signatures and rounding as plugins.reference: the residual sum is rounded to x's dtype, the statistics are
float32, the normalised row is rounded to x's dtype before the weight multiply, and the output has
torch.promote_types(weight.dtype, x.dtype). x / residual: [..., H] with a contiguous last dim. One pass over the
data: reads x (+ residual) and weight once, writes y (+ the new residual) once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r, stride_o, stride_ro, n_cols,
                     eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)  # residual + x, rounded as torch does
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    r2 = res_out = None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty_like(x2)
    block = next_pow2(n)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2 if r2 is None else r2, weight, out, out if res_out is None else res_out,
            x2.stride(0), 0 if r2 is None else r2.stride(0), out.stride(0), 0 if res_out is None else res_out.stride(0),
            n, eps, HAS_RES=residual is not None, BLOCK=block, num_warps=warps)
    return out.view(shape), None if res_out is None else res_out.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (float32 statistics, cast back to x's dtype, then times weight)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    out, summed = _launch(x, residual, weight, eps)
    return out, summed
