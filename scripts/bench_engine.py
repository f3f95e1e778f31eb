#!/usr/bin/env python3
"""Benchmark the engine alone (no Triton), and HF transformers `generate` with static batches on the same workload.

Engine (builder.runtime.LLMEngine, in this process): a closed loop of C requests in the engine at once
(`--concurrency 1,16,64,all`: a request is added as soon as one finishes; `all` adds every request at t=0, i.e.
offline throughput), greedy, min_tokens = max_tokens = the request's output length so every request produces
exactly its output length (checked: `exact_output_lengths`). Timestamps are taken after each engine step (the
sampled ids are on the host by then): TTFT = first token step - add_request, ITL = (last token - first token) /
(tokens - 1), chunk gaps = every gap between a request's token steps, output tok/s = tokens / (last finish -
first add). Batch 1 decode speed is 1000 / itl_ms at concurrency 1 (reported as decode_tok_s_per_request).
Before each point (engine and HF), `--warmup` passes (default 1) run its first C requests (HF: one batch of B) with
outputs capped at 8 tokens, unmeasured, so first-use costs of that batch shape stay out of the numbers.

HF (`--hf`, `--hf-batch-size 1,64`): `model.generate` on static left-padded batches of B consecutive requests
(greedy, min_new_tokens = max_new_tokens = the longest output in the batch, SDPA attention, KV cache), one batch
after the other. A request "arrives" when its batch starts (a closed loop of B, batch-synchronous); its token
times come from a streamer called after every decoding step; it completes when its batch returns. Output tok/s
counts each request's own output length (tokens generated past it, the static-batching waste, are reported as
hf_generated_tokens). `ratios` compares engine concurrency C with HF batch B = C, and the best of each.

Both use the same requests (builder.workload: lengths from random.Random(seed), random prompt ids) and the same
model: `--model HF_DIR` (converted to an engine in a temp dir with convert_checkpoint; HF loads the same folder),
`--engine ENGINE_DIR` (+ `--model` for --hf), or `--random-llama3-8b` (alias of `--random llama3-8b`): a
random-weight Llama-3-8B-shaped model (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256)
created in memory on the device (bfloat16 by default on cuda) for the engine and, separately, for HF (the weights
differ, the work does not: lengths are forced). `--random tiny` does the same with the tiny test shapes. On GPU,
`--kv-cache-memory-mb` defaults to what the run needs at most (peak concurrent sequences x (blocks of the longest
sequence + the one block per sequence the scheduler holds back), +5%), on GPU capped by --gpu-memory-fraction of
the free memory after the weights and 3 GiB.

Random models can be quantized as `builder build` would (`--quant int8_wo|int4_wo|int4_awq|fp8`, `--kv-cache-dtype
int8|fp8`, `--group-size` for int4_awq, default 128 or 64 when 128 does not divide the widths; lm_head excluded):
the ModelConfig gets resolve_quant_config's `quantization` and the random tensors follow the checkpoint layout
(expected_layout): float weights for W8A16/W4A16 (the runtime quantizes them at load), packed int4 bytes + fp32 group
scales + prequant scales for W4A16_AWQ, e4m3 weights + fp32 weight/activation scales for FP8, fp32 KV-cache scales.
With --model/--engine the engine's own config decides, so --quant/--kv-cache-dtype are refused there. HF (--hf) always
runs the unquantized model.

`--roofline` (cuda) measures in the same run: HBM bandwidth (device-to-device copy of a 2 GiB buffer, best of reps,
GB/s = 2 * bytes / time: read + write), bf16 GEMM TFLOP/s (8192^3 and 256 tokens x hidden -> intermediate), and
per engine point: the batch-1 decode roofline (bandwidth / bytes one decode step reads per token: every weight
in its stored format, one embedding row, KV cache at the mean decode context; decode_bytes_per_token) with
roofline_pct at concurrency 1, and tensor_core_pct = output tok/s * FLOPs per token / GEMM FLOP/s (output tokens
only) and total_tensor_core_pct (input + output tokens).

  python scripts/bench_engine.py --random-llama3-8b --device cuda --input-len 128 --output-len 128 \\
      --concurrency 1,16,64,256 --num-requests 512 --out engine-128-128.json
  python scripts/bench_engine.py --random-llama3-8b --device cuda --workload mixed --num-requests 256 \\
      --concurrency 64,all --hf --hf-batch-size 64 --out mixed-vs-hf.json
  python scripts/bench_engine.py --model HF_DIR --device cuda --dtype bfloat16 --input-len 128 --output-len 128 \\
      --concurrency 1 --hf --hf-batch-size 1 --num-requests 8 --out batch1.json
  python scripts/bench_engine.py --random-llama3-8b --device cuda --quant int4_awq --kv-cache-dtype int8 \\
      --input-len 128 --output-len 128 --concurrency 1,64 --num-requests 128 --roofline --out awq-roofline.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import platform
import shlex
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from builder.bench import (RequestRecord, add_workload_arguments, markdown_table, parse_list,  # noqa: E402
                           summarize, workload_spec)
from builder.config import BuildSettings, DTYPES, EngineConfig, ModelConfig, QuantConfig  # noqa: E402
from builder.errors import BuilderError, ConfigError  # noqa: E402
from builder.models import arch_spec  # noqa: E402
from builder.quantize.modes import (KV_CACHE_MODES, QUANT_MODES, SUPPORTED_GROUP_SIZES, linear_quant_algo,  # noqa: E402
                                    resolve_quant_config)
from builder.workload import BenchRequest, token_prompts  # noqa: E402

RANDOM_SHAPES = {
    "llama3-8b": dict(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_size=128, intermediate_size=14336, max_position_embeddings=8192,
                      rotary_base=500000.0),
    # Qwen3-8B: head_dim 128 with 32 query heads on hidden 4096, q/k norms, untied embeddings
    "qwen3-8b": dict(architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_size=128, intermediate_size=12288,
                     max_position_embeddings=40960, rotary_base=1000000.0, qwen_type="qwen3"),
    "tiny": dict(architecture="LlamaForCausalLM", vocab_size=768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_size=16, intermediate_size=128, max_position_embeddings=512, rotary_base=10000.0),
}
RANDOM_STD = 0.02
MiB = 2**20
WARMUP_OUTPUT_TOKENS = 8


# ---- model sources -------------------------------------------------------------------------------------------

def random_model_config(shape: str, dtype: str, quant: str = "none", kv_cache_dtype: str = "auto",
                        group_size: int | None = None) -> ModelConfig:
    """The ModelConfig of a named random shape, quantized as `builder build --quant ... --kv-cache-dtype ...`
    would set it (resolve_quant_config, exclude ["lm_head"]); int4_awq without group_size takes the largest
    supported group size the widths allow."""
    cfg = ModelConfig(dtype=dtype, norm_epsilon=1e-5, **RANDOM_SHAPES[shape])
    if quant == "none" and kv_cache_dtype == "auto":
        return cfg
    sizes = [group_size] if group_size is not None or quant != "int4_awq" else \
        sorted(SUPPORTED_GROUP_SIZES, reverse=True)
    for i, size in enumerate(sizes):
        cfg.quantization = resolve_quant_config(quant, kv_cache_dtype, size)
        try:
            arch_spec(cfg.architecture).check_quantization(cfg)
            break
        except ConfigError:
            if i == len(sizes) - 1:
                raise
    return cfg


# random quantization tensors: AWQ group scales ~ RANDOM_STD / 4 (int4 values up to 8 -> weights ~ N(0, 0.02)-sized),
# FP8 weight scale: 4 sigma maps to e4m3's max 448; activations up to ~6; KV cache values up to ~127 * 0.05
E4M3_MAX = 448.0
AWQ_SCALE = RANDOM_STD / 4
FP8_WEIGHT_SCALE = RANDOM_STD * 4 / E4M3_MAX
FP8_ACTIVATION_SCALE = 6.0 / E4M3_MAX
KV_CACHE_SCALE = 0.05


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator) -> torch.Tensor:
    """One random checkpoint tensor of the stored layout (see the module docstring), made on the device."""
    def uniform(low: float, high: float, dt: torch.dtype) -> torch.Tensor:
        return (torch.rand(shape, dtype=torch.float32, device=device, generator=generator) * (high - low) + low).to(dt)

    if name.endswith(("layernorm.weight", "ln_f.weight")):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".kv_cache_scaling_factor"):
        return torch.full(shape, KV_CACHE_SCALE, dtype=dtype, device=device)
    if name.endswith(".activation_scaling_factor"):
        return torch.full(shape, FP8_ACTIVATION_SCALE, dtype=dtype, device=device)
    if name.endswith(".weights_scaling_factor"):
        if tuple(shape) == (1,):  # FP8 per-tensor
            return torch.full(shape, FP8_WEIGHT_SCALE, dtype=dtype, device=device)
        return uniform(0.5 * AWQ_SCALE, 1.5 * AWQ_SCALE, dtype)  # AWQ per group, positive
    if name.endswith(".prequant_scaling_factor"):
        return uniform(0.5, 1.5, dtype)
    if dtype == torch.int8:  # AWQ: two int4 values per byte, any byte is valid
        return torch.randint(-128, 128, shape, dtype=torch.int8, device=device, generator=generator)
    if dtype == torch.float8_e4m3fn:
        w = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
        w *= RANDOM_STD / FP8_WEIGHT_SCALE
        return w.clamp_(-E4M3_MAX, E4M3_MAX).to(dtype)
    if not dtype.is_floating_point:
        raise ConfigError(f"no random stand-in for {name} ({dtype})")
    return torch.randn(shape, dtype=dtype, device=device, generator=generator) * RANDOM_STD


def random_weights(engine_dir: Path, cfg: ModelConfig, device: torch.device, rank: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in for builder.runtime.weights.load_weights: a random tensor for every name/dtype/shape of the rank's
    checkpoint layout (float weights N(0, 0.02), norms 1, quantized tensors per random_tensor), made on the device
    from a generator seeded with the rank."""
    from builder.runtime.weights import expected_layout

    arch_spec(cfg.architecture).check_quantization(cfg, cfg.mapping.tp_size)
    generator = torch.Generator(device=device).manual_seed(rank)
    return {name: random_tensor(name, tuple(spec.shape), spec.dtype, device, generator)
            for name, spec in expected_layout(cfg).items()}


