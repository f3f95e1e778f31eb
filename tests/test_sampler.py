"""Sampler on hand-made logits: penalties, masks, greedy, top-k / top-p, seeds."""

from __future__ import annotations

import torch

from builder.runtime.sampler import Sampler, banned_tokens, keep_top_k, keep_top_p, process_logits
from builder.runtime.sampling_params import SamplingParams
from builder.runtime.sequence import Sequence


def make_seq(prompt: list[int], output: list[int] = (), seed: int | None = None, **params) -> Sequence:
    """A sequence with a prompt, some output and params; a seeded generator when seed is given."""
    s = Sequence("s", list(prompt), SamplingParams(seed=seed, **params))
    for t in output:
        s.append_token(t)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.0]])
    seqs = [make_seq([0]), make_seq([0], temperature=0.0, top_k=5)]
    assert Sampler()(logits, seqs) == [1, 0]


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    row = torch.randn(10, generator=torch.Generator().manual_seed(0))
    s = make_seq([1, 2, 2], [5, 7], repetition_penalty=1.7)
    ours = process_logits(row.clone(), s)
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[1, 2, 2, 5, 7]]), row.clone()[None])[0]
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_count_output_only():
    s = make_seq([4], [1, 1, 3], presence_penalty=0.5, frequency_penalty=0.25)
    row = process_logits(torch.zeros(5), s)
    assert row.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]


def test_bad_words_need_their_prefix():
    assert banned_tokens([5, 6, 7], [[9], [6, 7, 8], [5, 8], [7, 4]]) == [9, 8, 4]
    row = process_logits(torch.zeros(10), make_seq([5, 6], [7], bad_words=[[7, 3], [6, 2]]))
    assert torch.isinf(row[3]) and not torch.isinf(row[2])


def test_min_tokens_masks_end_id_until_reached():
    row = process_logits(torch.zeros(4), make_seq([1], [3], end_id=2, min_tokens=2))
    assert torch.isinf(row[2])
    row = process_logits(torch.zeros(4), make_seq([1], [3, 3], end_id=2, min_tokens=2))
    assert not torch.isinf(row).any()


def test_top_k_and_top_p_filters():
    row = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isinf(keep_top_k(row, 2)).tolist() == [True, False, False, True]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isinf(keep_top_p(probs, 0.75)).tolist() == [False, False, True, True]
    assert torch.isinf(keep_top_p(probs, 0.1)).tolist() == [False, True, True, True]


def test_sampling_respects_top_k_and_seed():
    logits = torch.zeros(1, 50)
    logits[0, :3] = 2.0
    draws = [Sampler()(logits, [make_seq([0], seed=i, top_k=3)])[0] for i in range(30)]
    assert set(draws) <= {0, 1, 2} and len(set(draws)) > 1
    again = [Sampler()(logits, [make_seq([0], seed=i, top_k=3)])[0] for i in range(30)]
    assert draws == again


def test_seeded_row_does_not_depend_on_batch_neighbours():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    def draw(batch_rows, seqs):
        return Sampler()(logits[batch_rows], seqs)
    alone = [draw([1], [make_seq([0], seed=9, top_p=0.9, temperature=2.0)])[0] for _ in range(1)]
    batched = draw([0, 1, 2], [make_seq([0], seed=3, top_k=5), make_seq([0], seed=9, top_p=0.9, temperature=2.0),
                               make_seq([0])])
    assert batched[1] == alone[0]


def test_batched_rows_equal_row_by_row_processing():
    """The batched greedy path (with its batched min_tokens end_id ban) picks what row-by-row processing picks."""
    from builder.runtime.sampler import is_batched_greedy, pick_token

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 12, generator=g)
    logits[:, 2] = 10.0  # end_id 2 would win every row unless banned
    seqs = [make_seq([0], end_id=2, min_tokens=3),            # banned: batched path
            make_seq([0], [5, 6, 7], end_id=2, min_tokens=3),  # ban over: end_id wins
            make_seq([0]),                                    # plain greedy
            make_seq([0, 4], repetition_penalty=3.0),         # per-row path (greedy with penalty)
            make_seq([0], [1], end_id=2, min_tokens=2, bad_words=[[9]]),  # per-row path
            make_seq([0], seed=7, temperature=0.8, top_k=3)]   # per-row draw
    assert [is_batched_greedy(s) for s in seqs] == [True, True, True, False, False, False]
    want = []
    for row, seq in zip(logits.clone(), seqs):
        generator = None if seq.generator is None else torch.Generator().manual_seed(7)
        want.append(int(pick_token(process_logits(row.clone(), seq), seq.params, generator)))
    assert Sampler()(logits.clone(), seqs) == want
    assert want[0] != 2 and want[1] == 2 and want[2] == 2


TINY_TEMPERATURES = (1e-40, 1e-30, 1.4e-45, float(torch.finfo(torch.float32).tiny) / 2, 1e-6)


def test_tiny_temperature_samples_the_argmax_on_every_path():
    """Tiny temperatures (denormals included) with or without top_k / top_p pick the argmax, never fail on
    inf/nan probabilities; through the batched greedy path and the per-row path (penalties) alike."""
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0, 2.0]]).repeat(3, 1)
    for temperature in TINY_TEMPERATURES:
        for extra in ({}, {"top_k": 3}, {"top_p": 0.9}, {"top_k": 2, "top_p": 0.5}):
            seqs = [make_seq([0], seed=1, temperature=temperature, **extra),
                    make_seq([0], seed=2, temperature=temperature, repetition_penalty=1.0 + 1e-6, **extra),
                    make_seq([0], seed=3, temperature=temperature, presence_penalty=0.01, **extra)]
            assert Sampler()(logits.clone(), seqs) == [1, 1, 1], (temperature, extra)


def test_extreme_valid_penalties_keep_probabilities_finite():
    """Valid but extreme penalties (a tiny repetition penalty divides logits towards inf, huge negative presence /
    frequency penalties add towards inf) still give a token, and the one they favour."""
    logits = torch.tensor([[1.0, 2.0, 3.0, -2.0]])
    cases = [dict(repetition_penalty=1e-40), dict(presence_penalty=-3e38, frequency_penalty=-3e38),
             dict(repetition_penalty=3e38), dict(presence_penalty=3e38, frequency_penalty=3e38)]
    for params in cases:
        for sampling in ({"top_k": 4, "temperature": 1.0}, {"top_p": 0.99, "temperature": 1e-3}, {}):
            seq = make_seq([0], [0, 0], seed=5, **params, **sampling)
            token = Sampler()(logits.clone(), [seq])[0]
            assert 0 <= token < 4, (params, sampling)
            if params.get("repetition_penalty", 1.0) < 1 or params.get("presence_penalty", 0.0) < 0:
                assert token == 0, (params, sampling)  # token 0 (seen) is pushed to +inf-like: it must win

