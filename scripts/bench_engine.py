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

  python scripts/bench_engine.py --random-llama3-8b --device cuda --input-len 128 --output-len 128 \\
      --concurrency 1,16,64,256 --num-requests 512 --out engine-128-128.json
  python scripts/bench_engine.py --random-llama3-8b --device cuda --workload mixed --num-requests 256 \\
      --concurrency 64,all --hf --hf-batch-size 64 --out mixed-vs-hf.json
  python scripts/bench_engine.py --model HF_DIR --device cuda --dtype bfloat16 --input-len 128 --output-len 128 \\
      --concurrency 1 --hf --hf-batch-size 1 --num-requests 8 --out batch1.json
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
from builder.config import BuildSettings, DTYPES, EngineConfig, ModelConfig  # noqa: E402
from builder.errors import BuilderError, ConfigError  # noqa: E402
from builder.workload import BenchRequest, token_prompts  # noqa: E402

RANDOM_SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_size=128, intermediate_size=14336, max_position_embeddings=8192,
                      rotary_base=500000.0),
    "tiny": dict(vocab_size=768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_size=16, intermediate_size=128, max_position_embeddings=512, rotary_base=10000.0),
}
RANDOM_STD = 0.02
MiB = 2**20
GPU_HEADROOM_BYTES = 3 * 2**30  # activations, logits and allocator slack next to weights + KV pool
WARMUP_OUTPUT_TOKENS = 8


# ---- model sources -------------------------------------------------------------------------------------------

def random_model_config(shape: str, dtype: str) -> ModelConfig:
    """A Llama ModelConfig of a named random shape."""
    return ModelConfig(architecture="LlamaForCausalLM", dtype=dtype, norm_epsilon=1e-5, **RANDOM_SHAPES[shape])


def random_weights(engine_dir: Path, cfg: ModelConfig, device: torch.device, rank: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in for builder.runtime.weights.load_weights: N(0, 0.02) tensors (norms = 1) made on the device."""
    from builder.runtime.weights import expected_layout

    generator = torch.Generator(device=device).manual_seed(rank)
    weights = {}
    for name, spec in expected_layout(cfg).items():
        if "layernorm" in name or "ln_f" in name:
            weights[name] = torch.ones(spec.shape, dtype=spec.dtype, device=device)
        else:
            weights[name] = torch.randn(spec.shape, dtype=spec.dtype, device=device, generator=generator) * RANDOM_STD
    return weights


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
    """KV pool size: --kv-cache-memory-mb, else what peak sequences at the longest length need, capped on GPU."""
    from builder.runtime.model_runner import kv_block_bytes

    if args.kv_cache_memory_mb:
        return float(args.kv_cache_memory_mb)
    block = kv_block_bytes(config)
    # the scheduler holds back one free block per running sequence when it admits a prompt
    blocks = peak * (math.ceil(max_seq / config.build.tokens_per_block) + 1)
    need = math.ceil(blocks * 1.05 + 1) * block
    if args.device.startswith("cuda") and torch.cuda.is_available():
        from builder.runtime.weights import expected_layout

        free, _ = torch.cuda.mem_get_info(torch.device(args.device))
        weights = sum(math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size()
                      for s in expected_layout(config.model).values())
        cap = (free - weights - GPU_HEADROOM_BYTES) * args.gpu_memory_fraction
        need = max(block, min(need, int(cap)))
    return need / MiB


def load_engine(args: argparse.Namespace, work: Path, max_input: int, max_seq: int, peak: int):
    """(LLMEngine, EngineConfig, description) from --engine, --model or --random."""
    from builder.runtime.engine import LLMEngine

    overrides = dict(max_num_tokens=args.max_num_tokens, max_batch_size=args.max_batch_size or peak)
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
        config = EngineConfig(random_model_config(args.random, resolve_dtype(args)),
                              build_settings(args, resolve_dtype(args), max_input, max_seq, peak))
        config.save(engine_dir)
        source = f"random {args.random} ({config.model.dtype}, in memory)"
    config = EngineConfig.load(engine_dir)
    kv_mb = kv_cache_mb(args, config, peak, max_seq)
    context = in_memory_random_weights() if args.random and args.engine is None and args.model is None \
        else contextlib.nullcontext()
    t = time.perf_counter()
    with context:
        engine = LLMEngine(engine_dir, device=args.device, kv_cache_memory_mb=kv_mb, **overrides)
    sync(args.device)
    info = {"source": source, "engine_dir": str(engine_dir), "load_s": time.perf_counter() - t,
            "kv_cache_memory_mb": kv_mb, "kv_blocks": engine.stats.kv_blocks_total,
            "max_batch_size": engine.max_batch_size, "max_num_tokens": engine.max_num_tokens,
            "model": config.model.to_dict(), "build": vars(config.build)}
    return engine, config, info


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
        source = f"random {args.random} ({cfg.dtype}, in memory)"
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 avoids oversubscription on a shared CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.model, args.engine, args.random)) == 0:
        p.error("give --model HF_DIR, --engine DIR or --random-llama3-8b")
    if args.random and (args.model or args.engine):
        p.error("--random cannot be combined with --model or --engine")
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
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        if not args.hf_only:
            points, info = bench_engine(args, requests, args.concurrency, Path(tmp), max_input, max_seq)
            result["metadata"]["engine"] = info
            result["engine"] = points
            print("engine (builder.runtime.LLMEngine)\n" + markdown_table(points, "concurrency"))
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