@contextlib.contextmanager
def in_memory_random_weights():
    """Make LLMEngine create random weights on its device instead of reading rank0.safetensors (tp 1)."""
    import builder.runtime.model_runner as model_runner

    original = model_runner.load_weights
    model_runner.load_weights = random_weights
    try:
        yield
    finally:
        model_runner.load_weights = original


def resolve_dtype(args: argparse.Namespace) -> str:
    """The dtype name for random models (auto: bfloat16 on cuda, float32 on cpu)."""
    if args.dtype != "auto":
        return args.dtype
    return "bfloat16" if args.device.startswith("cuda") else "float32"


def build_settings(args: argparse.Namespace, dtype: str, max_input: int, max_seq: int, peak: int) -> BuildSettings:
    """Engine limits for this run's workload."""
    return BuildSettings(dtype=dtype, max_batch_size=args.max_batch_size or peak, max_input_len=max_input,
                         max_seq_len=max_seq, max_num_tokens=args.max_num_tokens,
                         tokens_per_block=args.tokens_per_block, kv_cache_memory_mb=args.kv_cache_memory_mb or 256,
                         device=args.device)


def kv_cache_mb(args: argparse.Namespace, config: EngineConfig, peak: int, max_seq: int) -> float:
    """KV pool size: --kv-cache-memory-mb, else what peak sequences at the longest length use (on GPU capped at
    --gpu-memory-fraction of the free memory, as the served engine sizes it)."""
    from builder.runtime.model_runner import gpu_kv_cache_mb, kv_block_bytes, kv_blocks_for

    if args.kv_cache_memory_mb:
        return float(args.kv_cache_memory_mb)
    if args.device.startswith("cuda") and torch.cuda.is_available():
        return gpu_kv_cache_mb(config, [torch.device(args.device)], args.gpu_memory_fraction, peak, max_seq)
    return kv_blocks_for(config, peak, max_seq) * kv_block_bytes(config) / MiB


