"""LLMEngine end to end on tiny random HF models: greedy parity with transformers, batching, paging, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builder.checkpoint.convert import convert_checkpoint
from builder.config import BuildSettings
from builder.errors import RequestError
from builder.models import REGISTRY
from builder.runtime import LLMEngine, SamplingParams

ARCHITECTURES = tuple(REGISTRY)  # every registered architecture (builder.models.REGISTRY)
EOS = 2
VOCAB = 256
PROMPT_LENGTHS = (1, 5, 17, 40)
LIMITS = dict(dtype="float32", max_batch_size=32, max_input_len=64, max_seq_len=96, max_num_tokens=256,
              tokens_per_block=4, kv_cache_memory_mb=1)
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    # Qwen2.5 / Qwen3 long context; beta_fast 8 puts the ramp inside head_dim 16's 8 frequencies
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0},
}


def make_hf_model(hf_dir: Path, architecture: str, rope: dict | None = None, seed: int = 0):
    """Save a small random-init HF model (std 0.2, so greedy argmax has no near-ties) and return it."""
    import transformers

    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    extra = {"sliding_window": None} if architecture == "MistralForCausalLM" else {}
    if rope:
        extra["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    config = config_cls(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # HF zero-inits biases; make Qwen2's qkv bias matter
                param.normal_(0.0, 0.2)
            elif "norm" in name:  # HF inits norm weights to ones; make each one (Qwen3's q/k norms too) matter
                param.normal_(1.0, 0.2)
    model.save_pretrained(hf_dir)
    return model


def build_engine(hf_dir: Path, engine_dir: Path, **limits) -> Path:
    """Convert hf_dir into an engine folder with small test limits."""
    convert_checkpoint(hf_dir, engine_dir, BuildSettings(**{**LIMITS, **limits}))
    return engine_dir


def prompts(lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    """Random prompts avoiding the special ids 0..2."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy continuation, with a trailing eos removed (our engine never outputs end_id)."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    return out[:-1] if out and out[-1] == EOS else out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """(HF model, engine folder) per architecture and RoPE-scaling variant."""
    root = tmp_path_factory.mktemp("runtime")
    built = {}
    variants = [(arch, None) for arch in ARCHITECTURES] + [("LlamaForCausalLM", r) for r in ROPE_VARIANTS]
    for seed, (arch, rope) in enumerate(variants):
        key = arch if rope is None else f"{arch}-{rope}"
        model = make_hf_model(root / f"hf-{key}", arch, ROPE_VARIANTS.get(rope), seed=seed)
        built[key] = (model, build_engine(root / f"hf-{key}", root / f"engine-{key}"))
    return built


@pytest.fixture(scope="module")
def llama(models) -> tuple[object, Path]:
    """The plain tiny Llama (HF model, engine folder)."""
    return models["LlamaForCausalLM"]


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Add every request, step to completion, and collect streamed tokens per request."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, list[int]] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    return got


@pytest.mark.parametrize("key", [*ARCHITECTURES, *(f"LlamaForCausalLM-{rope}" for rope in ROPE_VARIANTS)])
def test_greedy_matches_transformers(models, key):
    model, engine_dir = models[key]
    engine = LLMEngine(engine_dir)
    batch = prompts()
    ours = engine.generate(batch, SamplingParams(max_tokens=24, end_id=EOS))
    for prompt, got in zip(batch, ours):
        assert got == hf_greedy(model, prompt, 24), f"prompt of {len(prompt)} tokens"
    assert engine.stats.kv_blocks_free == engine.stats.kv_blocks_total


