"""Sampler: per-sequence logit processing (penalties, bad words, min_tokens) and greedy / top-k / top-p draws."""

from __future__ import annotations

import torch

from builder.runtime.sampling_params import SamplingParams
from builder.runtime.sequence import Sequence


class Sampler:
    """Turns float32 logits [N, V] (one row per sampling sequence) into one token id per sequence."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token id per row; logits may be modified in place.

        Greedy rows without penalties or bad words take one batched argmax (their min_tokens end_id bans applied
        as one batched mask); the other rows are processed with their sequence's params one by one and picked
        greedily or drawn with their generator. The ids reach the host in one copy."""
        if not seqs:
            return []
        batched = [is_batched_greedy(seq) for seq in seqs]
        banned = [(i, seq.params.end_id) for i, seq in enumerate(seqs) if batched[i] and
                  _end_id_masked(seq, logits.shape[-1])]
        if banned:
            rows, ids = zip(*banned)
            logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")
        picks = logits.argmax(dim=-1)
        special = [i for i, is_batched in enumerate(batched) if not is_batched]
        if special:
            rows_t = torch.tensor(special, dtype=torch.int64, device=logits.device)
            drawn = [pick_token(process_logits(logits[i].clone(), seqs[i]), seqs[i].params, seqs[i].generator)
                     for i in special]
            picks = picks.index_copy(0, rows_t, torch.stack(drawn).to(picks.dtype))
        return picks.tolist()


def is_batched_greedy(seq: Sequence) -> bool:
    """True when seq's next token is the argmax of its logits after at most the min_tokens end_id ban."""
    p = seq.params
    return (p.greedy and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
            and not p.bad_words)


def _end_id_masked(seq: Sequence, vocab: int) -> bool:
    """True while min_tokens bans seq's end_id (process_logits' last rule)."""
    p = seq.params
    return p.end_id is not None and len(seq.output_ids) < p.min_tokens and 0 <= p.end_id < vocab


def process_logits(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Apply repetition/presence/frequency penalties, bad-word and min_tokens masks to one logits row in place."""
    params = seq.params
    penalized = False
    if params.repetition_penalty != 1.0:
        apply_repetition_penalty(row, seq.token_ids, params.repetition_penalty)
        penalized = True
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
        apply_presence_frequency(row, seq.output_ids, params.presence_penalty, params.frequency_penalty)
        penalized = True
    if penalized:  # extreme (valid) penalties can overflow to +-inf; +inf would make the probabilities NaN
        limit = torch.finfo(row.dtype).max
        row.clamp_(-limit, limit)
    for token_id in banned_tokens(seq.token_ids, params.bad_words):
        row[token_id] = float("-inf")
    if _end_id_masked(seq, row.numel()):
        row[params.end_id] = float("-inf")
    return row


def apply_repetition_penalty(row: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """HF-style: every seen token's logit is divided by penalty when positive, multiplied when negative."""
    seen = torch.tensor(sorted(set(token_ids)), dtype=torch.int64, device=row.device)
    values = row[seen]
    row[seen] = torch.where(values > 0, values / penalty, values * penalty)


def apply_presence_frequency(row: torch.Tensor, output_ids: list[int], presence: float, frequency: float) -> None:
    """OpenAI-style: subtract presence once and frequency per occurrence for each generated token."""
    if not output_ids:
        return
    ids, counts = torch.tensor(output_ids, dtype=torch.int64, device=row.device).unique(return_counts=True)
    row[ids] -= presence + frequency * counts.to(row.dtype)


def banned_tokens(token_ids: list[int], bad_words: list[list[int]]) -> list[int]:
    """Last tokens of bad words whose preceding tokens end the sequence (single-token bad words always)."""
    banned = []
    for word in bad_words:
        prefix = word[:-1]
        if not prefix or token_ids[-len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def pick_token(row: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax when greedy; otherwise temperature, top-k then top-p, and a draw from the sequence's generator.

    The row's maximum is subtracted before dividing by the temperature, so no logit overflows to +inf (the
    probabilities stay finite for any finite row and temperature >= MIN_TEMPERATURE); still no host sync."""
    if params.greedy:
        return row.argmax()
    row = (row - row.max()) / params.temperature
    if params.top_k > 0:
        row = keep_top_k(row, params.top_k)
    if 0.0 < params.top_p < 1.0:
        row = keep_top_p(row, params.top_p)
    return torch.multinomial(row.softmax(dim=-1), 1, generator=generator)[0]


def keep_top_k(row: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask every logit below the k-th largest."""
    if top_k >= row.numel():
        return row
    kth = torch.topk(row, top_k).values[-1]
    return row.masked_fill(row < kth, float("-inf"))


def keep_top_p(row: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p (at least one)."""
    probs, order = row.softmax(dim=-1).sort(descending=True)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = order[mass_before >= top_p]
    return row.index_fill(0, drop, float("-inf"))