def load_engine(args: argparse.Namespace, work: Path, max_input: int, max_seq: int, peak: int):
    """(LLMEngine, EngineConfig, description) from --engine, --model or --random."""
    from builder.runtime.engine import LLMEngine

    overrides = dict(max_num_tokens=args.max_num_tokens, max_batch_size=args.max_batch_size or peak,
                     cuda_graphs=not args.eager)
    if args.engine is not None:
        engine_dir, source = args.engine, f"engine {args.engine}"
    elif args.model is not None:
        from builder.checkpoint.convert import convert_checkpoint

        engine_dir = work / "engine"
        t = time.perf_counter()
        convert_checkpoint(args.model, engine_dir, build_settings(args, args.dtype, max_input, max_seq, peak))
        source = f"HF {args.model} (converted in {time.perf_counter() - t:.1f}s)"
    else:
        engine_dir = work / "engine"
        config = EngineConfig(random_model_config(args.random, resolve_dtype(args), args.quant or "none",
                                                  args.kv_cache_dtype or "auto", args.group_size),
                              build_settings(args, resolve_dtype(args), max_input, max_seq, peak))
        config.save(engine_dir)
        source = f"random {args.random} ({config.model.dtype}, {describe_quant(config.model.quantization)}, in memory)"
    config = EngineConfig.load(engine_dir)
    kv_mb = kv_cache_mb(args, config, peak, max_seq)
    context = in_memory_random_weights() if args.random and args.engine is None and args.model is None \
        else contextlib.nullcontext()
    t = time.perf_counter()
    with context:
        engine = LLMEngine(engine_dir, device=args.device, kv_cache_memory_mb=kv_mb, **overrides)
    sync(args.device)
    info = {"source": source, "engine_dir": str(engine_dir), "load_s": time.perf_counter() - t,
            "quantization": quant_metadata(config.model.quantization),
            "kv_cache_memory_mb": kv_mb, "kv_blocks": engine.stats.kv_blocks_total,
            "cuda_graphs": engine.runner.graphs is not None,
            "max_batch_size": engine.max_batch_size, "max_num_tokens": engine.max_num_tokens,
            "model": config.model.to_dict(), "build": vars(config.build)}
    return engine, config, info


def quant_names(quant: QuantConfig) -> tuple[str, str]:
    """(--quant name, --kv-cache-dtype name) of a model's quantization."""
    mode = next((k for k, v in QUANT_MODES.items() if v == quant.quant_algo), str(quant.quant_algo))
    kv = next((k for k, v in KV_CACHE_MODES.items() if v == quant.kv_cache_quant_algo), str(quant.kv_cache_quant_algo))
    return mode, kv


def quant_metadata(quant: QuantConfig) -> dict[str, Any]:
    """The JSON record of a model's quantization: CLI names and the checkpoint's quantization dict."""
    mode, kv = quant_names(quant)
    return {"quant": mode, "kv_cache_dtype": kv, **dataclasses.asdict(quant)}


def describe_quant(quant: QuantConfig) -> str:
    """'quant int4_awq (W4A16_AWQ, group 128), kv int8' style summary."""
    mode, kv = quant_names(quant)
    detail = ""
    if quant.quant_algo is not None:
        group = f", group {quant.group_size}" if quant.quant_algo == "W4A16_AWQ" else ""
        detail = f" ({quant.quant_algo}{group})"
    return f"quant {mode}{detail}, kv {kv}"


def special_ids(args: argparse.Namespace) -> tuple[list[int], Any]:
    """(special token ids to keep out of prompts, tokenizer or None) from --model's tokenizer when it has one."""
    if args.model is None:
        return [], None
    try:
        from builder.triton.detokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    except BuilderError:
        return [], None
    return list(tokenizer.all_special_ids), tokenizer


# ---- engine runs ---------------------------------------------------------------------------------------------

def warmup_requests(requests: list[BenchRequest], count: int) -> list[BenchRequest]:
    """The first `count` requests with outputs capped at WARMUP_OUTPUT_TOKENS (the point's batch shape, short)."""
    return [dataclasses.replace(r, output_len=min(r.output_len, WARMUP_OUTPUT_TOKENS)) for r in requests[:count]]


