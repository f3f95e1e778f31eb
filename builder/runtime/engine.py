"""LLMEngine: in-flight batching over a paged KV cache; add requests, step, stream new tokens, abort."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from builder.config import EngineConfig
from builder.errors import BuilderError, ConfigError, RequestError
from builder.runtime.block_manager import BlockManager
from builder.runtime.distributed import WorkerGroup, rank_device
from builder.runtime.model_runner import ModelRunner, StepInput, gpu_kv_cache_mb, num_kv_blocks
from builder.runtime.sampler import Sampler
from builder.runtime.sampling_params import SamplingParams
from builder.runtime.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from builder.runtime.sequence import Sequence
from builder.runtime.weights import check_mapping


@dataclass
class RequestOutput:
    """What one request produced in one step: only the new tokens (streaming), and whether it is done."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "length", "end_id", "stop_words" or "aborted"


@dataclass
class EngineStats:
    """Counters since the engine started; kv_blocks_free is the current free pool."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    max_seqs_in_step: int = 0
    multi_seq_steps: int = 0
    mixed_steps: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    preemptions: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    # the last step and the queue now (TensorRT-LLM's per-iteration metrics)
    last_step_seqs: int = 0              # sequences run in the last step
    last_step_context_seqs: int = 0      # of them in prefill (prompt or recompute chunks)
    last_step_context_tokens: int = 0    # prompt tokens computed in the last step
    waiting: int = 0                     # requests queued, not yet admitted (preempted ones included)
    running: int = 0                     # requests admitted (holding KV blocks)


class LLMEngine:
    """Runs one engine folder; not thread-safe (feed it from one thread).

    An engine built with tensor parallelism (config.json mapping.world_size N > 1) starts N-1 worker processes
    (one per extra rank; cuda:k+r for rank r on CUDA) and stops them in close(), also called at interpreter exit.
    The KV pool has the same block count on every rank: kv_cache_memory_mb per rank over its local KV heads.
    """

    def __init__(self, engine_dir: str | Path, device: str = "cpu", kv_cache_memory_mb: float | None = None,
                 max_num_tokens: int | None = None, max_batch_size: int | None = None,
                 cuda_graphs: bool = True, kv_cache_free_gpu_mem_fraction: float | None = None) -> None:
        """Load the engine; the overrides replace build_config.json's values of the same name.

        KV pool: kv_cache_memory_mb when given; else on CUDA kv_cache_free_gpu_mem_fraction of the free memory
        (capped at what max_batch_size sequences of max_seq_len use), on CPU the build's kv_cache_memory_mb.
        cuda_graphs: capture decode steps (up to max_batch_size sequences) as CUDA graphs on fp16/bf16 CUDA
        engines (vLLM's enforce_eager=True is cuda_graphs=False); ignored elsewhere."""
        self.config = EngineConfig.load(Path(engine_dir))
        build = self.config.build
        self.max_num_tokens = _positive("max_num_tokens", max_num_tokens or build.max_num_tokens)
        self.max_batch_size = _positive("max_batch_size", max_batch_size or build.max_batch_size)
        self.device = torch.device(device)
        self.tp_size = check_mapping(self.config.model)
        self._closed = False
        if kv_cache_memory_mb is None and self.device.type == "cuda":
            fraction = kv_cache_free_gpu_mem_fraction or build.kv_cache_free_gpu_mem_fraction
            devices = [rank_device(self.device, r, self.tp_size) for r in range(self.tp_size)]
            kv_cache_memory_mb = gpu_kv_cache_mb(self.config, devices, fraction, self.max_batch_size)
        num_blocks = num_kv_blocks(self.config, kv_cache_memory_mb or build.kv_cache_memory_mb)
        self.block_manager = BlockManager(num_blocks, build.tokens_per_block)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.max_num_tokens)
        self._workers = None
        graph_batch = self.max_batch_size if cuda_graphs else 0
        self._finalizer: weakref.finalize | None = None
        if self.tp_size > 1:
            self._workers = WorkerGroup.start(Path(engine_dir), self.device, num_blocks, self.tp_size, graph_batch)
            self._finalizer = weakref.finalize(self, self._workers.close)  # runs at exit if close() was not called
            self.device = self._workers.device
        try:
            self.runner = ModelRunner(Path(engine_dir), self.config, self.device, num_blocks,
                                      tp=self._workers.tp if self._workers else None,
                                      broadcast=self._workers.send_step if self._workers else None,
                                      graph_batch_size=graph_batch)
            if self._workers:
                self._workers.before_destroy.append(self.runner.release_graphs)
                self._workers.wait_ready()
        except BaseException:
            self.close()
            raise
        self.sampler = Sampler()
        self._stats = EngineStats(kv_blocks_total=num_blocks)
        self._requests: dict[str, Sequence] = {}
        self._generate_ids = itertools.count()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the tensor-parallel worker ranks (empty for a single-rank engine)."""
        return self._workers.pids if self._workers else []

    def close(self) -> None:
        """Stop the tensor-parallel workers and release the process group; idempotent, a no-op for one rank.

        The engine cannot step afterwards."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # calls WorkerGroup.close once

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters, with the current number of free KV blocks."""
        self._stats.kv_blocks_free = self.block_manager.num_free_blocks
        self._stats.waiting = len(self.scheduler.waiting)
        self._stats.running = len(self.scheduler.running)
        return EngineStats(**vars(self._stats))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; RequestError if it is invalid or cannot fit this engine."""
        self._check_open()
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in flight; use a unique id per request")
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        self._check_request(prompt, params)
        seq = Sequence(request_id, prompt, params, generator=self._generator(params))
        self._requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; it produces no output afterwards. Unknown ids are ignored."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.abort(seq)
        self._stats.requests_aborted += 1

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the mixed prefill/decode batch, sample, and report per-request progress."""
        self._check_open()
        batch = self.scheduler.schedule()
        self._stats.preemptions += batch.num_preempted
        if not batch.chunks:
            return []
        logits = self._run(batch)
        sampling = [c.seq for c in batch.chunks if c.samples]
        tokens = self.sampler(logits, sampling)
        for chunk in batch.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        self._count(batch)
        return [self._append(seq, token) for seq, token in zip(sampling, tokens)]

    def _run(self, batch: SchedulerOutput) -> torch.Tensor:
        """The step's forward pass; under tensor parallelism a failure on any rank closes the engine."""
        return self._guarded(lambda: self.runner.run(batch, self.block_manager))

    def score(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced float32 logits [len(p), V] for every position of each prompt (row t predicts token t+1).

        Runs on an idle engine: the prompts are prefilled through the same paged-KV forward pass as generation
        (several per step, long ones in chunks of max_num_tokens), nothing is sampled and the KV blocks are freed
        afterwards. Each prompt must fit max_seq_len and the KV pool. Used by builder.accuracy.
        """
        self._check_open()
        if self.has_unfinished():
            raise RequestError("score() needs an idle engine; finish or abort the in-flight requests first")
        build, vocab = self.config.build, self.config.model.vocab_size
        seqs = []
        for k, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not ids or len(ids) > build.max_seq_len:
                raise RequestError(f"score() prompt {k} has {len(ids)} tokens; it needs 1..max_seq_len "
                                   f"({build.max_seq_len})")
            if self.block_manager.blocks_for(len(ids)) > self.block_manager.num_blocks:
                raise RequestError(f"score() prompt {k} ({len(ids)} tokens) needs more KV blocks than the whole "
                                   f"pool ({self.block_manager.num_blocks}); raise kv_cache_memory_mb")
            _check_ids("prompt", ids, vocab)
            seqs.append(Sequence(f"score-{k}", ids, SamplingParams()))
        # rows of float32 logits per step: max_num_tokens, capped near 1 GiB of logits for large vocabularies
        budget_rows = max(1, min(self.max_num_tokens, 2**28 // max(1, vocab)))
        results: list[list[torch.Tensor]] = [[] for _ in seqs]
        pending = list(range(len(seqs)))
        try:
            while pending:
                chunks, owners, budget = [], [], budget_rows
                for i in pending:  # in order; a prompt gets all of its KV blocks when it first runs
                    seq = seqs[i]
                    if not seq.block_table:
                        if len(owners) >= self.max_batch_size or \
                                not self.block_manager.can_grow(seq, seq.num_tokens):
                            break
                        self.block_manager.grow(seq, seq.num_tokens)
                    n = min(seq.num_uncomputed_tokens, budget)
                    chunks.append(ScheduledChunk(seq, n, True))
                    owners.append(i)
                    budget -= n
                    if budget == 0:
                        break
                if not chunks:
                    raise RequestError("score(): the KV pool has no room for the next prompt; raise "
                                       "kv_cache_memory_mb")
                step = self.runner.prepare(SchedulerOutput(chunks), self.block_manager)
                step.last_rows = list(range(len(step.input_ids)))  # logits for every position, not just the last
                logits = self._guarded(lambda: self._execute(step))
                for i, part in zip(owners, logits.split([c.num_tokens for c in chunks])):
                    seqs[i].num_computed_tokens += part.shape[0]
                    results[i].append(part)
                    if seqs[i].num_uncomputed_tokens == 0:
                        self.block_manager.free(seqs[i])
                pending = [i for i in pending if seqs[i].num_uncomputed_tokens]
        finally:
            for seq in seqs:
                self.block_manager.free(seq)
        return [torch.cat(parts) for parts in results]

    def _execute(self, step: StepInput) -> torch.Tensor:
        """Send a prepared step to the other ranks (if any) and run it here; rank 0's logits."""
        if self.runner.broadcast is not None:
            self.runner.broadcast(step)
        return self.runner.execute(step)

    def _guarded(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """forward(); under tensor parallelism a failure on any rank closes the engine."""
        if self._workers is None:
            return forward()
        try:
            return forward()
        except BaseException as exc:
            dead = self._workers.dead_ranks(wait=1.0) if isinstance(exc, Exception) else ""
            self.close()  # the ranks are out of step now
            if isinstance(exc, BuilderError) or not isinstance(exc, Exception):
                raise
            cause = f"{dead}: " if dead else ""
            raise BuilderError(f"tensor-parallel step failed ({cause}{type(exc).__name__}: {exc}); the engine is "
                               "closed, create a new one") from exc

    def _check_open(self) -> None:
        """RequestError once close() has been called."""
        if self._closed:
            raise RequestError("the engine is closed; create a new LLMEngine")

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Offline loop: run every prompt to completion on an idle engine and return each one's output ids."""
        if self.has_unfinished():
            raise RequestError("generate() needs an idle engine; drive in-flight requests with step() instead")
        per_prompt = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise RequestError(f"generate() got {len(prompts)} prompts but {len(per_prompt)} SamplingParams; "
                               "pass one per prompt or a single one for all")
        ids = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        try:
            for rid, prompt, p in zip(ids, prompts, per_prompt):
                self.add_request(rid, prompt, p)
            while self.has_unfinished():
                for out in self.step():
                    results[out.request_id] += out.new_token_ids
        finally:
            for rid in ids:
                self.abort(rid)
        return [results[rid] for rid in ids]

    def _check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for prompts or parameters this engine cannot serve."""
        build, vocab = self.config.build, self.config.model.vocab_size
        if not prompt_ids:
            raise RequestError("prompt is empty; send at least one input token")
        if len(prompt_ids) > build.max_input_len:
            raise RequestError(f"prompt has {len(prompt_ids)} tokens, more than the engine's max_input_len "
                               f"({build.max_input_len}); shorten it or rebuild with a larger --max-input-len")
        total = len(prompt_ids) + params.max_tokens
        if total > build.max_seq_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds the engine's max_seq_len ({build.max_seq_len}); lower max_tokens or "
                               "rebuild with a larger --max-seq-len")
        if self.block_manager.blocks_for(total) > self.block_manager.num_blocks:
            raise RequestError(f"prompt + max_tokens = {total} tokens needs more KV blocks than the whole pool "
                               f"({self.block_manager.num_blocks} blocks of {build.tokens_per_block}); lower "
                               "max_tokens or raise kv_cache_memory_mb")
        _check_ids("input_ids (the prompt)", prompt_ids, vocab)  # tensorrt_llm's input name: its clients see this
        for word in params.bad_words:
            _check_ids("bad_words_list (bad_words)", word, vocab)

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """A per-request generator (seeded when params.seed is set) for sampled requests; None when greedy."""
        if params.greedy:
            return None
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        return generator

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        """Apply one sampled token: stop on end_id (token dropped), stop words or length; build the output."""
        params = seq.params
        if token == params.end_id and len(seq.output_ids) >= params.min_tokens:
            return self._finish(seq, [], "end_id")
        seq.append_token(token)
        if len(seq.output_ids) >= params.min_tokens and _ends_with_stop_word(seq.output_ids, params.stop_words):
            return self._finish(seq, [token], "stop_words")
        if len(seq.output_ids) >= params.max_tokens:
            return self._finish(seq, [token], "length")
        return RequestOutput(seq.request_id, [token], False)

    def _finish(self, seq: Sequence, new_tokens: list[int], reason: str) -> RequestOutput:
        """Finish seq, free its blocks and forget its id."""
        self.scheduler.finish(seq, reason)
        del self._requests[seq.request_id]
        self._stats.requests_finished += 1
        return RequestOutput(seq.request_id, new_tokens, True, reason)

    def _count(self, batch: SchedulerOutput) -> None:
        """Update the step counters."""
        s = self._stats
        num_seqs = len(batch.chunks)
        prefill, decode = batch.num_prefill_tokens, batch.num_decode_tokens
        s.steps += 1
        s.prefill_tokens += prefill
        s.decode_tokens += decode
        s.max_seqs_in_step = max(s.max_seqs_in_step, num_seqs)
        s.last_step_seqs, s.last_step_context_tokens = num_seqs, prefill
        s.last_step_context_seqs = sum(1 for c in batch.chunks if c.is_prefill)
        s.multi_seq_steps += num_seqs > 1
        s.mixed_steps += prefill > 0 and decode > 0


def _ends_with_stop_word(output_ids: list[int], stop_words: list[list[int]]) -> bool:
    """True when the generated tokens end with one of the stop sequences."""
    return any(len(word) <= len(output_ids) and output_ids[-len(word):] == word for word in stop_words)


def _check_ids(what: str, ids: list[int], vocab_size: int) -> None:
    """RequestError when a token id is outside [0, vocab_size)."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{what} holds token id {bad[0]} outside the model's vocabulary [0, {vocab_size}); "
                           "check the tokenizer matches the engine")


def _positive(name: str, value: int) -> int:
    """value, or ConfigError when it is not positive."""
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    return value
