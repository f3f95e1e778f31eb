"""Tensor parallelism: per-rank shards as trtllm-checkpoint.md section 2 prescribes, recombination, TP engine parity,
validation errors, quantization-scale split rules, worker shutdown and --tp plumbing."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builder.checkpoint.convert import convert_checkpoint
from builder.models.parallel import merge_shards, padded_vocab, parallel_style, split_for_rank, validate_tp
from builder.models.layout import expected_weights
from builder.config import BuildSettings, EngineConfig
from builder.errors import BuilderError, ConfigError, RequestError
from builder.runtime import LLMEngine, SamplingParams

H, I, D, NQ, NKV, LAYERS = 64, 128, 16, 4, 2, 2
VOCAB = 258  # not a multiple of 4: lm_head is zero-padded for tp 4
EOS = 2
LIMITS = dict(dtype="float32", max_batch_size=32, max_input_len=64, max_seq_len=96, max_num_tokens=256,
              tokens_per_block=4, kv_cache_memory_mb=1)


def make_hf_model(hf_dir: Path, architecture: str = "LlamaForCausalLM", seed: int = 0) -> Path:
    """A small random HF model saved by transformers (std 0.2, biases random too), nq 4, nkv 2."""
    import transformers

    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=NQ,
                        num_key_value_heads=NKV, head_dim=D, intermediate_size=I, max_position_embeddings=256,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(hf_dir)
    return hf_dir


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """Engine folders for (architecture, tp): Llama at tp 1, 2, 4 and Qwen2 (qkv bias, tied lm_head) at 1, 2."""
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for arch, tps in (("LlamaForCausalLM", (1, 2, 4)), ("Qwen2ForCausalLM", (1, 2))):
        hf = make_hf_model(root / f"hf-{arch}", arch)
        for tp in tps:
            convert_checkpoint(hf, root / f"{arch}-tp{tp}", BuildSettings(**LIMITS), tp_size=tp)
            out[arch, tp] = root / f"{arch}-tp{tp}"
        out[arch, "hf"] = hf
    return out


def rank_files(engine_dir: Path) -> list[dict[str, torch.Tensor]]:
    """Every rank{N}.safetensors of an engine folder, in rank order."""
    world = json.loads((engine_dir / "config.json").read_text())["mapping"]["world_size"]
    return [load_file(engine_dir / f"rank{r}.safetensors") for r in range(world)]


def expected_rank_shapes(tp: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """Per-rank shapes written out from the doc's table (independently of shard.py)."""
    qkv = (NQ // tp + 2 * max(1, NKV // tp)) * D
    out = {"transformer.vocab_embedding.weight": (VOCAB, H), "transformer.ln_f.weight": (H,),
           "lm_head.weight": (-(-VOCAB // tp), H)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        out |= {p + "input_layernorm.weight": (H,), p + "post_layernorm.weight": (H,),
                p + "attention.qkv.weight": (qkv, H), p + "attention.dense.weight": (H, NQ * D // tp),
                p + "mlp.fc.weight": (I // tp, H), p + "mlp.gate.weight": (I // tp, H),
                p + "mlp.proj.weight": (H, I // tp)}
        if bias:
            out[p + "attention.qkv.bias"] = (qkv,)
    return out


# --- checkpoint shards ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tp", [("LlamaForCausalLM", 1), ("LlamaForCausalLM", 2), ("LlamaForCausalLM", 4),
                                     ("Qwen2ForCausalLM", 2)])
def test_shard_shapes_and_config(engines, arch, tp):
    engine_dir = engines[arch, tp]
    config = json.loads((engine_dir / "config.json").read_text())
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert config["num_key_value_heads"] == NKV and config["num_attention_heads"] == NQ
    assert config["vocab_size"] == VOCAB and config["use_parallel_embedding"] is False
    assert sorted(p.name for p in engine_dir.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
    want = expected_rank_shapes(tp, bias=arch == "Qwen2ForCausalLM")
    for rank, tensors in enumerate(rank_files(engine_dir)):
        assert {n: tuple(t.shape) for n, t in tensors.items()} == want, f"rank {rank}"
        assert all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_split_matches_hf_heads(engines, tp):
    """rank r's qkv = [q_r; k_r; v_r] of the HF q/k/v_proj (KV heads duplicated when tp > nkv)."""
    arch = "Qwen2ForCausalLM" if tp == 2 else "LlamaForCausalLM"
    hf = {}
    for f in engines[arch, "hf"].glob("*.safetensors"):
        hf |= load_file(f)
    ranks = rank_files(engines[arch, tp])
    nq_r, nkv_r = NQ // tp, max(1, NKV // tp)
    for layer in range(LAYERS):
        for suffix in ("weight", "bias") if arch == "Qwen2ForCausalLM" else ("weight",):
            q, k, v = (hf[f"model.layers.{layer}.self_attn.{x}_proj.{suffix}"] for x in "qkv")
            for r, tensors in enumerate(ranks):
                kv_head = r * nkv_r if tp <= NKV else r // (tp // NKV)
                want = torch.cat([q[r * nq_r * D:(r + 1) * nq_r * D], k[kv_head * D:(kv_head + nkv_r) * D],
                                  v[kv_head * D:(kv_head + nkv_r) * D]])
                assert torch.equal(tensors[f"transformer.layers.{layer}.attention.qkv.{suffix}"], want)
        dense = hf[f"model.layers.{layer}.self_attn.o_proj.weight"]
        fc = hf[f"model.layers.{layer}.mlp.gate_proj.weight"]
        proj = hf[f"model.layers.{layer}.mlp.down_proj.weight"]
        for r, tensors in enumerate(ranks):
            p = f"transformer.layers.{layer}."
            assert torch.equal(tensors[p + "attention.dense.weight"], dense.chunk(tp, dim=1)[r])
            assert torch.equal(tensors[p + "mlp.fc.weight"], fc.chunk(tp, dim=0)[r])
            assert torch.equal(tensors[p + "mlp.proj.weight"], proj.chunk(tp, dim=1)[r])


@pytest.mark.parametrize("arch,tp", [("LlamaForCausalLM", 2), ("LlamaForCausalLM", 4), ("Qwen2ForCausalLM", 2)])
def test_recombined_ranks_equal_tp1(engines, arch, tp):
    full = rank_files(engines[arch, 1])[0]
    ranks = rank_files(engines[arch, tp])
    cfg = EngineConfig.load(engines[arch, tp]).model
    shapes = expected_weights(cfg)
    for name, tensor in full.items():
        merged = merge_shards(name, [r[name] for r in ranks], shapes[name], cfg)
        assert torch.equal(merged, tensor), name
    head = [r["lm_head.weight"] for r in ranks]
    padded = torch.cat(head)
    assert padded.shape[0] == padded_vocab(VOCAB, tp)
    assert not padded[VOCAB:].any()  # zero padding rows at the end
    assert torch.equal(padded[:VOCAB], full["lm_head.weight"])


def test_split_rules_for_quantization_tensors():
    """ModelOpt's TP rules: column wsf split dim 0 (qkv-aware), prequant/activation shared; row wsf dim 1,
    prequant dim 0; per-tensor scales and KV-cache scales identical on every rank."""
    cfg = replace(_model_config(), num_attention_heads=4, num_key_value_heads=2, head_size=16)
    tp, groups = 2, 4
    qkv_wsf = torch.arange((4 + 2 * 2) * 16 * groups, dtype=torch.float32).reshape(-1, groups)
    r1 = split_for_rank("transformer.layers.0.attention.qkv.weights_scaling_factor", qkv_wsf, cfg, 1, tp)
    assert torch.equal(r1, torch.cat([qkv_wsf[32:64], qkv_wsf[64 + 16:64 + 32], qkv_wsf[96 + 16:96 + 32]]))
    packed = torch.arange((4 + 2 * 2) * 8 * 3).reshape(-1, 3).to(torch.int8)  # int4 pairs: 8 rows per head
    r0 = split_for_rank("transformer.layers.0.attention.qkv.weight", packed, cfg, 0, tp)
    assert torch.equal(r0, torch.cat([packed[:16], packed[32:40], packed[48:56]]))
    pqs = torch.rand(64)
    for name in ("transformer.layers.0.mlp.fc.prequant_scaling_factor",
                 "transformer.layers.0.mlp.fc.activation_scaling_factor",
                 "transformer.layers.0.attention.kv_cache_scaling_factor",
                 "transformer.layers.0.mlp.proj.weights_scaling_factor"):
        t = pqs if "prequant" in name else torch.tensor([0.5])
        assert split_for_rank(name, t, cfg, 1, tp) is t
    assert torch.equal(split_for_rank("transformer.layers.0.mlp.proj.prequant_scaling_factor", pqs, cfg, 1, tp),
                       pqs[32:])
    row_wsf = torch.rand(64, 8)
    assert torch.equal(split_for_rank("transformer.layers.0.mlp.proj.weights_scaling_factor", row_wsf, cfg, 1, tp),
                       row_wsf[:, 4:])
    fc_wsf = torch.rand(128, 2)
    assert torch.equal(split_for_rank("transformer.layers.0.mlp.fc.weights_scaling_factor", fc_wsf, cfg, 0, tp),
                       fc_wsf[:64])
    per_channel = torch.rand(64)
    assert split_for_rank("transformer.layers.0.attention.dense.per_channel_scale", per_channel, cfg, 1, tp) \
        is per_channel
    assert parallel_style("transformer.layers.3.mlp.gate.weight", cfg) == "column"
    assert parallel_style("transformer.layers.3.attention.dense.weight", cfg) == "row"
    assert parallel_style("transformer.layers.3.attention.qkv.bias", cfg) == "qkv"
    assert parallel_style("lm_head.weight", cfg) == "vocab"
    assert parallel_style("transformer.vocab_embedding.weight", cfg) == "replicated"
    assert parallel_style("transformer.layers.3.attention.kv_cache_scaling_factor", cfg) == "replicated"
    with pytest.raises(ConfigError, match="SPLIT_DIMS"):
        split_for_rank("transformer.layers.0.mlp.fc.mystery_scale", torch.rand(128), cfg, 0, tp)


def _model_config():
    from builder.config import ModelConfig

    return ModelConfig(architecture="LlamaForCausalLM", dtype="float32", vocab_size=VOCAB, hidden_size=H,
                       num_hidden_layers=LAYERS, num_attention_heads=NQ, num_key_value_heads=NKV, head_size=D,
                       intermediate_size=I, max_position_embeddings=256)


@pytest.mark.parametrize("tp,nq,nkv,inter,match", [
    (3, 4, 2, 128, "num_attention_heads"),
    (8, 4, 2, 128, "num_attention_heads"),
    (4, 4, 2, 130, "intermediate_size"),
    (4, 8, 3, 128, "num_key_value_heads"),
    (0, 4, 2, 128, "positive"),
])
def test_validation_errors(tp, nq, nkv, inter, match):
    cfg = replace(_model_config(), num_attention_heads=nq, num_key_value_heads=nkv, intermediate_size=inter)
    with pytest.raises(ConfigError, match=match):
        validate_tp(cfg, tp)


def test_valid_tp_sizes_and_local_heads():
    cfg = replace(_model_config(), num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    for tp in (1, 2, 4, 8, 16, 32):
        validate_tp(cfg, tp)
    assert cfg.local_heads(2) == (16, 4) and cfg.local_heads(16) == (2, 1)


def test_convert_rejects_bad_tp(engines, tmp_path):
    with pytest.raises(ConfigError, match=r"--tp 3 .*use one of 1, 2, 4"):
        convert_checkpoint(engines["LlamaForCausalLM", "hf"], tmp_path / "eng", BuildSettings(**LIMITS), tp_size=3)
    assert not (tmp_path / "eng").exists()


# --- runtime -------------------------------------------------------------------------------------------------------

def prompts(lengths=(1, 5, 17, 40), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def run_interleaved(engine: LLMEngine, schedule: list[tuple[int, list[int], int]]) -> dict[str, list[int]]:
    """Add request i at step schedule[i][0] and drive step() to completion; tokens per request id."""
    out: dict[str, list[int]] = {}
    step = 0
    pending = list(enumerate(schedule))
    while pending or engine.has_unfinished():
        for i, (at, prompt, max_tokens) in list(pending):
            if at <= step:
                engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens))
                out[f"r{i}"] = []
                pending.remove((i, (at, prompt, max_tokens)))
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        step += 1
    return out


@pytest.mark.parametrize("arch,tp", [("LlamaForCausalLM", 2), ("Qwen2ForCausalLM", 2), ("LlamaForCausalLM", 4)])
def test_tp_engine_greedy_matches_tp1(engines, arch, tp):
    ps = prompts() if tp == 2 else prompts((3, 20))
    params = SamplingParams(max_tokens=16 if tp == 2 else 8)
    with LLMEngine(engines[arch, 1]) as single:
        want = single.generate(ps, params)
    with LLMEngine(engines[arch, tp]) as multi:
        assert len(multi.worker_pids) == tp - 1
        got = multi.generate(ps, params)
        assert multi.stats.kv_blocks_total == single.stats.kv_blocks_total * 2  # one local KV head per rank
    assert got == want
    assert all(len(o) > 0 for o in got)


def test_tp_engine_concurrent_requests_and_preemption(engines):
    """Requests arriving mid-flight, chunked prefill and a tight KV pool: TP=2 matches TP=1 step for step."""
    schedule = [(0, p, n) for p, n in zip(prompts((30, 7), seed=3), (24, 30))]
    schedule += [(2, p, n) for p, n in zip(prompts((12, 50), seed=4), (20, 10))]
    schedule += [(5, prompts((3,), seed=5)[0], 25)]
    # same block count on both: the TP=2 ranks hold half the KV heads each
    with LLMEngine(engines["LlamaForCausalLM", 1], kv_cache_memory_mb=0.05, max_num_tokens=24) as single:
        want = run_interleaved(single, schedule)
        want_stats = single.stats
    with LLMEngine(engines["LlamaForCausalLM", 2], kv_cache_memory_mb=0.025, max_num_tokens=24) as multi:
        got = run_interleaved(multi, schedule)
        got_stats = multi.stats
    assert got == want
    assert got_stats.kv_blocks_total == want_stats.kv_blocks_total
    assert got_stats.multi_seq_steps > 0 and got_stats.mixed_steps > 0
    assert got_stats.preemptions == want_stats.preemptions > 0


def _alive(pid: int) -> bool:
    """True while a process with this pid exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_close_stops_workers_and_is_idempotent(engines):
    engine = LLMEngine(engines["LlamaForCausalLM", 4])
    pids = engine.worker_pids
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    engine.close()
    engine.close()
    assert not any(_alive(p) for p in pids)
    assert not [c for c in multiprocessing.active_children() if c.pid in pids]
    with pytest.raises(RequestError, match="closed"):
        engine.add_request("x", [5], SamplingParams(max_tokens=2))
    # a new TP engine can start in the same process afterwards
    with LLMEngine(engines["LlamaForCausalLM", 2]) as again:
        assert again.generate([[5, 6]], SamplingParams(max_tokens=3))[0]
        pids = again.worker_pids
    assert not any(_alive(p) for p in pids)


def test_dead_worker_fails_fast_and_closes(engines):
    engine = LLMEngine(engines["LlamaForCausalLM", 2])
    try:
        pid = engine.worker_pids[0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4))
        start = time.monotonic()
        with pytest.raises(BuilderError, match="rank 1"):
            engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(RequestError, match="closed"):
            engine.step()
    finally:
        engine.close()


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_cli_tp_plumbs_to_converter(monkeypatch, tmp_path):
    import builder.build
    from builder.cli import main

    seen = {}

    def fake_build(options):
        seen["tp"] = options.tp_size
        return EngineConfig(_model_config(), BuildSettings())

    monkeypatch.setattr(builder.build, "build", fake_build)
    assert main(["build", "--output", str(tmp_path / "repo"), "--tp", "2"]) == 0
    assert seen["tp"] == 2
    assert main(["build", "--output", str(tmp_path / "repo")]) == 0
    assert seen["tp"] == 1