def run_engine_point(engine: Any, requests: list[BenchRequest], concurrency: int) -> tuple[list[RequestRecord], dict]:
    """Closed loop of `concurrency` requests through engine.step(); (records, engine counter deltas)."""
    from builder.runtime.sampling_params import SamplingParams

    records = [RequestRecord(r.index, r.input_len, r.output_len, tokens=0) for r in requests]
    pending = deque(zip(requests, records))
    active: dict[str, RequestRecord] = {}
    before = engine.stats
    while pending or active:
        while pending and len(active) < concurrency:
            request, record = pending.popleft()
            rid = f"bench-{record.index}-{uuid.uuid4().hex[:8]}"
            record.send = time.perf_counter()
            try:
                engine.add_request(rid, request.prompt_ids, SamplingParams(
                    max_tokens=request.output_len, min_tokens=request.output_len, temperature=0.0))
            except BuilderError as exc:
                record.error, record.end = str(exc), time.perf_counter()
                continue
            active[rid] = record
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            record = active[out.request_id]
            if out.new_token_ids:
                record.token_times.append(now)
                record.tokens += len(out.new_token_ids)
            if out.finished:
                record.end = now
                del active[out.request_id]
        if not outputs and active and not engine.has_unfinished():
            raise BuilderError(f"the engine dropped {len(active)} requests without finishing them")
    after = engine.stats
    counters = {k: getattr(after, k) - getattr(before, k)
                for k in ("steps", "prefill_tokens", "decode_tokens", "multi_seq_steps", "mixed_steps", "preemptions")}
    counters["max_seqs_in_step"] = after.max_seqs_in_step
    return records, counters


def bench_engine(args: argparse.Namespace, requests: list[BenchRequest], concurrencies: list[int | None],
                 work: Path, max_input: int, max_seq: int) -> tuple[list[dict], dict]:
    """Every engine sweep point; (points, engine info)."""
    n = len(requests)
    levels = [c or n for c in concurrencies]
    engine, _, info = load_engine(args, work, max_input, max_seq, min(n, max(levels)))
    try:
        points = []
        for c, level in zip(concurrencies, levels):
            for _ in range(args.warmup):
                run_engine_point(engine, warmup_requests(requests, level), level)
            log(f"engine: concurrency {c or 'all'} ({level}), {n} requests ...")
            records, counters = run_engine_point(engine, requests, level)
            point = summarize(records, concurrency=level, all_at_once=c is None)
            point["decode_tok_s_per_request"] = 1e3 / point["itl_ms"]["mean"] if point["itl_ms"]["mean"] else None
            point["engine"] = counters
            points.append(point)
    finally:
        engine.close()
        del engine
        release_memory(args.device)
    return points, info


# ---- roofline -----------------------------------------------------------------------------------------------

GiB = 2**30
COPY_BUFFER_BYTES = 2 * GiB
GEMM_SIZE = 8192
MODEL_GEMM_TOKENS = 256
MIN_TIMED_S = 1e-3  # each timed block runs the op enough times to last about this long
COPY_WARMUP_S = 0.3  # the copy reads below peak until it has run a while; a GEMM warmed that long runs power-capped
INT4_NOTE = ("int4 engines may hold their weights twice on GPU (the packed checkpoint layout and torch's tinygemm "
             "pack for M=1); one decode step reads one copy, so bytes per token count it once")


def model_dtype_bytes(cfg: ModelConfig) -> int:
    """Bytes of one element in the model dtype."""
    return torch.empty((), dtype=torch_dtype(cfg.dtype)).element_size()


def kv_elem_bytes(cfg: ModelConfig) -> int:
    """Bytes of one KV-cache element: 1 for an INT8/FP8 KV cache, else the model dtype's."""
    return 1 if cfg.quantization.kv_cache_quant_algo is not None else model_dtype_bytes(cfg)


