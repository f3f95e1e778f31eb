"""SwiGLU activation in one Triton kernel: silu(a) * b for the two halves of a fused fc|gate GEMM output.

    silu_and_mul(y) -> out      y [T, 2I] = [fc(x) | gate(x)], out [T, I] = silu(fc(x)) * gate(x)

Same rounding as plugins.reference.silu_and_mul (torch's F.silu(a) * b in the input dtype): silu is computed in
float32 and rounded to the dtype, then the product is computed in float32 and rounded again. One read of y, one
write of out (torch needs three kernels and two intermediate tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.gpu._common import cdiv

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, n_cols, stride_y, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
    b = tl.load(y_ptr + row * stride_y + n_cols + cols, mask=mask, other=0.0)
    a32 = a.to(tl.float32)
    silu = (a32 / (1.0 + tl.exp(-a32))).to(a.dtype)
    tl.store(out_ptr + row * stride_o + cols, (silu.to(tl.float32) * b.to(tl.float32)).to(a.dtype), mask=mask)


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """silu(y[..., :I]) * y[..., I:] for y [..., 2I] with a contiguous last dim."""
    y2 = y.reshape(-1, y.shape[-1])
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    inter = y2.shape[1] // 2
    out = torch.empty((y2.shape[0], inter), dtype=y.dtype, device=y.device)
    if y2.shape[0]:
        _silu_mul_kernel[(y2.shape[0], cdiv(inter, BLOCK))](y2, out, inter, y2.stride(0), out.stride(0),
                                                             BLOCK=BLOCK, num_warps=4)
    return out.view(*y.shape[:-1], inter)