def test_kv_pool_is_sized_from_build_config(llama):
    engine = LLMEngine(llama[1])
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers * (K, V) * tokens_per_block * kv_heads * head_size * fp32
    assert engine.stats.kv_blocks_total == engine.stats.kv_blocks_free == 2**20 // block_bytes
    assert tuple(engine.runner.kv_cache.shape) == (2, 2, 2**20 // block_bytes, 4, 2, 16)


def test_paged_attention_matches_dense_causal_attention():
    import plugins

    gen = torch.Generator().manual_seed(0)
    tpb, nq, nkv, d = 4, 4, 2, 8
    k_cache, v_cache = torch.randn(2, 12, tpb, nkv, d, generator=gen).unbind(0)
    tables = [[7, 2, 9], [0, 11, 4, 5]]  # scattered blocks
    context, query = [10, 13], [3, 13]  # a chunk continuing a prefill, and a whole prompt
    q = torch.randn(sum(query), nq, d, generator=gen)
    meta = plugins.AttentionMetadata(
        slot_mapping=torch.zeros(sum(query), dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32),
        query_start=torch.tensor([0, 3, 16], dtype=torch.int32), context_lens=torch.tensor(context, dtype=torch.int32),
        query_lens_host=query, context_lens_host=context)
    out = plugins.paged_attention(q, k_cache, v_cache, meta, d ** -0.5)
    start = 0
    for table, ctx, qlen in zip(tables, context, query):
        k = k_cache[table].flatten(0, 1)[:ctx].repeat_interleave(2, dim=1).transpose(0, 1)
        v = v_cache[table].flatten(0, 1)[:ctx].repeat_interleave(2, dim=1).transpose(0, 1)
        mask = torch.ones(qlen, ctx, dtype=torch.bool).tril(ctx - qlen)
        ref = torch.nn.functional.scaled_dot_product_attention(q[start:start + qlen].transpose(0, 1), k, v,
                                                               attn_mask=mask)
        torch.testing.assert_close(out[start:start + qlen], ref.transpose(0, 1))
        start += qlen


def test_chunked_prefill_is_identical(llama):
    model, engine_dir = llama
    engine = LLMEngine(engine_dir, max_num_tokens=7)
    batch = prompts((40, 23, 3))
    ours = engine.generate(batch, SamplingParams(max_tokens=10))
    assert ours == [hf_greedy(model, p, 10) for p in batch]
    stats = engine.stats
    assert stats.prefill_tokens == sum(map(len, batch)) and stats.mixed_steps > 0
    assert stats.steps >= sum(map(len, batch)) // 7


def test_concurrent_requests_match_solo(llama):
    _, engine_dir = llama
    lengths = [1 + (7 * i) % 45 for i in range(18)]
    requests = {f"r{i}": (p, SamplingParams(max_tokens=4 + i % 9)) for i, p in enumerate(prompts(lengths, seed=3))}
    solo_engine = LLMEngine(engine_dir)
    solo = {rid: solo_engine.generate([p], params)[0] for rid, (p, params) in requests.items()}
    engine = LLMEngine(engine_dir, max_num_tokens=64)
    ids = list(requests)
    for rid in ids[:10]:
        engine.add_request(rid, *requests[rid])
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    pending = ids[10:]
    while engine.has_unfinished() or pending:
        if pending and engine.stats.steps >= 2:  # join while others are decoding
            rid = pending.pop(0)
            engine.add_request(rid, *requests[rid])
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got == solo
    stats = engine.stats
    assert stats.max_seqs_in_step >= 12 and stats.multi_seq_steps > 0 and stats.mixed_steps > 0
    assert stats.requests_finished == len(ids) and stats.kv_blocks_free == stats.kv_blocks_total


def test_preemption_under_tiny_pool_keeps_outputs(llama):
    _, engine_dir = llama
    batch = prompts((10, 14, 9, 12, 11, 13), seed=5)
    params = SamplingParams(max_tokens=14)
    expected = LLMEngine(engine_dir).generate(batch, params)
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers * (K, V) * tokens_per_block * kv_heads * head_size * fp32
    engine = LLMEngine(engine_dir, kv_cache_memory_mb=16 * block_bytes / 2**20)
    assert engine.stats.kv_blocks_total == 16
    assert engine.generate(batch, params) == expected
    stats = engine.stats
    assert stats.preemptions > 0
    assert stats.kv_blocks_free == stats.kv_blocks_total == 16


def test_request_longer_than_pool_is_rejected(llama):
    _, engine_dir = llama
    engine = LLMEngine(engine_dir, kv_cache_memory_mb=4 * 2048 / 2**20)
    with pytest.raises(RequestError, match="KV blocks"):
        engine.add_request("big", list(range(3, 15)), SamplingParams(max_tokens=8))


def test_abort_frees_blocks_and_silences_request(llama):
    _, engine_dir = llama
    engine = LLMEngine(engine_dir, max_num_tokens=16, max_batch_size=2)
    batch = prompts((30, 20, 25), seed=7)
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20))
    for _ in range(3):
        engine.step()
    assert engine.stats.kv_blocks_free < engine.stats.kv_blocks_total
    engine.abort("r0")  # running
    engine.abort("r2")  # possibly still waiting
    engine.abort("nope")  # unknown ids are ignored
    seen = set()
    while engine.has_unfinished():
        seen |= {out.request_id for out in engine.step()}
    assert seen == {"r1"}
    stats = engine.stats
    assert stats.requests_aborted == 2 and stats.requests_finished == 1
    assert stats.kv_blocks_free == stats.kv_blocks_total
    engine.add_request("r0", batch[0], SamplingParams(max_tokens=2))  # the id is free again


