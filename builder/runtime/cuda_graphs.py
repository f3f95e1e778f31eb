"""Decode steps as CUDA graphs: one graph per padded batch size, replayed after copying the step into static buffers.

A pure decode step (every sequence adds one token and samples it) is the same launch sequence at every step of a
given batch size, so it is captured once per size in GRAPH_BATCH_SIZES (up to the engine's max_batch_size) and
replayed: one launch instead of ~15 per layer, no Python per kernel. Prefill, chunked prefill and mixed steps run
eagerly. What makes a step graph-safe:
  - static device buffers for input ids, positions, KV slots, context lengths and block tables, written with one
    host-to-device copy per step (pinned staging, no synchronisation);
  - padding rows (batch padded up to the captured size) have KV slot -1 (the store kernel skips them) and
    context length 1 (they attend to one stale cache entry; their logits are dropped);
  - split-KV decode attention uses a fixed number of splits, chosen for max_seq_len (each sequence divides its own
    context among them on the device);
  - the float32 logits of every row are the graph's output.
Under tensor parallelism every rank captures the same graphs in the same order; the NCCL all-reduces are part of
them.
"""

from __future__ import annotations

import bisect

import torch

from plugins import AttentionMetadata

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The padded batch sizes to capture: GRAPH_BATCH_SIZES below max_batch_size, and max_batch_size itself."""
    return [s for s in GRAPH_BATCH_SIZES if s < max_batch_size] + [max_batch_size]


class DecodeGraphs:
    """Captured decode forward passes (hidden -> float32 logits) of one model over one KV cache."""

    def __init__(self, model, kv_cache: torch.Tensor, max_batch_size: int, max_seq_len: int,
                 tokens_per_block: int) -> None:
        """Allocate the static buffers; call capture() before run()."""
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_seq_len = max_seq_len
        device = kv_cache.device
        rows = self.sizes[-1]
        self.max_blocks = -(-max_seq_len // tokens_per_block)
        self.host = torch.zeros(4, rows, dtype=torch.int64).pin_memory()  # ids, positions, slots, context lens
        self.host_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32).pin_memory()
        self.inputs = torch.zeros(4, rows, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps run through a graph
        self.copied = torch.cuda.Event()  # the last step's copies out of the pinned staging buffers are done

    def capture(self) -> None:
        """Warm up (compiles the Triton kernels) and capture every batch size, largest first, in one memory pool."""
        self.inputs[2].fill_(-1)  # no KV writes while capturing
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize(self.kv_cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize(self.kv_cache.device)

    def _forward(self, size: int) -> torch.Tensor:
        """Forward pass of the first `size` static rows; float32 logits [size, V (this rank's slice)]."""
        meta = AttentionMetadata(
            slot_mapping=self.inputs[2, :size], block_tables=self.block_tables[:size],
            query_start=self.query_start[:size + 1], context_lens=self.context_lens[:size],
            query_lens_host=[1] * size, context_lens_host=[self.max_seq_len] * size)
        hidden = self.model.forward(self.inputs[0, :size], self.inputs[1, :size], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    def release(self) -> None:
        """Free every captured graph and its outputs (waits for replays in flight first).

        Under tensor parallelism this must happen before the process group is destroyed: NCCL does not tear
        down a communicator that live graphs still hold (destroy_process_group hangs)."""
        torch.cuda.synchronize(self.kv_cache.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.logits.clear()

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        """True when a decode step of num_seqs sequences with block tables of max_blocks entries can replay."""
        return bool(self.graphs) and 0 < num_seqs <= self.sizes[-1] and max_blocks <= self.max_blocks

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Replay the smallest graph that holds the step; float32 logits [num_seqs, V] (a view of the graph output,
        valid until the next replay)."""
        n = len(input_ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = len(block_tables[0])
        self.copied.synchronize()
        host = self.host[:, :size]
        host[:, :n] = torch.tensor([input_ids, positions, slots, context_lens])
        host[2, n:] = -1
        host[3, n:] = 1
        self.host_tables[:n, :width] = torch.tensor(block_tables, dtype=torch.int32)
        self.inputs[:, :size].copy_(host, non_blocking=True)
        self.context_lens[:size].copy_(self.inputs[3, :size])
        self.block_tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        self.copied.record()
        self.graphs[size].replay()
        self.replays += 1
        return self.logits[size][:n]
