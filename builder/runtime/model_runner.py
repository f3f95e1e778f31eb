"""ModelRunner: owns the weights and the paged KV cache, turns a scheduled step into one forward pass + logits."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from builder.config import EngineConfig
from builder.errors import ConfigError
from builder.runtime.block_manager import BlockManager
from builder.runtime.models.llama import LlamaModel
from builder.runtime.scheduler import SchedulerOutput
from builder.runtime.weights import load_weights, torch_dtype
from plugins import AttentionMetadata


def kv_block_bytes(engine_config: EngineConfig) -> int:
    """Bytes of one KV block across all layers (K and V)."""
    m = engine_config.model
    elements = m.num_hidden_layers * 2 * engine_config.build.tokens_per_block * m.num_key_value_heads * m.head_size
    return elements * torch.empty((), dtype=torch_dtype(m.dtype)).element_size()


def num_kv_blocks(engine_config: EngineConfig, kv_cache_memory_mb: float) -> int:
    """How many KV blocks fit in kv_cache_memory_mb MiB; ConfigError when not even one does."""
    block_bytes = kv_block_bytes(engine_config)
    blocks = int(kv_cache_memory_mb * 2**20) // block_bytes
    if blocks < 1:
        raise ConfigError(f"kv_cache_memory_mb={kv_cache_memory_mb} holds no KV block ({block_bytes} bytes each); "
                          "raise --kv-cache-memory-mb")
    return blocks


class ModelRunner:
    """Runs the model on a SchedulerOutput and returns float32 logits for the sequences that sample."""

    def __init__(self, engine_dir: Path, engine_config: EngineConfig, device: torch.device, num_blocks: int) -> None:
        """Load weights onto device and allocate the KV cache [layers, 2, num_blocks, tpb, nkv, d]."""
        m, b = engine_config.model, engine_config.build
        self.device = device
        self.tokens_per_block = b.tokens_per_block
        self.model = LlamaModel(m, load_weights(engine_dir, m, device), b.max_seq_len, device)
        self.kv_cache = torch.zeros(m.num_hidden_layers, 2, num_blocks, b.tokens_per_block, m.num_key_value_heads,
                                    m.head_size, dtype=torch_dtype(m.dtype), device=device)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput, block_manager: BlockManager) -> torch.Tensor:
        """One forward pass over the step's chunks; logits [num sampling chunks, V] in chunk order."""
        input_ids, positions, meta, last_rows = self._prepare(batch, block_manager)
        hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden[last_rows])

    def _prepare(self, batch: SchedulerOutput,
                 block_manager: BlockManager) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat input ids, positions, attention metadata and the rows whose logits are needed."""
        ids, pos, slots, query_lens, context_lens, last_rows = [], [], [], [], [], []
        for chunk in batch.chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            slots += [block_manager.slot(seq, p) for p in range(start, end)]
            query_lens.append(chunk.num_tokens)
            context_lens.append(end)
            if chunk.samples:
                last_rows.append(len(ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._block_tables(batch),
            query_start=self._tensor([0, *itertools.accumulate(query_lens)], torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            query_lens_host=query_lens, context_lens_host=context_lens)
        return (self._tensor(ids, torch.int64), self._tensor(pos, torch.int64), meta,
                self._tensor(last_rows, torch.int64))

    def _block_tables(self, batch: SchedulerOutput) -> torch.Tensor:
        """Block tables [B, longest table], padded with block 0 (never read past context_lens)."""
        width = max(len(c.seq.block_table) for c in batch.chunks)
        rows = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in batch.chunks]
        return self._tensor(rows, torch.int32)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a tensor on the runner's device."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