def test_streaming_outputs_one_token_per_step(llama):
    _, engine_dir = llama
    engine = LLMEngine(engine_dir, max_num_tokens=8)
    engine.add_request("a", prompts((20,))[0], SamplingParams(max_tokens=5))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [len(o.new_token_ids) for o in outputs] == [1] * 5
    assert [o.finished for o in outputs] == [False] * 4 + [True]
    assert outputs[-1].finish_reason == "length"


@pytest.mark.parametrize("prompt, params, needle", [
    ([], SamplingParams(), "empty"),
    (list(range(3, 70)), SamplingParams(), "max_input_len (64)"),
    (list(range(3, 53)), SamplingParams(max_tokens=50), "prompt (50 tokens) + max_tokens (50) = 100 exceeds the "
                                                         "engine's max_seq_len (96)"),
    ([3, 4], SamplingParams(temperature=-1.0), "temperature"),
    ([3, VOCAB], SamplingParams(), "outside the model's vocabulary"),
    ([3, 4], SamplingParams(bad_words=[[VOCAB + 5]]), "bad_words"),
])
def test_invalid_requests_raise(llama, prompt, params, needle):
    engine = LLMEngine(llama[1])
    with pytest.raises(RequestError) as info:
        engine.add_request("x", prompt, params)
    assert needle in str(info.value)
    assert not engine.has_unfinished()


def test_duplicate_request_id_raises(llama):
    engine = LLMEngine(llama[1])
    engine.add_request("x", [3, 4], SamplingParams())
    with pytest.raises(RequestError, match="already in flight"):
        engine.add_request("x", [5, 6], SamplingParams())


def sampled(seed: int | None) -> SamplingParams:
    """Non-greedy params with a flat-ish distribution."""
    return SamplingParams(max_tokens=12, temperature=3.0, top_p=0.95, top_k=50, seed=seed)


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    _, engine_dir = llama
    prompt = prompts((9,), seed=11)[0]
    engine = LLMEngine(engine_dir)
    alone = engine.generate([prompt], sampled(123))[0]
    others = {f"o{i}": (p, sampled(i)) for i, p in enumerate(prompts((4, 30, 12), seed=12))}
    crowded = run_all(engine, {"me": (prompt, sampled(123)), **others})["me"]
    chunked = LLMEngine(engine_dir, max_num_tokens=5).generate([prompt], sampled(123))[0]
    assert alone == crowded == chunked
    assert engine.generate([prompt], sampled(124))[0] != alone
    unseeded = {tuple(engine.generate([prompt], sampled(None))[0]) for _ in range(3)}
    assert len(unseeded) > 1


@pytest.fixture(scope="module")
def greedy_ref(llama) -> tuple[LLMEngine, list[int], list[int]]:
    """An engine, a prompt and its unconstrained greedy continuation with no repeated tokens in the first 6."""
    engine = LLMEngine(llama[1])
    for prompt in prompts((6, 7, 8, 9, 10), seed=21):
        ref = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
        if len(set(ref[:6])) == 6 and not set(ref[:6]) & {0, 1, 2}:
            return engine, prompt, ref
    pytest.fail("no prompt with a repetition-free greedy start")


