"""Helpers shared by the Triton kernels: device facts and dtype mapping."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels then run on CPU tensors (slow, for development)

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
KV_QUANT = {torch.int8: 1, torch.float8_e4m3fn: 2}  # quantized KV cache dtype -> kernel code (0: not quantized)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 under the CPU interpreter, to keep grids small)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def check_attention_shapes(q: torch.Tensor, k_cache: torch.Tensor) -> None:
    """The attention kernels' shape rules: head_size a power of two >= 16, query heads a multiple of KV heads, a
    contiguous head_size dim in the cache."""
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_size {d} is not a power of two >= 16")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")
    if k_cache.stride(-1) != 1:
        raise ValueError("KV cache needs a contiguous head_size dim")