def linear_bytes(algo: str | None, out: int, in_features: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes one forward reads of a linear [out, in] as the runtime holds it (weights + scales).

    None: model dtype; W8A16 / W4A16: int8 / packed int4 + per-channel scale (model dtype); W4A16_AWQ: packed int4 +
    fp32 group scales + prequant scale (model dtype); FP8: e4m3 + two fp32 scalars."""
    n = out * in_features
    if algo is None:
        return n * dtype_bytes
    if algo == "W8A16":
        return n + out * dtype_bytes
    if algo == "W4A16":
        return n // 2 + out * dtype_bytes
    if algo == "W4A16_AWQ":
        return n // 2 + out * (in_features // group_size) * 4 + in_features * dtype_bytes
    if algo == "FP8":
        return n + 2 * 4
    raise ConfigError(f"quant_algo {algo!r} has no byte count")


def decode_bytes_breakdown(cfg: ModelConfig, kv_dtype_bytes: int, mean_context: float) -> dict[str, float]:
    """Bytes one decode step reads per sequence at batch 1, by part (full model, all tensor-parallel ranks)."""
    quant, db = cfg.quantization, model_dtype_bytes(cfg)
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    linears = norms = 0
    for row in arch_spec(cfg.architecture).weights(cfg):  # the family's weight table
        if row.is_linear_weight:
            algo = linear_quant_algo(quant, row.module)
            linears += linear_bytes(algo, row.shape[0], row.shape[1], quant.group_size, db)
        elif row.engine.endswith(".bias"):
            linears += row.numel * db
        elif len(row.shape) == 1:  # RMSNorm weights (q/k norms included)
            norms += row.numel * db
    kv_scales = layers * 4 if quant.kv_cache_quant_algo is not None else 0
    return {
        "decoder_linears": float(linears),
        "norms": float(norms),
        "lm_head": float(linear_bytes(linear_quant_algo(quant, "lm_head"), cfg.vocab_size, h, quant.group_size, db)),
        "embedding_row": float(h * db),
        "kv_cache": float(layers * 2 * cfg.num_key_value_heads * cfg.head_size * kv_dtype_bytes * mean_context
                          + kv_scales),
    }


def decode_bytes_per_token(cfg: ModelConfig, kv_dtype_bytes: int, mean_context: float) -> float:
    """Bytes read per decode token at batch 1: every decoder linear in its stored format (scales included), the
    norms, lm_head, one embedding row, and the KV cache at mean_context tokens
    (layers * 2 * kv_heads * head_size * kv_dtype_bytes * mean_context)."""
    return sum(decode_bytes_breakdown(cfg, kv_dtype_bytes, mean_context).values())


def matmul_params(cfg: ModelConfig) -> int:
    """Weights of every matmul one token goes through: the decoder linears and lm_head."""
    decoder = sum(row.numel for row in arch_spec(cfg.architecture).weights(cfg) if row.is_linear_weight)
    return decoder + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, context: float) -> float:
    """2 * matmul weights + attention (QK^T and PV: 4 * layers * heads * head_size * context)."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_size * context


def mean_decode_context(requests: list[BenchRequest]) -> float:
    """Mean attended length over every decode step: the step feeding output token j (1..out-1) attends to
    prompt + j positions."""
    steps = sum(r.output_len - 1 for r in requests)
    total = sum(len(r.prompt_ids) * (r.output_len - 1) + (r.output_len - 1) * r.output_len / 2 for r in requests)
    return total / steps if steps else float(max((len(r.prompt_ids) for r in requests), default=0))


def best_time(fn: Any, reps: int, warmup_s: float = 0.0) -> tuple[float, int]:
    """(best seconds per call, calls per timed block) over reps blocks timed with CUDA events, after two untimed
    calls, or warmup_s seconds of them."""
    t = time.perf_counter()
    for i in range(1 << 30):
        fn()
        torch.cuda.synchronize()
        if i >= 1 and time.perf_counter() - t >= warmup_s:
            break
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(MIN_TIMED_S / max(start.elapsed_time(end) / 1e3, 1e-7)))
    best = math.inf
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / inner)
    return best, inner


