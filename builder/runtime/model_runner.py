"""ModelRunner: owns the weights and the paged KV cache, turns a scheduled step into one forward pass + logits."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from builder.config import EngineConfig
from builder.errors import ConfigError
from builder.models import arch_spec
from builder.runtime.block_manager import BlockManager
from builder.runtime.cuda_graphs import DecodeGraphs
from builder.runtime.scheduler import SchedulerOutput
from builder.runtime.weights import expected_layout, load_weights, torch_dtype
from plugins import AttentionMetadata, uses_gpu_kernels
from plugins.formats import KV_CACHE_DTYPES

if TYPE_CHECKING:
    from builder.runtime.distributed import TensorParallel


@dataclass
class StepInput:
    """One step's flat batch as host lists: what rank 0 sends to the other tensor-parallel ranks."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # padded with block 0 to the longest table
    last_rows: list[int]           # rows whose logits are sampled, in chunk order


GPU_HEADROOM_BYTES = 3 * 2**30  # activations, logits, CUDA graphs and allocator slack beside weights + KV pool


def kv_cache_dtype(engine_config: EngineConfig) -> torch.dtype:
    """dtype of the paged KV cache: int8 / float8_e4m3fn for an INT8 / FP8 KV cache, else the model dtype."""
    m = engine_config.model
    algo = m.quantization.kv_cache_quant_algo
    if algo is None:
        return torch_dtype(m.dtype)
    if algo not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_quant_algo {algo!r} is not supported; rebuild with --kv-cache-dtype "
                          "auto, int8 or fp8")
    return KV_CACHE_DTYPES[algo]


def kv_block_bytes(engine_config: EngineConfig) -> int:
    """Bytes of one KV block across all layers (K and V) on one rank, as the model's KVCacheSpec lays it out."""
    spec = arch_spec(engine_config.model.architecture).model_class().kv_cache_spec(engine_config.model)
    return spec.block_bytes(engine_config.build.tokens_per_block, kv_cache_dtype(engine_config))


def num_kv_blocks(engine_config: EngineConfig, kv_cache_memory_mb: float) -> int:
    """How many KV blocks fit in kv_cache_memory_mb MiB; ConfigError when not even one does."""
    block_bytes = kv_block_bytes(engine_config)
    blocks = int(kv_cache_memory_mb * 2**20) // block_bytes
    if blocks < 1:
        raise ConfigError(f"kv_cache_memory_mb={kv_cache_memory_mb} holds no KV block ({block_bytes} bytes each); "
                          "raise --kv-cache-memory-mb")
    return blocks


def rank_weight_bytes(engine_config: EngineConfig) -> int:
    """Bytes of one rank's weights on the device (from the engine's tensor layout, quantized dtypes included)."""
    return sum(math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()
               for spec in expected_layout(engine_config.model).values())


def kv_blocks_for(engine_config: EngineConfig, max_sequences: int, max_seq_len: int) -> int:
    """KV blocks that max_sequences sequences of max_seq_len tokens can use at once, with a 5% margin."""
    # the scheduler keeps one spare block per running sequence when it admits a prompt
    blocks = max_sequences * (math.ceil(max_seq_len / engine_config.build.tokens_per_block) + 1)
    return math.ceil(blocks * 1.05 + 1)


def gpu_kv_cache_mb(engine_config: EngineConfig, devices: list[torch.device], free_fraction: float,
                    max_sequences: int, max_seq_len: int | None = None) -> float:
    """KV pool size (MiB per rank) on CUDA: TensorRT-LLM's kv_cache_free_gpu_mem_fraction.

    That share of the memory each device has free once its rank's weights and GPU_HEADROOM_BYTES are set
    aside (measured before loading), capped at what max_sequences sequences of max_seq_len tokens can use.
    ConfigError when the weights leave no room for even one block.
    """
    block = kv_block_bytes(engine_config)
    usable = kv_blocks_for(engine_config, max_sequences, max_seq_len or engine_config.build.max_seq_len) * block
    free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
    weights = rank_weight_bytes(engine_config)
    room = int((free - weights - GPU_HEADROOM_BYTES) * free_fraction)
    if room < block:
        raise ConfigError(f"{devices[0]} has {free / 2**30:.1f} GiB free, too little for this rank's weights "
                          f"({weights / 2**30:.1f} GiB) plus a KV cache; use a larger GPU, "
                          "more tensor-parallel ranks (--tp) or a quantized build (--quant)")
    return min(usable, room) / 2**20


