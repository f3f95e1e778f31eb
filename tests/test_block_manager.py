"""BlockManager and Scheduler without a model: lazy block growth, token budget, chunking, preemption."""

from __future__ import annotations

from builder.runtime.block_manager import BlockManager
from builder.runtime.sampling_params import SamplingParams
from builder.runtime.scheduler import Scheduler
from builder.runtime.sequence import Sequence, SequenceStatus


def seq(name: str, prompt_len: int) -> Sequence:
    """A sequence with a dummy prompt."""
    return Sequence(name, list(range(3, 3 + prompt_len)), SamplingParams())


def run_step(scheduler: Scheduler) -> dict[str, tuple[int, bool]]:
    """Schedule one step, pretend it ran (advance caches, sample token 7 where due); return name -> (tokens, prefill)."""
    out = scheduler.schedule()
    plan = {c.seq.request_id: (c.num_tokens, c.is_prefill) for c in out.chunks}
    for c in out.chunks:
        samples = c.samples
        c.seq.num_computed_tokens += c.num_tokens
        if samples:
            c.seq.append_token(7)
    return plan


def test_blocks_grow_with_the_sequence_and_return_on_free():
    manager = BlockManager(num_blocks=8, tokens_per_block=4)
    s = seq("a", 5)
    manager.grow(s, 5)
    assert len(s.block_table) == 2 and manager.num_free_blocks == 6
    manager.grow(s, 8)
    assert len(s.block_table) == 2
    manager.grow(s, 9)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert manager.slot(s, 8) == s.block_table[2] * 4
    manager.free(s)
    assert s.block_table == [] and manager.num_free_blocks == 8


def test_can_grow_and_tokens_fitting():
    manager = BlockManager(num_blocks=3, tokens_per_block=4)
    a, b = seq("a", 6), seq("b", 1)
    manager.grow(a, 6)
    assert manager.can_grow(b, 4) and not manager.can_grow(b, 5)
    assert manager.tokens_fitting(a) == 12 and manager.blocks_missing(a, 9) == 1


def test_decodes_and_prefill_chunks_share_the_token_budget():
    manager = BlockManager(num_blocks=64, tokens_per_block=4)
    scheduler = Scheduler(manager, max_batch_size=8, max_num_tokens=10)
    scheduler.add(seq("a", 3))
    assert run_step(scheduler) == {"a": (3, True)}
    scheduler.add(seq("long", 25))
    assert run_step(scheduler) == {"a": (1, False), "long": (9, True)}
    assert run_step(scheduler) == {"a": (1, False), "long": (9, True)}
    assert run_step(scheduler) == {"a": (1, False), "long": (7, True)}
    assert run_step(scheduler) == {"a": (1, False), "long": (1, False)}
    assert len(scheduler.running[1].block_table) == 7  # 26 tokens cached + 1 new: grown block by block


def test_max_batch_size_limits_admission():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_size=2, max_num_tokens=100)
    for name in "abc":
        scheduler.add(seq(name, 2))
    assert set(run_step(scheduler)) == {"a", "b"}
    assert [s.request_id for s in scheduler.waiting] == ["c"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    manager = BlockManager(num_blocks=5, tokens_per_block=2)
    scheduler = Scheduler(manager, max_batch_size=8, max_num_tokens=100)
    a, b = seq("a", 3), seq("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler) == {"a": (3, True), "b": (3, True)}  # 2 blocks each, 1 left
    assert run_step(scheduler) == {"a": (1, False), "b": (1, False)}  # the 4th token still fits
    out = scheduler.schedule()  # a and b both need a third block for their 5th token; only a gets it
    assert out.num_preempted == 1 and [c.seq.request_id for c in out.chunks] == ["a"]
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.prefill_target == b.num_tokens == 5 and b.is_prefilling
    assert scheduler.waiting[0] is b and manager.num_free_blocks == 2 and len(a.block_table) == 3


def test_finish_and_abort_release_blocks():
    manager = BlockManager(num_blocks=16, tokens_per_block=4)
    scheduler = Scheduler(manager, max_batch_size=8, max_num_tokens=100)
    a, b = seq("a", 9), seq("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    scheduler.finish(a, "length")
    scheduler.abort(b)
    assert manager.num_free_blocks == 16 and not scheduler.has_unfinished()
    assert a.finish_reason == "length" and b.finish_reason == "aborted"


def test_admission_keeps_a_block_per_running_sequence():
    manager = BlockManager(num_blocks=6, tokens_per_block=2)
    scheduler = Scheduler(manager, max_batch_size=8, max_num_tokens=100)
    scheduler.add(seq("a", 3))
    run_step(scheduler)  # a holds 2 blocks; its 4th token still fits them
    scheduler.add(seq("b", 10))
    assert run_step(scheduler) == {"a": (1, False), "b": (6, True)}  # 3 blocks for b, 1 held back for a
    assert manager.num_free_blocks == 1
