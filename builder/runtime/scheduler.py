"""Scheduler: picks each iteration's work (all running decodes, then prefill chunks) under token and KV limits."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from builder.runtime.block_manager import BlockManager
from builder.runtime.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """num_tokens new tokens of seq to run this step; is_prefill tells a prompt/recompute chunk from a decode."""

    seq: Sequence
    num_tokens: int
    is_prefill: bool

    @property
    def samples(self) -> bool:
        """True when this chunk completes the sequence's uncached tokens, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The work of one step, in the order its tokens are laid out in the flat batch."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens from prompt or recompute chunks."""
        return sum(c.num_tokens for c in self.chunks if c.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        """Tokens from decodes (one per decoding sequence)."""
        return sum(c.num_tokens for c in self.chunks if not c.is_prefill)


class Scheduler:
    """Waiting queue (FCFS, preempted sequences first) and running list (admission order, oldest first)."""

    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_tokens: int) -> None:
        """Schedule at most max_batch_size sequences and max_num_tokens tokens per step."""
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Plan one step: every running decode, then running prefill chunks, then newly admitted prompts."""
        out = SchedulerOutput()
        budget = self.max_num_tokens
        budget = self._schedule_running(out, budget, decodes=True)
        budget = self._schedule_running(out, budget, decodes=False)
        if out.num_preempted == 0:  # the pool is tight: let the preempted work drain first
            self._admit_waiting(out, budget)
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished and release its blocks."""
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, seq: Sequence) -> None:
        """Drop seq wherever it is and release its blocks."""
        self.finish(seq, "aborted")

    def _release(self, seq: Sequence) -> None:
        """Remove seq from the queues and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int, decodes: bool) -> int:
        """Schedule running sequences of one kind (decodes or partial prefills); return the budget left."""
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING or seq.is_prefilling == decodes:
                continue
            num_tokens = self._fit(seq, min(seq.num_uncomputed_tokens, budget), out)
            if num_tokens:
                self._take(out, seq, num_tokens)
                budget -= num_tokens
        return budget

    def _fit(self, seq: Sequence, want: int, out: SchedulerOutput) -> int:
        """Tokens of seq that can run now, preempting newer unscheduled sequences if no KV block is free.

        A prefill chunk shrinks to the free blocks first; a decode needs its one token. Returns 0 when seq
        itself had to be preempted.
        """
        scheduled = None  # built only when a preemption is needed: the common path stays O(1) per sequence
        while True:
            fitting = self.block_manager.tokens_fitting(seq) - seq.num_computed_tokens
            if fitting >= want or (seq.is_prefilling and fitting > 0):
                return min(want, fitting)
            if scheduled is None:
                scheduled = {id(c.seq) for c in out.chunks}
            victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
            self._preempt(victims[-1] if victims else seq, out)
            if not victims:
                return 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free seq's blocks and put it first in the waiting queue to be recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        out.num_preempted += 1

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences in order while batch slots, token budget and free blocks allow.

        One free block per running sequence is held back so that admitting a prompt does not force the
        next step's decodes to preempt it straight away.
        """
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            reserve = len(self.running) * self.block_manager.tokens_per_block
            fitting = self.block_manager.tokens_fitting(seq) - seq.num_computed_tokens - reserve
            num_tokens = min(seq.num_uncomputed_tokens, budget, fitting)
            if num_tokens <= 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(out, seq, num_tokens)
            budget -= num_tokens

    def _take(self, out: SchedulerOutput, seq: Sequence, num_tokens: int) -> None:
        """Reserve KV blocks for num_tokens more tokens of seq and add the chunk to the step."""
        self.block_manager.grow(seq, seq.num_computed_tokens + num_tokens)
        out.chunks.append(ScheduledChunk(seq, num_tokens, seq.is_prefilling))
