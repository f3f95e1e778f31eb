"""AttentionMetadata: how a flat token batch maps onto sequences and paged KV-cache slots."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-forward attention layout of a flat batch of B sequences holding T new tokens in total.

    Sequence i owns query rows query_start[i] : query_start[i] + query_lens[i]; after this step its cache holds
    context_lens[i] tokens, the new ones last, so query row j sits at position context_lens[i] - query_lens[i] + j.
    """

    slot_mapping: torch.Tensor  # int64 [T]: block_id * tokens_per_block + offset of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]: physical block ids per sequence, padded with 0
    query_start: torch.Tensor   # int32 [B + 1]: cumulative query lengths (cu_seqlens_q)
    context_lens: torch.Tensor  # int32 [B]: cached tokens per sequence after this step
    query_lens_host: list[int]   # the same query lengths on the host, for launch grids and reference loops
    context_lens_host: list[int]  # the same context lengths on the host

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the batch."""
        return len(self.query_lens_host)

    @property
    def max_query_len(self) -> int:
        """Longest query chunk in the batch (1 for a pure decode batch)."""
        return max(self.query_lens_host, default=0)