def measure_copy_bandwidth(device: str, nbytes: int = COPY_BUFFER_BYTES, reps: int = 20) -> dict[str, Any]:
    """HBM bandwidth from a device-to-device copy: 2 * nbytes (read + write) / best time."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds, inner = best_time(lambda: dst.copy_(src), reps, COPY_WARMUP_S)
    gb_s = 2 * nbytes / seconds / 1e9
    return {"buffer_bytes": nbytes, "reps": reps, "calls_per_rep": inner, "best_ms": seconds * 1e3,
            "copy_gb_s": gb_s, "read_gb_s": gb_s,
            "formula": "copy_gb_s = 2 * buffer_bytes / best_s / 1e9 (bytes read + bytes written); the roofline takes "
                       "it as the read bandwidth (read_gb_s = copy_gb_s): a copy reads and writes at the same rate "
                       "and HBM serves reads and writes from one budget"}


def measure_gemm(device: str, m: int, k: int, n: int, reps: int = 10) -> dict[str, Any]:
    """bf16 torch.matmul [m, k] x [k, n]: best TFLOP/s (2 * m * k * n FLOPs)."""
    a = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=device)
    seconds, inner = best_time(lambda: torch.matmul(a, b), reps)
    return {"m": m, "k": k, "n": n, "dtype": "bfloat16", "reps": reps, "calls_per_rep": inner,
            "best_ms": seconds * 1e3, "tflop_s": 2.0 * m * k * n / seconds / 1e12}


def measure_hardware(device: str, cfg: ModelConfig | None) -> dict[str, Any]:
    """HBM copy bandwidth and bf16 GEMM throughput (8192^3, and 256 tokens x hidden -> intermediate of cfg)."""
    log("roofline: measuring HBM copy bandwidth and bf16 GEMM ...")
    with torch.cuda.device(torch.device(device)):
        hw = {"device_name": torch.cuda.get_device_name(torch.device(device)),
              "hbm": measure_copy_bandwidth(device),
              "gemm": measure_gemm(device, GEMM_SIZE, GEMM_SIZE, GEMM_SIZE)}
        if cfg is not None:
            hw["gemm_model_shape"] = measure_gemm(device, MODEL_GEMM_TOKENS, cfg.hidden_size, cfg.intermediate_size)
    release_memory(device)
    return hw


def engine_roofline(hw: dict[str, Any], cfg: ModelConfig, requests: list[BenchRequest],
                    points: list[dict]) -> dict[str, Any]:
    """The engine's batch-1 decode roofline and FLOPs per token; adds roofline_pct (concurrency 1),
    tensor_core_pct and total_tensor_core_pct to every point."""
    context = mean_decode_context(requests)
    kv_bytes = kv_elem_bytes(cfg)
    parts = decode_bytes_breakdown(cfg, kv_bytes, context)
    nbytes = sum(parts.values())
    tp = cfg.mapping.tp_size
    bandwidth = hw["hbm"]["read_gb_s"] * 1e9
    roofline_tok_s = bandwidth * tp / nbytes
    flops = flops_per_token(cfg, context)
    gemm_flop_s = hw["gemm"]["tflop_s"] * 1e12 * tp
    for p in points:
        if p["concurrency"] == 1 and p.get("decode_tok_s_per_request"):
            p["roofline_tok_s"] = roofline_tok_s
            p["roofline_pct"] = p["decode_tok_s_per_request"] / roofline_tok_s * 100
        p["tensor_core_pct"] = (p["output_tok_s"] or 0) * flops / gemm_flop_s * 100
        p["total_tensor_core_pct"] = (p["total_tok_s"] or 0) * flops / gemm_flop_s * 100
    return {"quantization": quant_metadata(cfg.quantization), "tp_size": tp, "mean_decode_context": context,
            "kv_cache_elem_bytes": kv_bytes, "decode_bytes_per_token": nbytes, "decode_bytes_breakdown": parts,
            "roofline_tok_s": roofline_tok_s, "matmul_params": matmul_params(cfg), "flops_per_token": flops,
            "formulas": {
                "decode_bytes_per_token": "sum of every decoder linear in its stored format with its scales (bf16/"
                                          "fp16/fp32; int8 + scale for W8A16; packed int4 + scales for W4A16 and "
                                          "W4A16_AWQ; e4m3 + scales for FP8) + norms + lm_head + one embedding row "
                                          "+ layers * 2 * kv_heads * head_size * kv_elem_bytes * mean_decode_context",
                "roofline_tok_s": "tp_size * hbm.read_gb_s * 1e9 / decode_bytes_per_token (batch 1)",
                "roofline_pct": "decode_tok_s_per_request / roofline_tok_s * 100 (concurrency-1 points)",
                "flops_per_token": "2 * matmul_params (decoder linears + lm_head) + 4 * layers * heads * head_size * "
                                   "mean_decode_context",
                "tensor_core_pct": "output_tok_s * flops_per_token / (tp_size * gemm.tflop_s * 1e12) * 100 (output "
                                   "tokens only)",
                "total_tensor_core_pct": "(input_tokens + output_tokens) / duration_s * flops_per_token / (tp_size * "
                                         "gemm.tflop_s * 1e12) * 100 (prefill tokens costed like decode tokens)"},
            "notes": [INT4_NOTE] if cfg.quantization.quant_algo in ("W4A16", "W4A16_AWQ") else []}


def roofline_report(hw: dict[str, Any], engine: dict[str, Any] | None, points: list[dict]) -> str:
    """A few lines and a table of the roofline figures."""
    hbm, gemm = hw["hbm"], hw["gemm"]
    lines = [f"roofline ({hw['device_name']}): HBM copy {hbm['copy_gb_s']:.0f} GB/s (2 x "
             f"{hbm['buffer_bytes'] / GiB:.0f} GiB / {hbm['best_ms']:.2f} ms), bf16 GEMM {GEMM_SIZE}^3 "
             f"{gemm['tflop_s']:.0f} TFLOP/s"]
    if "gemm_model_shape" in hw:
        g = hw["gemm_model_shape"]
        lines[0] += f", {g['m']}x{g['k']}->{g['n']} {g['tflop_s']:.0f} TFLOP/s"
    if engine is None:
        return lines[0]
    parts = engine["decode_bytes_breakdown"]
    lines.append(f"engine decode at batch 1: {engine['decode_bytes_per_token'] / 1e9:.3f} GB/token (weights "
                 f"{(engine['decode_bytes_per_token'] - parts['kv_cache']) / 1e9:.3f} GB + KV "
                 f"{parts['kv_cache'] / 1e9:.4f} GB at mean context {engine['mean_decode_context']:.1f}) -> roofline "
                 f"{engine['roofline_tok_s']:.1f} tok/s; {engine['flops_per_token'] / 1e9:.2f} GFLOP/token")
    lines.append("| concurrency | out tok/s | decode tok/s/req | roofline % | tensor core % (out) | "
                 "tensor core % (in+out) |")
    lines.append("|---|---|---|---|---|---|")

    def f(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for p in points:
        lines.append(f"| {p['concurrency']} | {f(p['output_tok_s'])} | {f(p.get('decode_tok_s_per_request'))} | "
                     f"{f(p.get('roofline_pct'))} | {f(p['tensor_core_pct'], 2)} | "
                     f"{f(p['total_tensor_core_pct'], 2)} |")
    lines += [f"note: {n}" for n in engine["notes"]]
    return "\n".join(lines)


# ---- HF transformers baseline --------------------------------------------------------------------------------

class TimingStreamer:
    """A generate() streamer that only records when each decoding step's tokens reach the host."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        """generate() calls this with the prompt first, then with every step's new tokens."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def load_hf(args: argparse.Namespace, engine_model: dict | None) -> tuple[Any, int, str]:
    """(model in eval mode on the device, pad id, description)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(args.device)
    if args.model is not None:
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        model = model.to(device).eval()
        source = f"HF {args.model} ({model.dtype})"
    else:
        cfg = random_model_config(args.random, resolve_dtype(args))
        config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                             num_attention_heads=cfg.num_attention_heads,
                             num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_size,
                             max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
                             rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.dtype),
                                                     attn_implementation="sdpa").eval()
        source = f"random {args.random} ({cfg.dtype}, unquantized, in memory)"
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return model, int(pad), source


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a config dtype name."""
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@torch.inference_mode()
def run_hf_point(model: Any, requests: list[BenchRequest], batch_size: int, pad_id: int,
                 device: str) -> tuple[list[RequestRecord], int]:
    """Static left-padded batches through model.generate; (records, tokens generated including padding waste)."""
    from transformers import GenerationConfig

    records = [RequestRecord(r.index, r.input_len, r.output_len) for r in requests]
    generated = 0
    for start in range(0, len(requests), batch_size):
        batch, recs = requests[start:start + batch_size], records[start:start + batch_size]
        width, new = max(len(r.prompt_ids) for r in batch), max(r.output_len for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1,
                                  pad_token_id=pad_id, use_cache=True)
        streamer = TimingStreamer()
        sync(device)
        t = time.perf_counter()
        for rec in recs:
            rec.send = t
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             streamer=streamer)
        sync(device)
        end = time.perf_counter()
        steps = out.shape[1] - width
        generated += steps * len(batch)
        for rec in recs:
            rec.end = end
            rec.token_times = streamer.times[:rec.output_len]
            rec.tokens = min(rec.output_len, steps)
            if steps < rec.output_len:
                rec.error = f"generate stopped after {steps} of {rec.output_len} tokens"
    return records, generated


