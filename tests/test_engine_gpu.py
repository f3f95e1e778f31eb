"""The engine on a CUDA GPU against the CPU reference path (skipped without CUDA).

- fp32: greedy tokens on the GPU equal the CPU engine's token for token (float32 engines run the torch reference
  ops on the GPU, cuBLAS with TF32 off);
- bf16 (Triton kernels + CUDA graphs): teacher-forced logits within the stated tolerance of the CPU fp32 engine
  (BF16_* below), graphs vs eager decode, in-flight batching;
- int8_wo / int4_wo / int4_awq / fp8 and INT8 / FP8 KV cache (GPU kernels) close to the same engine run by the CPU
  reference ops; the GPU quantized-linear ops against the reference at M = 1 (tinygemm), 3 and 64;
- TP=2 (two GPUs) equal to TP=1;
- the KV pool sized from free GPU memory (kv_cache_free_gpu_mem_fraction) when no size is given.

The model is the committed trained reference model (builder/checkpoint/data/reference: hidden 256, 3 layers, 4/2
heads of 64): its linears have the K multiples the INT4 kernel needs. With BUILDER_GPU_REPORT=FILE each comparison
appends one JSON line of its figures to FILE (docs/performance.md quotes them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from builder.checkpoint.convert import convert_checkpoint
from builder.checkpoint.reference import heldout_documents, reference_model_dir
from builder.config import BuildSettings, QuantOptions
from builder.runtime import LLMEngine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LIMITS = dict(max_batch_size=16, max_input_len=256, max_seq_len=384, max_num_tokens=512, tokens_per_block=16,
              kv_cache_memory_mb=64)
CALIB = dict(calib_size=4, calib_seq_len=64)
PROMPT_LENGTHS = (3, 17, 64, 150, 201, 9)
NEW_TOKENS = 48
# bf16 GPU vs fp32 CPU, teacher-forced logits over the prompts: stated tolerance
BF16_MAX_ABS_OVER_STD = 0.25   # max |logit difference| / std of the reference logits
BF16_MEAN_ABS_OVER_STD = 0.03  # mean |logit difference| / std
BF16_TOP1_AGREEMENT = 0.97     # positions whose argmax agrees
QUANT_TOP1_AGREEMENT = 0.95    # quantized engine on GPU vs the same engine on the CPU reference ops


def report(**figures) -> None:
    """Append one JSON line of figures to $BUILDER_GPU_REPORT (when set) and print it."""
    line = json.dumps(figures, default=float)
    print(line)
    path = os.environ.get("BUILDER_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """get(dtype, quant="none", kv="auto", tp=1) -> engine folder built from the reference model (cached)."""
    root, cache = tmp_path_factory.mktemp("gpu-engines"), {}

    def get(dtype: str, quant: str = "none", kv: str = "auto", tp: int = 1) -> Path:
        key = (dtype, quant, kv, tp)
        if key not in cache:
            out = root / "-".join(map(str, key))
            group = 64 if quant == "int4_awq" else None
            convert_checkpoint(reference_model_dir(), out, BuildSettings(dtype=dtype, **LIMITS), tp_size=tp,
                               quant=QuantOptions(quant=quant, kv_cache_dtype=kv, group_size=group, **CALIB))
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Held-out text, tokenized, cut to PROMPT_LENGTHS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    ids = tok("\n".join(heldout_documents()))["input_ids"]
    out, start = [], 0
    for n in PROMPT_LENGTHS:
        out.append(ids[start:start + n])
        start += n
    return out


def greedy(engine: LLMEngine, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations of exactly n tokens."""
    return engine.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0))