class ModelRunner:
    """Runs the model on a SchedulerOutput and returns float32 logits for the sequences that sample.

    Under tensor parallelism every rank has one ModelRunner over its shard; rank 0's `run` prepares the step,
    hands it to `broadcast` (which sends it to the other ranks) and executes it; the others call `execute`.
    """

    def __init__(self, engine_dir: Path, engine_config: EngineConfig, device: torch.device, num_blocks: int,
                 rank: int = 0, tp: "TensorParallel | None" = None,
                 broadcast: Callable[[StepInput], None] | None = None, graph_batch_size: int = 0) -> None:
        """Load rank's weights onto device and allocate the KV cache the model asks for (its KVCacheSpec).

        graph_batch_size > 0 captures decode steps of up to that many sequences as CUDA graphs (CUDA, fp16/bf16
        engines only; every tensor-parallel rank must get the same value)."""
        m, b = engine_config.model, engine_config.build
        self.device = device
        self.rank = rank
        self.tp = tp if tp is not None and tp.world_size > 1 else None
        self.broadcast = broadcast
        self.vocab_size = m.vocab_size
        self.tokens_per_block = b.tokens_per_block
        all_reduce, all_reduce_max = (self.tp.all_reduce, self.tp.all_reduce_max) if self.tp else (None, None)
        model_cls = arch_spec(m.architecture).model_class()
        self.model = model_cls(m, load_weights(engine_dir, m, device, rank), b.max_seq_len, device, all_reduce,
                               all_reduce_max)
        self.kv_cache = model_cls.kv_cache_spec(m).allocate(num_blocks, b.tokens_per_block,
                                                            kv_cache_dtype(engine_config), device)
        self.graphs: DecodeGraphs | None = None
        if graph_batch_size > 0 and uses_gpu_kernels(self.kv_cache, torch_dtype(m.dtype)):
            self.graphs = DecodeGraphs(self.model, self.kv_cache, graph_batch_size, b.max_seq_len, b.tokens_per_block)
            with torch.inference_mode():
                self.graphs.capture()

    def release_graphs(self) -> None:
        """Free the captured decode graphs; later decode steps run eagerly (call before leaving the process group)."""
        if self.graphs is not None:
            self.graphs.release()

    def run(self, batch: SchedulerOutput, block_manager: BlockManager) -> torch.Tensor:
        """One forward pass over the step's chunks (on every rank); logits [num sampling chunks, V] in chunk order."""
        step = self.prepare(batch, block_manager)
        if self.broadcast is not None:
            self.broadcast(step)
        return self.execute(step)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor | None:
        """Run this rank's shard of the step; the full logits [N, V] on rank 0, None on the other ranks."""
        if self._replays(step):
            logits = self.graphs.run(step.input_ids, step.positions, step.slots, step.context_lens,
                                     step.block_tables)
        else:
            input_ids, positions, meta, last_rows = self._tensors(step)
            hidden = self.model.forward(input_ids, positions, self.kv_cache, meta)
            logits = self.model.compute_logits(hidden[last_rows])
        if self.tp is None:
            return logits
        if not step.last_rows:  # nothing sampled this step: every rank skips the gather
            return logits.new_zeros(0, self.vocab_size) if self.rank == 0 else None
        parts = self.tp.gather(logits)
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, :self.vocab_size]  # drop lm_head's padding rows

    def _replays(self, step: StepInput) -> bool:
        """True when the step is a pure decode step (one sampled token per sequence) that a captured graph holds."""
        n = len(step.query_lens)
        return (self.graphs is not None and len(step.input_ids) == n and len(step.last_rows) == n
                and self.graphs.fits(n, len(step.block_tables[0])))

    def prepare(self, batch: SchedulerOutput, block_manager: BlockManager) -> StepInput:
        """The step's flat input ids, positions, KV slots, lengths, block tables and sampled rows as host lists."""
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
        width = max(len(c.seq.block_table) for c in batch.chunks)  # padded with block 0, never read past context
        tables = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in batch.chunks]
        return StepInput(ids, list(pos), slots, query_lens, context_lens, tables, last_rows)

    def _tensors(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat input ids, positions, attention metadata and the sampled rows on this rank's device."""
        meta = AttentionMetadata(
            slot_mapping=self._tensor(step.slots, torch.int64),
            block_tables=self._tensor(step.block_tables, torch.int32),
            query_start=self._tensor([0, *itertools.accumulate(step.query_lens)], torch.int32),
            context_lens=self._tensor(step.context_lens, torch.int32),
            query_lens_host=step.query_lens, context_lens_host=step.context_lens)
        return (self._tensor(step.input_ids, torch.int64), self._tensor(step.positions, torch.int64), meta,
                self._tensor(step.last_rows, torch.int64))

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a tensor on the runner's device."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