def bench_hf(args: argparse.Namespace, requests: list[BenchRequest], batch_sizes: list[int]) -> tuple[list[dict], dict]:
    """Every HF batch size; (points, info)."""
    t = time.perf_counter()
    model, pad_id, source = load_hf(args, None)
    info = {"source": source, "load_s": time.perf_counter() - t, "pad_id": pad_id,
            "transformers": __import__("transformers").__version__}
    try:
        points = []
        for b in batch_sizes:
            for _ in range(args.warmup):
                run_hf_point(model, warmup_requests(requests, b), b, pad_id, args.device)
            log(f"hf: batch {b}, {len(requests)} requests ...")
            records, generated = run_hf_point(model, requests, b, pad_id, args.device)
            point = summarize(records, batch_size=b)
            point["decode_tok_s_per_request"] = 1e3 / point["itl_ms"]["mean"] if point["itl_ms"]["mean"] else None
            point["hf_generated_tokens"] = generated
            points.append(point)
    finally:
        del model
        release_memory(args.device)
    return points, info


# ---- driver --------------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    """Wait for the GPU (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    """Give cached GPU memory back between the engine and HF runs."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def ratios(engine: list[dict], hf: list[dict]) -> list[dict]:
    """Engine / HF output tok/s at matching concurrency = batch size, and best against best."""
    result = []
    for e in engine:
        for h in hf:
            if e["concurrency"] == h["batch_size"] and e["output_tok_s"] and h["output_tok_s"]:
                result.append({"engine_concurrency": e["concurrency"], "hf_batch_size": h["batch_size"],
                               "output_tok_s_ratio": e["output_tok_s"] / h["output_tok_s"]})
    best_e = max((p["output_tok_s"] or 0 for p in engine), default=0)
    best_h = max((p["output_tok_s"] or 0 for p in hf), default=0)
    if best_e and best_h:
        result.append({"engine_concurrency": "best", "hf_batch_size": "best", "output_tok_s_ratio": best_e / best_h})
    return result