def scores(engine_dir: Path, device: str, prompts: list[list[int]], **kw) -> torch.Tensor:
    """Teacher-forced float32 logits of every prompt position, concatenated, on the CPU."""
    with LLMEngine(engine_dir, device=device, **kw) as engine:
        return torch.cat([s.float().cpu() for s in engine.score(prompts)])


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Logit difference figures of got against ref."""
    diff = (got - ref).abs()
    std = ref.std().item()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "ref_std": std,
            "max_abs_over_std": diff.max().item() / std, "mean_abs_over_std": diff.mean().item() / std,
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of equal tokens at equal positions."""
    pairs = [(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_fp32_greedy_equals_cpu(engines, prompts):
    engine_dir = engines("float32")
    with LLMEngine(engine_dir, device="cpu") as cpu:
        want = greedy(cpu, prompts)
    with LLMEngine(engine_dir, device="cuda") as gpu:
        got = greedy(gpu, prompts)
        assert gpu.runner.graphs is None  # float32: reference ops, eager
    report(test="fp32_greedy", sequences=len(prompts), tokens=sum(map(len, got)),
           identical=sum(a == b for a, b in zip(got, want)))
    assert got == want


def test_bf16_logits_within_tolerance(engines, prompts):
    ref = scores(engines("float32"), "cpu", prompts)
    got = scores(engines("bfloat16"), "cuda", prompts)
    figures = compare(ref, got)
    report(test="bf16_vs_fp32_cpu_logits", positions=ref.shape[0], **figures)
    assert figures["max_abs_over_std"] < BF16_MAX_ABS_OVER_STD
    assert figures["mean_abs_over_std"] < BF16_MEAN_ABS_OVER_STD
    assert figures["top1_agreement"] >= BF16_TOP1_AGREEMENT


def test_bf16_greedy_graphs_vs_eager_vs_cpu(engines, prompts):
    engine_dir = engines("bfloat16")
    with LLMEngine(engine_dir, device="cuda") as engine:
        graphs = greedy(engine, prompts)
        assert engine.runner.graphs is not None and engine.runner.graphs.replays >= NEW_TOKENS - 1
        alone = [greedy(engine, [p])[0] for p in prompts[:2]]  # batch 1: the M = 1 paths
    with LLMEngine(engine_dir, device="cuda", cuda_graphs=False) as engine:
        eager = greedy(engine, prompts)
        assert engine.runner.graphs is None
    with LLMEngine(engines("float32"), device="cpu") as cpu:
        want = greedy(cpu, prompts)
    figures = {"graphs_vs_eager": token_agreement(graphs, eager), "graphs_vs_cpu_fp32": token_agreement(graphs, want),
               "batch1_vs_batched": token_agreement(alone, graphs[:2])}
    report(test="bf16_greedy_agreement", **figures)
    assert figures["graphs_vs_eager"] >= 0.9
    assert figures["graphs_vs_cpu_fp32"] >= 0.8
    assert figures["batch1_vs_batched"] >= 0.8


def test_in_flight_batching_on_gpu(engines, prompts):
    """Requests joining while others decode (mixed prefill + decode steps, then graph replays) finish correctly."""
    with LLMEngine(engines("bfloat16"), device="cuda") as engine:
        params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0.0)
        outputs: dict[str, list[int]] = {}
        pending = [(f"r{i}", p) for i, p in enumerate(prompts)]
        steps = 0
        while pending or engine.has_unfinished():
            if pending and steps % 3 == 0:
                rid, prompt = pending.pop(0)
                engine.add_request(rid, prompt, params)
                outputs[rid] = []
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
            steps += 1
        stats = engine.stats
        assert all(len(v) == 24 for v in outputs.values())
        assert stats.mixed_steps > 0 and engine.runner.graphs.replays > 0
        assert stats.kv_blocks_free == stats.kv_blocks_total
        together = greedy(engine, prompts, 24)
    agreement = token_agreement([outputs[f"r{i}"] for i in range(len(prompts))], together)
    report(test="in_flight_vs_generate", agreement=agreement, mixed_steps=stats.mixed_steps)
    assert agreement >= 0.8


@pytest.mark.parametrize("quant,kv", [("int8_wo", "auto"), ("int4_wo", "auto"), ("int4_awq", "auto"),
                                      ("fp8", "auto"), ("none", "int8"), ("none", "fp8")])
def test_quantized_gpu_matches_reference_ops(engines, prompts, quant, kv):
    engine_dir = engines("bfloat16", quant, kv)
    ref = scores(engine_dir, "cpu", prompts)
    got = scores(engine_dir, "cuda", prompts)
    figures = compare(ref, got)
    with LLMEngine(engine_dir, device="cuda") as engine:
        out = greedy(engine, prompts[:3], 16)
    report(test="quant_gpu_vs_cpu_ops", quant=quant, kv=kv, positions=ref.shape[0], **figures)
    assert all(len(o) == 16 for o in out)
    assert figures["top1_agreement"] >= QUANT_TOP1_AGREEMENT
    assert figures["max_abs_over_std"] < 0.5


@pytest.mark.parametrize("m", [1, 3, 64])
def test_gpu_linear_ops_match_reference(m):
    from plugins.gpu.linear import Fp8Linear, Int4Linear, Int8Linear
    from plugins.linear import ReferenceLinear, dequantize_weight_only

    g = torch.Generator().manual_seed(m)
    dt, n, k = torch.bfloat16, 768, 1024
    x = torch.randn(m, k, generator=g).to(dt).cuda()
    bias = (torch.randn(n, generator=g) * 0.1).to(dt).cuda()
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8).cuda()
    s4 = (torch.rand(n, k // 128, generator=g) * 0.01 + 1e-3).to(dt).cuda()
    pre = (torch.rand(k, generator=g) + 0.5).to(dt).cuda()
    q8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).cuda()
    s8 = (torch.rand(n, 1, generator=g) * 1e-3).to(dt).cuda()
    w8 = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).cuda()
    in_s, w_s = torch.tensor([0.02]).cuda(), torch.tensor([1e-4]).cuda()
    cases = {
        "int4_awq": (Int4Linear.prepare(q4, s4, 128, dt, pre),
                     ReferenceLinear(dequantize_weight_only(q4, s4, dt), pre_quant_scale=pre)),
        "int4_per_channel": (Int4Linear.prepare(q4, s8, k, dt, None),
                             ReferenceLinear(dequantize_weight_only(q4, s8, dt))),
        "int8": (Int8Linear.prepare(q8, s8, dt), ReferenceLinear(dequantize_weight_only(q8, s8, dt))),
        "fp8": (Fp8Linear(w8, in_s, w_s), ReferenceLinear(w8.to(dt), input_scale=in_s, weight_scale=w_s)),
    }
    if m == 1:
        assert cases["int4_awq"][0].tinygemm is not None  # M = 1 runs torch's tinygemm on bf16
    for name, (op, ref) in cases.items():
        want = F.linear(x.float(), ref.weight.float(), bias.float()) if ref.input_scale is None else ref(x, bias)
        if ref.pre_quant_scale is not None:  # the reference multiplies in the dtype first
            want = F.linear((x * ref.pre_quant_scale).float(), ref.weight.float(), bias.float())
        want = want.float()
        got = op(x, bias).float()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 2e-2, (name, m, rel)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@TWO_GPUS