def finish(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
    """Run one request; return its tokens and finish reason."""
    engine.add_request("q", prompt, params)
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason if out.finished else reason
    return tokens, reason


def test_end_id_stops_without_emitting_it(greedy_ref):
    engine, prompt, ref = greedy_ref
    assert finish(engine, prompt, SamplingParams(max_tokens=12, end_id=ref[3])) == (ref[:3], "end_id")
    assert finish(engine, prompt, SamplingParams(max_tokens=12)) == (ref, "length")


def test_min_tokens_blocks_end_id_and_stop_words(greedy_ref):
    engine, prompt, ref = greedy_ref
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=12, end_id=ref[3], min_tokens=6))
    assert tokens[:3] == ref[:3] and tokens[3] != ref[3] and len(tokens) >= 6 and ref[3] not in tokens[:6]
    stop = SamplingParams(max_tokens=12, stop_words=[[ref[2], ref[3]]], min_tokens=6)
    tokens, _ = finish(engine, prompt, stop)
    assert tokens[:6] == ref[:6] and len(tokens) > 4


def test_stop_words_end_with_the_stop_tokens(greedy_ref):
    engine, prompt, ref = greedy_ref
    params = SamplingParams(max_tokens=12, stop_words=[[999_999, 5], [ref[2], ref[3]], [ref[5]]])
    assert finish(engine, prompt, params) == (ref[:4], "stop_words")


def test_bad_words_mask_tokens(greedy_ref):
    engine, prompt, ref = greedy_ref
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=4, bad_words=[[ref[0]]]))
    assert tokens[0] != ref[0]
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=4, bad_words=[[ref[0], ref[1]]]))
    assert tokens[0] == ref[0] and tokens[1] != ref[1]
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=2, bad_words=[[prompt[-1], ref[0]]]))
    assert tokens[0] != ref[0]


def test_penalties_change_greedy_choice(greedy_ref):
    engine, prompt, ref = greedy_ref
    assert finish(engine, prompt, SamplingParams(max_tokens=12, presence_penalty=0.0))[0] == ref
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=12, frequency_penalty=1e4))
    assert len(set(tokens)) == len(tokens)
    tokens, _ = finish(engine, prompt, SamplingParams(max_tokens=12, repetition_penalty=1e4))
    assert not set(tokens) & set(prompt) and len(set(tokens)) == len(tokens)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_engines_run(models, tmp_path, dtype):
    model, _ = models["Qwen2ForCausalLM"]
    model.save_pretrained(tmp_path / "hf")
    engine = LLMEngine(build_engine(tmp_path / "hf", tmp_path / "engine", dtype=dtype))
    assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
    batch = prompts((5, 17))
    ours = engine.generate(batch, SamplingParams(max_tokens=6))
    reference = [hf_greedy(model, p, 6) for p in batch]
    assert all(len(o) == 6 for o in ours)
    assert [o[0] for o in ours] == [r[0] for r in reference]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen3's long-context setting
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
     "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "truncate": False},
])
def test_rope_frequencies_and_attention_factor_match_transformers(rope):
    """Inverse frequencies and the cos/sin attention factor equal transformers' ROPE_INIT_FUNCTIONS for real-model
    settings (head_dim 128, theta 1e6, 131072 positions)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from builder.config import ModelConfig
    from builder.layers.rotary import rope_attention_factor, rope_inv_freq

    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                     rope_parameters={"rope_theta": 1e6, **rope})
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu"))
    cfg = ModelConfig(architecture="LlamaForCausalLM", dtype="float32", vocab_size=8, hidden_size=4096,
                      num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8, head_size=128,
                      intermediate_size=8, max_position_embeddings=131072, rotary_base=1e6, rotary_scaling=rope)
    torch.testing.assert_close(rope_inv_freq(cfg), want.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(cfg) == pytest.approx(want_factor, rel=1e-9)