def parse_concurrency_levels(text: str) -> list[int | None]:
    """'1,16,all' -> [1, 16, None] (None: every request at once)."""
    levels: list[int | None] = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "all":
            levels.append(None)
        else:
            value = parse_list(item)[0]
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"concurrency {item!r} must be a whole number or all")
            levels.append(int(value))
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model (one of --model, --engine, --random)")
    src.add_argument("--model", type=Path, default=None, help="HF checkpoint folder (engine converted from it)")
    src.add_argument("--engine", type=Path, default=None, help="engine folder (builder build's 1/engine)")
    src.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                     help="random-weight model of this shape, created in memory on the device")
    src.add_argument("--random-llama3-8b", dest="random", action="store_const", const="llama3-8b",
                     help="same as --random llama3-8b")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                   help="model dtype (auto: the checkpoint's; random models: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--concurrency", type=parse_concurrency_levels, default=[None],
                   help="engine sweep: requests in the engine at once, e.g. 1,16,64,all (default all)")
    p.add_argument("--batch1", action="store_true",
                   help="batch-1 decode comparison: --concurrency 1 and (with --hf) --hf-batch-size 1")
    p.add_argument("--hf", action="store_true", help="also run HF transformers generate on static batches")
    p.add_argument("--hf-only", action="store_true", help="run only the HF baseline")
    p.add_argument("--hf-batch-size", type=lambda s: [int(v) for v in parse_list(s)], default=[64],
                   help="HF static batch sizes, e.g. 1,64 (default 64)")
    q = p.add_argument_group("quantization of --random models (an --engine's or --model's own config decides there)")
    q.add_argument("--quant", choices=tuple(QUANT_MODES), default=None,
                   help="weight quantization as `builder build --quant` sets it (default none; lm_head excluded)")
    q.add_argument("--kv-cache-dtype", choices=tuple(KV_CACHE_MODES), default=None,
                   help="KV cache dtype as `builder build --kv-cache-dtype` (default auto: the model dtype)")
    q.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES, default=None,
                   help="int4_awq group size (default 128, or 64 when 128 does not divide the model's widths)")
    p.add_argument("--roofline", action="store_true",
                   help="cuda: measure HBM copy bandwidth and bf16 GEMM TFLOP/s, report the batch-1 decode roofline "
                        "and tensor-core use of every engine point (skipped on cpu)")
    add_workload_arguments(p)
    b = p.add_argument_group("engine limits")
    b.add_argument("--max-batch-size", type=int, default=None, help="default: the peak concurrency")
    b.add_argument("--max-num-tokens", type=int, default=8192, help="token budget of one engine step")
    b.add_argument("--tokens-per-block", type=int, default=32)
    b.add_argument("--kv-cache-memory-mb", type=int, default=None,
                   help="KV pool (default: what the run needs, capped by --gpu-memory-fraction on GPU)")
    b.add_argument("--gpu-memory-fraction", type=float, default=0.9,
                   help="share of free GPU memory (after weights and 3 GiB headroom) the KV pool may take")
    p.add_argument("--warmup", type=int, default=1,
                   help="warm-up passes before each point: its first C (or B) requests at its concurrency (batch "
                        f"size), outputs capped at {WARMUP_OUTPUT_TOKENS} tokens; not measured")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs for decode steps (vLLM's enforce_eager)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 avoids oversubscription on a shared CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.model, args.engine, args.random)) == 0:
        p.error("give --model HF_DIR, --engine DIR or --random-llama3-8b")
    if args.random and (args.model or args.engine):
        p.error("--random cannot be combined with --model or --engine")
    quant_flags = [f for f, v in (("--quant", args.quant), ("--kv-cache-dtype", args.kv_cache_dtype),
                                  ("--group-size", args.group_size)) if v is not None]
    if quant_flags and not args.random:
        p.error(f"{'/'.join(quant_flags)} apply to --random models only; with --model/--engine the engine's own "
                "config decides (build a quantized engine with `builder build --quant ...`)")
    if args.group_size is not None and args.quant != "int4_awq":
        p.error("--group-size only applies to --quant int4_awq")
    if args.hf_only:
        args.hf = True
    if (args.hf and args.engine is not None and args.model is None):
        p.error("--hf with --engine needs --model HF_DIR too (the checkpoint the engine was built from)")
    if args.batch1:
        args.concurrency, args.hf_batch_size = [1], [1]
    if args.workload == "file" or args.prompts_file:
        if args.model is None:
            p.error("--prompts-file needs --model (its tokenizer encodes the prompts)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print tables; write JSON."""
    args = parse_args(argv)
    spec = workload_spec(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.num_requests or 64
    excluded, tokenizer = special_ids(args)
    if args.engine is not None:
        vocab = EngineConfig.load(args.engine).model.vocab_size
    elif args.model is not None:
        from builder.checkpoint.hf import read_hf_config

        vocab = int(read_hf_config(args.model)["vocab_size"])
    else:
        vocab = RANDOM_SHAPES[args.random]["vocab_size"]
    requests = token_prompts(spec, n, vocab, excluded, tokenizer)
    max_input = max(len(r.prompt_ids) for r in requests)
    max_seq = max(len(r.prompt_ids) + r.output_len for r in requests)
    started = datetime.datetime.now(datetime.timezone.utc)
    result: dict[str, Any] = {"metadata": {
        "tool": "scripts/bench_engine.py", "command": shlex.join(["python", *sys.argv]),
        "time": started.isoformat(timespec="seconds"), "device": args.device,
        "device_name": torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda")
        and torch.cuda.is_available() else platform.processor() or platform.machine(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "workload": spec.describe(),
        "num_requests": n, "host": platform.node()}}
    model_cfg = None
    if args.random:
        model_cfg = random_model_config(args.random, resolve_dtype(args), args.quant or "none",
                                        args.kv_cache_dtype or "auto", args.group_size)
        result["metadata"]["quantization"] = quant_metadata(model_cfg.quantization)
    elif args.engine is not None:
        model_cfg = EngineConfig.load(args.engine).model
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if not args.hf_only:
            points, info = bench_engine(args, requests, args.concurrency, Path(tmp), max_input, max_seq)
            result["metadata"]["engine"] = info
            result["metadata"]["quantization"] = info["quantization"]
            model_cfg = ModelConfig.from_dict(info["model"])
            result["engine"] = points
            print(f"engine (builder.runtime.LLMEngine, {info['source']})\n" + markdown_table(points, "concurrency"))
    if args.roofline:
        if args.device.startswith("cuda") and torch.cuda.is_available():
            hw = measure_hardware(args.device, model_cfg)
            engine_roof = None
            if "engine" in result:
                engine_roof = engine_roofline(hw, model_cfg, requests, result["engine"])
            result["roofline"] = {"hardware": hw, "engine": engine_roof}
            print(roofline_report(hw, engine_roof, result.get("engine", [])))
        else:
            reason = f"--roofline needs a CUDA device (--device {args.device}); skipped"
            result["roofline"] = {"skipped": reason}
            print(f"roofline: {reason}")
    if args.hf:
        points, info = bench_hf(args, requests, args.hf_batch_size)
        result["metadata"]["hf"] = info
        result["hf"] = points
        print("HF transformers generate, static batches\n" + markdown_table(points, "batch_size"))
    if "engine" in result and "hf" in result:
        result["ratios"] = ratios(result["engine"], result["hf"])
        for r in result["ratios"]:
            print(f"engine c={r['engine_concurrency']} / HF b={r['hf_batch_size']}: "
                  f"{r['output_tok_s_ratio']:.2f}x output tok/s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    failed = [p for key in ("engine", "hf") for p in result.get(key, [])
              if p["errors"] or not p["exact_output_lengths"]]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (BuilderError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