def test_tp2_fp32_equals_tp1(engines, prompts):
    """fp32 (torch reference ops, NCCL all-reduce and gather, eager): TP=2 greedy tokens equal TP=1's."""
    with LLMEngine(engines("float32", tp=1), device="cuda") as one:
        want = greedy(one, prompts)
    with LLMEngine(engines("float32", tp=2), device="cuda") as two:
        got = greedy(two, prompts)
    report(test="tp2_vs_tp1_fp32", identical=got == want)
    assert got == want


@TWO_GPUS
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_tp2_bf16_close_to_tp1(engines, prompts, graphs):
    """bf16 (Triton kernels; decode graphs holding the NCCL collectives, or eager): TP=2 logits within the bf16
    tolerance of TP=1's, greedy tokens mostly equal."""
    ref = scores(engines("bfloat16", tp=1), "cuda", prompts)
    with LLMEngine(engines("bfloat16", tp=2), device="cuda", cuda_graphs=graphs) as two:
        tp2 = torch.cat([s.float().cpu() for s in two.score(prompts)])
        tokens = greedy(two, prompts)
        assert (two.runner.graphs is not None and two.runner.graphs.replays > 0) == graphs
    with LLMEngine(engines("bfloat16", tp=1), device="cuda") as one:
        tp1_tokens = greedy(one, prompts)
    figures = compare(ref, tp2)
    agreement = token_agreement(tokens, tp1_tokens)
    report(test=f"tp2_vs_tp1_bf16_{'graphs' if graphs else 'eager'}", bf16_token_agreement=agreement, **figures)
    assert figures["top1_agreement"] >= BF16_TOP1_AGREEMENT
    assert agreement >= 0.8


def test_kv_pool_from_free_gpu_memory(engines):
    """On CUDA without kv_cache_memory_mb the pool follows kv_cache_free_gpu_mem_fraction (TensorRT-LLM's
    meaning): capped at what max_batch_size sequences of max_seq_len use, else that share of free memory."""
    from builder.runtime.model_runner import kv_block_bytes, kv_blocks_for

    engine_dir = engines("bfloat16")
    with LLMEngine(engine_dir, device="cuda") as engine:
        config = engine.config
        assert engine.stats.kv_blocks_total == kv_blocks_for(config, LIMITS["max_batch_size"],
                                                             LIMITS["max_seq_len"])
    free = torch.cuda.mem_get_info()[0]
    fraction = 2**20 / free  # leaves about 1 MiB, far below the cap
    with LLMEngine(engine_dir, device="cuda", kv_cache_free_gpu_mem_fraction=fraction) as engine:
        assert 0 < engine.stats.kv_blocks_total * kv_block_bytes(engine.config) <= 2**20
    with LLMEngine(engine_dir, device="cuda", kv_cache_memory_mb=1) as engine:  # an explicit size wins
        assert engine.stats.kv_blocks_total == 2**20 // kv_block_bytes(engine.config)
