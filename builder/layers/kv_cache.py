"""The paged KV cache's shape, supplied by the model (issue #12): the model runner sizes and allocates the pool from
a KVCacheSpec and names no K/V dimension itself, so a family with another cache (sliding-window layers, MLA's latent
cache) changes its model file, not the runner."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-token cache of one rank: `layers` layers, each holding K and V of `kv_heads` heads of `head_size`.

    The pool is one tensor [layers, 2, blocks, tokens_per_block, kv_heads, head_size] (the layout the attention
    ops read: plugins.store_kv_cache / plugins.paged_attention take layer l's [2, blocks, tpb, nkv, d])."""

    layers: int
    kv_heads: int
    head_size: int

    def pool_shape(self, num_blocks: int, tokens_per_block: int) -> tuple[int, ...]:
        """Shape of the whole pool."""
        return (self.layers, 2, num_blocks, tokens_per_block, self.kv_heads, self.head_size)

    def block_bytes(self, tokens_per_block: int, dtype: torch.dtype) -> int:
        """Bytes of one block across all layers, K and V."""
        return math.prod(self.pool_shape(1, tokens_per_block)) * torch.empty((), dtype=dtype).element_size()

    def allocate(self, num_blocks: int, tokens_per_block: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        """The zeroed pool."""
        return torch.zeros(self.pool_shape(num_blocks, tokens_per_block), dtype=dtype, device=device)
