"""Sequence: one request's tokens, KV blocks and progress through prefill and decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from builder.runtime.sampling_params import SamplingParams


class SequenceStatus(Enum):
    """Where a sequence is: queued for (re)admission, holding KV blocks, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being generated. KV is cached for token_ids[:num_computed_tokens].

    prefill_target is how many tokens must be cached before the next sample: the prompt length at first
    admission, the whole sequence again after a preemption (recompute). A sequence is sampled only at the
    step that brings num_computed_tokens up to len(token_ids).
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    prefill_target: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        """Start with the prompt as the whole sequence, none of it cached."""
        self.token_ids = list(self.prompt_ids)
        self.prefill_target = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not cached yet (1 for a decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True while the prompt (or a recompute after preemption) is not fully cached."""
        return self.num_computed_tokens < self.prefill_target

    @property
    def is_finished(self) -> bool:
        """True once the sequence has stopped."""
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a generated token."""
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Forget all cached KV: the whole sequence (prompt + output so far) is prefilled again."""
        self.num_computed_tokens = 0
        self.prefill_target = self.num_tokens
        self.block_table = []
        self.status = SequenceStatus.WAITING
