"""BlockManager: the pool of fixed-size KV-cache blocks and each sequence's block table."""

from __future__ import annotations

from collections import deque

from builder.runtime.sequence import Sequence


class BlockManager:
    """Hands out KV blocks as sequences grow and takes them back when they finish, abort or are preempted."""

    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        """Create a pool of num_blocks blocks of tokens_per_block token slots each."""
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.tokens_per_block)

    def blocks_missing(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks seq needs so that its table covers num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """True when the free pool can cover seq up to num_tokens tokens."""
        return self.blocks_missing(seq, num_tokens) <= len(self._free)

    def tokens_fitting(self, seq: Sequence) -> int:
        """Most tokens seq could hold with its own blocks plus every free block."""
        return (len(seq.block_table) + len(self._free)) * self.tokens_per_block

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append free blocks to seq's table until it covers num_tokens tokens."""
        missing = self.blocks_missing(seq, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"KV pool exhausted: need {missing} blocks, {len(self._free)} free")
        for _ in range(missing):
            block_id = self._free.popleft()
            self._used.add(block_id)
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool and clear its table."""
        for block_id in seq.block_table:
            self._used.remove(block_id)
            self._free.append(block_id)
        seq.block_table = []

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat cache slot (block_id * tokens_per_block + offset) of token `position` of seq."""
        return seq.block_table[position // self.tokens_per_block] * self.tokens_per_block + \
            position % self.tokens_per_block
