#!/usr/bin/env python3
"""Microbenchmark of the plugins.gpu Triton kernels against torch built-ins on Llama-3-8B shapes (CUDA only).

    python scripts/bench_kernels.py [--out DIR] [--quick]

Two times per call: "GPU us" replays a CUDA graph of many calls (what the engine pays under CUDA graphs: no launch
overhead), rotating over enough copies of the weights / KV cache that they come from HBM rather than the 50 MB L2,
as in a real decode step; "eager us" is triton.testing.do_bench (median, L2 flushed before each call) of one eager
call, which also shows the host's launch overhead where that exceeds the GPU time. GB/s (bytes that must move:
inputs read once, outputs written once) and TFLOP/s use the GPU time; GB/s is compared with a device-to-device copy
measured in the same run. Prints a markdown table and writes bench_kernels.md / bench_kernels.json under --out.

Ops: fused residual + RMSNorm, RoPE, paged decode attention (bf16 / int8 / fp8 KV; split-KV), prefill attention over
paged KV (full and chunked), and the quantized GEMMs at M = 1, 16, 64, 256: INT4 AWQ (vs bf16 matmul and
torch._weight_int4pack_mm), INT8 weight-only (vs bf16 and eager dequant + matmul), FP8 (vs torch._scaled_mm).
For the Triton GEMMs a few tile configs are tried besides the built-in heuristic; the table shows the heuristic's
time and the best one found (the JSON lists every config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins import gpu, reference  # noqa: E402
from plugins.gpu.int4_gemm import gemm_config, split_k_for  # noqa: E402
from plugins.gpu._common import cdiv  # noqa: E402
from plugins.gpu.paged_attention import choose_num_splits  # noqa: E402
from plugins.metadata import AttentionMetadata  # noqa: E402

DEV = torch.device("cuda")
DT = torch.bfloat16
HIDDEN, INTER, NQ, NKV, HEAD = 4096, 14336, 32, 8, 128
GEMM_SHAPES = {"qkv": (6144, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
MS = (1, 16, 64, 256)
ROWS: list[dict] = []


def bench(fn, rep: int = 20) -> float:
    """Median microseconds of one eager fn() (L2 flushed before each call)."""
    return do_bench(fn, warmup=5, rep=rep, return_mode="median") * 1e3


def graph_us(fns) -> float:
    """Microseconds per call of a CUDA graph replaying fns round-robin (fns: the same call over distinct buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for f in fns:
        f()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) * 1e3 / len(fns), 1.0)  # upper bound (may include launch gaps)
    n = len(fns) * max(1, min(300 // len(fns), int(3000 / est / len(fns))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / n)
    del graph
    return sorted(times)[len(times) // 2]


def copies(nbytes: float) -> int:
    """Buffer sets to rotate through so that one pass over them is >= 3x the L2 (50 MB on H100)."""
    return max(1, min(16, cdiv(int(150e6), max(1, int(nbytes)))))


def record(op: str, shape: str, impl: str, us: float, nbytes: float | None = None, flops: float | None = None,
           eager: float | None = None, **extra) -> dict:
    row = dict(op=op, shape=shape, impl=impl, us=round(us, 2),
               gbs=None if nbytes is None else round(nbytes / us / 1e3, 1),
               tflops=None if flops is None else round(flops / us / 1e6, 1),
               eager_us=None if eager is None else round(eager, 2), **extra)
    ROWS.append(row)
    print(f"  {op:10s} {shape:28s} {impl:34s} {us:9.2f} us"
          + ("" if nbytes is None else f" {row['gbs']:8.1f} GB/s")
          + ("" if flops is None else f" {row['tflops']:7.1f} TFLOP/s")
          + ("" if eager is None else f"  eager {eager:8.2f} us"), flush=True)
    return row


def safe(op: str, shape: str, impl: str, fns, nbytes=None, flops=None, eager: bool = True, graph: bool = True,
         **extra):
    """Time fns (a callable or a list over distinct buffers) with graph_us (+ eager); report failures, go on."""
    fns = fns if isinstance(fns, list) else [fns]
    try:
        us = graph_us(fns) if graph else bench(fns[0])
        return record(op, shape, impl, us, nbytes, flops, bench(fns[0]) if eager else None, **extra)
    except Exception as e:  # report, keep going
        print(f"  {op} {shape} {impl}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        ROWS.append(dict(op=op, shape=shape, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}"))
        return None


def copy_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.float32, device=DEV).normal_()
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), rep=100)
    return record("copy", "2 GiB moved d2d", "tensor.copy_", us, 2 * x.numel() * 4)["gbs"]


# ------------------------------------------------------------------------------------------------ small ops


def bench_norm_rope() -> None:
    cos = torch.randn(8192, HEAD, device=DEV)
    sin = torch.randn(8192, HEAD, device=DEV)
    w = torch.randn(HIDDEN, device=DEV, dtype=DT)
    for t in (1, 16, 64, 256, 4096):
        x = torch.randn(t, HIDDEN, device=DEV, dtype=DT)
        r = torch.randn(t, HIDDEN, device=DEV, dtype=DT)
        nbytes = 4 * t * HIDDEN * 2 + HIDDEN * 2
        safe("add+rmsnorm", f"T={t} H={HIDDEN}", "triton", lambda: gpu.fused_add_rms_norm(x, r, w, 1e-5), nbytes)
        safe("add+rmsnorm", f"T={t} H={HIDDEN}", "torch eager ops (reference)",
             lambda: reference.fused_add_rms_norm(x, r, w, 1e-5), nbytes)
        qkv = torch.randn(t, (NQ + 2 * NKV) * HEAD, device=DEV, dtype=DT)
        q, k, _ = qkv.split([NQ * HEAD, NKV * HEAD, NKV * HEAD], dim=-1)
        q, k = q.view(t, NQ, HEAD), k.view(t, NKV, HEAD)
        pos = torch.randint(0, 8192, (t,), device=DEV)
        nbytes = 2 * t * (NQ + NKV) * HEAD * 2 + t * HEAD * 4 * 2
        safe("rope", f"T={t} {NQ}/{NKV}x{HEAD}", "triton", lambda: gpu.rotary_embedding(q, k, pos, cos, sin), nbytes)
        safe("rope", f"T={t} {NQ}/{NKV}x{HEAD}", "torch eager ops (reference)",
             lambda: reference.rotary_embedding(q, k, pos, cos, sin), nbytes)


# ------------------------------------------------------------------------------------------------ attention


def paged_kv(seqs: list[tuple[int, int]], kv_dtype, tpb: int = 32):
    """Random caches with blocks in a shuffled order, queries and metadata for (query_len, context_len) seqs."""
    blocks = [cdiv(c, tpb) for _, c in seqs]
    num_blocks = sum(blocks)
    perm = torch.randperm(num_blocks, device="cpu").tolist()
    tables, used = [], 0
    for b in blocks:
        tables.append(perm[used:used + b])
        used += b
    width = max(blocks)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEV)
    scale = None
    k = torch.randn(num_blocks, tpb, NKV, HEAD, device=DEV, dtype=DT)
    v = torch.randn(num_blocks, tpb, NKV, HEAD, device=DEV, dtype=DT)
    if kv_dtype is not None:
        scale = torch.tensor([0.05], device=DEV)
        k, v = gpu.quantize_fp8(k, scale), gpu.quantize_fp8(v, scale)
        if kv_dtype == torch.int8:
            k = (k.float() * 20).round().clamp(-128, 127).to(torch.int8)
            v = (v.float() * 20).round().clamp(-128, 127).to(torch.int8)
    qlens = [q for q, _ in seqs]
    starts = [0]
    for ql in qlens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(torch.zeros(starts[-1], dtype=torch.int64, device=DEV), bt,
                             torch.tensor(starts, dtype=torch.int32, device=DEV),
                             torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEV), qlens,
                             [c for _, c in seqs])
    q = torch.randn(starts[-1], NQ, HEAD, device=DEV, dtype=DT)
    idx = torch.tensor(tables, device=DEV).long()
    return q, k, v, scale, meta, idx


def gathered(cache: torch.Tensor, idx: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, nkv, ctx, d] contiguous copy of the sequences' KV (what SDPA needs); idx [B, blocks] block ids."""
    return cache[idx].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()


def bench_decode() -> None:
    scale = HEAD ** -0.5
    for b, ctx in ((1, 4096), (1, 32768), (16, 4096), (64, 2048), (256, 1024)):
        for kv_dtype, name in ((None, "bf16"), (torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
            elt = 2 if kv_dtype is None else 1
            kv_bytes = 2 * b * ctx * NKV * HEAD * elt
            sets = [paged_kv([(1, ctx)] * b, kv_dtype) for _ in range(copies(kv_bytes))]
            nbytes = kv_bytes + 2 * b * NQ * HEAD * 2
            shape = f"B={b} L={ctx} KV {name}"
            variants = []
            for block_n in (64, 128):
                auto = choose_num_splits(b, NKV, ctx, DEV, block_n)
                for splits in dict.fromkeys([auto, 1, max(1, auto // 2), min(64, auto * 2)] if b <= 16 else
                                            [auto, 1]):
                    variants.append((block_n, splits))
            default = (64, choose_num_splits(b, NKV, ctx, DEV, 64))
            times = {}
            for block_n, splits in variants:
                fns = [lambda q=q, k=k, v=v, s=s, meta=meta, bn=block_n, sp=splits: gpu.paged_decode_attention(
                    q, k, v, meta.block_tables, meta.context_lens, scale, s, num_splits=sp, max_context_len=ctx,
                    block_n=bn) for q, k, v, s, meta, _ in sets]
                try:
                    times[(block_n, splits)] = graph_us(fns)
                except Exception as e:
                    print(f"  decode {shape} {block_n, splits}: FAILED {e}", flush=True)
            q, k, v, s, meta, idx = sets[0]
            record("decode", shape, f"triton default (BLOCK_N 64, split x{default[1]})", times[default], nbytes,
                   eager=bench(lambda: gpu.paged_attention(q, k, v, meta, scale, s)),
                   variants={str(key): round(t, 2) for key, t in times.items()})
            best = min(times, key=times.get)
            if best != default:
                record("decode", shape, f"triton best (BLOCK_N {best[0]}, split x{best[1]})", times[best], nbytes)
            if (64, 1) in times and default[1] > 1:
                record("decode", shape, "triton (BLOCK_N 64, no split)", times[(64, 1)], nbytes)
            if kv_dtype is None:
                qs_list = [st[0].view(b, 1, NQ, HEAD).transpose(1, 2) for st in sets]
                pre = [(gathered(st[1], st[5], ctx), gathered(st[2], st[5], ctx)) for st in sets]
                safe("decode", shape, "SDPA on pre-gathered contiguous KV",
                     [lambda qs=qs, kg=kg, vg=vg: F.scaled_dot_product_attention(qs, kg, vg, scale=scale,
                                                                                  enable_gqa=True)
                      for qs, (kg, vg) in zip(qs_list, pre)], nbytes)
                del pre
                safe("decode", shape, "gather + SDPA",
                     [lambda qs=qs, st=st: F.scaled_dot_product_attention(
                         qs, gathered(st[1], st[5], ctx), gathered(st[2], st[5], ctx), scale=scale, enable_gqa=True)
                      for qs, st in zip(qs_list, sets)], nbytes)
            del sets
            torch.cuda.empty_cache()


PREFILL_CONFIGS = [None, (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3)]


def bench_prefill() -> None:
    scale = HEAD ** -0.5
    for seqs, label in (([(2048, 2048)], "1 x 2048"), ([(8192, 8192)], "1 x 8192"), ([(1024, 1024)] * 8, "8 x 1024"),
                        ([(512, 4096)], "chunk 512 @ ctx 4096"), ([(2048, 8192)] * 2, "2 x chunk 2048 @ 8192")):
        for kv_dtype, name in ((None, "bf16"), (torch.float8_e4m3fn, "fp8")):
            q, k, v, s, meta, idx = paged_kv(seqs, kv_dtype)
            visible = sum(sum(range(c - ql + 1, c + 1)) for ql, c in seqs)
            flops = 4 * HEAD * NQ * visible
            shape = f"{label} KV {name}"
            times = {}
            for cfg in PREFILL_CONFIGS:
                try:
                    times[cfg] = graph_us([lambda cfg=cfg: gpu.paged_prefill_attention(q, k, v, meta, scale, s,
                                                                                       config=cfg)])
                except Exception as e:
                    print(f"  prefill {shape} {cfg}: FAILED {e}", flush=True)
            record("prefill", shape, "triton default", times[None], flops=flops,
                   eager=bench(lambda: gpu.paged_attention(q, k, v, meta, scale, s)),
                   configs={str(c): round(t, 2) for c, t in times.items()})
            best = min(times, key=times.get)
            if best is not None:
                record("prefill", shape, f"triton best {best}", times[best], flops=flops)
            if kv_dtype is None and len(set(seqs)) == 1:
                ql, c = seqs[0]
                qs = q.view(len(seqs), ql, NQ, HEAD).transpose(1, 2)
                kg, vg = gathered(k, idx, c), gathered(v, idx, c)
                if ql == c:
                    safe("prefill", shape, "SDPA causal, pre-gathered KV",
                         lambda: F.scaled_dot_product_attention(qs, kg, vg, is_causal=True, scale=scale,
                                                                enable_gqa=True), flops=flops)
                else:
                    from torch.nn.attention.bias import causal_lower_right
                    mask = causal_lower_right(ql, c)
                    kr = kg.repeat_interleave(NQ // NKV, dim=1)
                    vr = vg.repeat_interleave(NQ // NKV, dim=1)
                    safe("prefill", shape, "SDPA lower-right causal, pre-gathered",
                         lambda: F.scaled_dot_product_attention(qs, kr, vr, attn_mask=mask, scale=scale),
                         flops=flops, graph=False)
            del q, k, v
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ GEMMs


def candidate_configs(m: int, n: int, k_iters: int, kind: str) -> list[tuple]:
    """The heuristic's config first, then alternatives (GEMV and tensor-core tiles, split-K on and off)."""
    base = gemm_config(m, n, k_iters, DEV, kind)
    if m <= 16:
        tiles = [(16, 64, 4, 4), (16, 128, 4, 4)]
        if m <= 4:
            tiles += [(1, 64, 4, 4), (1, 128, 4, 4)]
    elif m <= 64:
        tiles = [(64, 64, 4, 3), (64, 128, 4, 3), (32, 64, 4, 4)]
    else:
        tiles = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 256, 8, 3)]
    out = [base]
    for bm, bn, w, st in tiles:
        auto = split_k_for(cdiv(m, bm) * cdiv(n, bn), k_iters, DEV)
        out.append((bm, bn, w, st, auto))
        out.append((bm, bn, w, st, 1))
    return list(dict.fromkeys(out))


def sweep(op: str, shape: str, impl: str, make, configs, nbytes, flops) -> None:
    """GPU time of make(config) (a list of calls over distinct buffers) per config; record heuristic and best."""
    times = {}
    for cfg in configs:
        try:
            times[cfg] = graph_us(make(cfg))
        except Exception as e:
            print(f"  {op} {shape} {impl} {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
    if not times:
        ROWS.append(dict(op=op, shape=shape, impl=impl, error="every config failed"))
        return
    all_cfgs = {str(c): round(t, 2) for c, t in times.items()}
    if configs[0] in times:
        record(op, shape, impl, times[configs[0]], nbytes, flops, eager=bench(make(configs[0])[0]),
               config=str(configs[0]), configs=all_cfgs)
    best = min(times, key=times.get)
    if best != configs[0]:
        record(op, shape, impl + f" [best {best}]", times[best], nbytes, flops, config=str(best))


def tinygemm_weight(n: int, k: int, group: int = 128):
    """Random int4 weight packed for torch._weight_int4pack_mm (uint8 [N, K/2] -> int4pack) + scales/zeros."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=DEV)
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    w = torch._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([torch.rand(k // group, n, device=DEV) * 0.01, torch.zeros(k // group, n, device=DEV)],
                     dim=-1).to(DT).contiguous()
    return w, sz


def bench_gemms() -> None:
    from builder.quantize.weight_only import pack_int4
    in_s, w_s = torch.tensor([0.02], device=DEV), torch.tensor([1e-4], device=DEV)
    for name, (n, k) in GEMM_SHAPES.items():
        int4_w = n * k // 2 + (k // 128) * n * 2
        w16s = [torch.randn(n, k, device=DEV, dtype=DT) * 0.02 for _ in range(copies(2 * n * k))]
        w4s = [gpu.repack_awq(pack_int4(torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV)),
                              torch.rand(n, k // 128, device=DEV) * 0.01, DT) for _ in range(copies(int4_w))]
        q8s = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV),
                torch.rand(n, device=DEV, dtype=DT) * 1e-3) for _ in range(copies(n * k))]
        w8fs = [(torch.randn(n, k, device=DEV) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
                for _ in range(copies(n * k))]
        try:
            tgs = [tinygemm_weight(n, k) for _ in range(copies(int4_w))]
        except Exception as e:
            tgs = None
            print(f"  tinygemm pack failed: {e}", flush=True)
        pre = (torch.rand(k, device=DEV) + 0.5).to(DT)
        k_iters = k // 128
        for m in MS:
            x = torch.randn(m, k, device=DEV, dtype=DT)
            shape = f"{name} M={m} N={n} K={k}"
            act = 2 * m * k + 2 * m * n
            flops = 2 * m * n * k
            safe("gemm", shape, "bf16 torch (cuBLAS)", [lambda w=w: F.linear(x, w) for w in w16s], 2 * n * k + act,
                 flops)
            int4_bytes = int4_w + k * 2 + act
            sweep("gemm", shape, "int4 AWQ triton (+prequant)",
                  lambda cfg: [lambda w=w: gpu.int4_linear(x, w, pre_quant_scale=pre, config=cfg) for w in w4s],
                  candidate_configs(m, n, k_iters, "int4"), int4_bytes, flops)
            if tgs is not None:
                safe("gemm", shape, "int4 torch._weight_int4pack_mm (tinygemm)",
                     [lambda tg=tg: torch._weight_int4pack_mm(x, tg[0], 128, tg[1]) for tg in tgs], int4_bytes, flops)
            int8_bytes = n * k + 2 * n + act
            sweep("gemm", shape, "int8 W8A16 triton",
                  lambda cfg: [lambda q=q, sc=sc: gpu.int8_linear(x, q, sc, config=cfg) for q, sc in q8s],
                  candidate_configs(m, n, k_iters, "int8"), int8_bytes, flops)
            safe("gemm", shape, "int8 torch eager dequant + matmul",
                 [lambda q=q, sc=sc: F.linear(x, q.to(DT)) * sc for q, sc in q8s], int8_bytes, flops, eager=False)
            if m == 1:
                safe("gemm", shape, "int8 torch._weight_int8pack_mm",
                     [lambda q=q, sc=sc: torch._weight_int8pack_mm(x, q, sc) for q, sc in q8s], int8_bytes, flops,
                     eager=False)
            fp8_bytes = n * k + act
            sweep("gemm", shape, "fp8 triton (fused act quant)",
                  lambda cfg: [lambda w=w: gpu.fp8_linear(x, w, in_s, w_s, backend="triton", config=cfg)
                               for w in w8fs], candidate_configs(m, n, k_iters, "fp8"), fp8_bytes, flops)
            safe("gemm", shape, "fp8 act quant + torch._scaled_mm",
                 [lambda w=w: gpu.fp8_linear(x, w, in_s, w_s, backend="scaled_mm") for w in w8fs], fp8_bytes, flops)
            if m % 16 == 0:
                xq = gpu.quantize_fp8(x, in_s)
                safe("gemm", shape, "torch._scaled_mm alone (x pre-quantized)",
                     [lambda w=w: torch._scaled_mm(xq, w.t(), scale_a=in_s.reshape(()), scale_b=w_s.reshape(()),
                                                   out_dtype=DT) for w in w8fs], fp8_bytes, flops, eager=False)
        del w16s, w4s, q8s, w8fs, tgs
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ report


def markdown(copy_gbs: float, header: str) -> str:
    lines = [header, "", f"Copy bandwidth (same run): **{copy_gbs:.0f} GB/s** (read + write). "
             "`GPU us`: per call inside a CUDA graph, weights / KV rotated through > L2; `% copy` = achieved GB/s / "
             "copy GB/s; `eager us`: one eager call (do_bench, L2 flushed), host launch overhead included.", ""]
    for op in dict.fromkeys(r["op"] for r in ROWS if r["op"] != "copy"):
        lines += [f"### {op}", "", "| shape | impl | GPU us | GB/s | % copy | TFLOP/s | eager us |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in ROWS:
            if r["op"] != op:
                continue
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['impl']} | failed: {r['error'][:80]} | | | | |")
                continue
            pct = "" if r["gbs"] is None else f"{100 * r['gbs'] / copy_gbs:.0f}%"
            lines.append(f"| {r['shape']} | {r['impl']} | {r['us']} | {r['gbs'] or ''} | {pct} | "
                         f"{r['tflops'] or ''} | {r.get('eager_us') or ''} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=".", help="folder for bench_kernels.md / .json")
    ap.add_argument("--only", default="norm,decode,gemm,prefill", help="comma list of sections")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    header = (f"GPU: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
              f"{triton.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(header, flush=True)
    copy_gbs = copy_bandwidth()
    sections = {"norm": bench_norm_rope, "decode": bench_decode, "prefill": bench_prefill, "gemm": bench_gemms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only.split(","):
        try:
            sections[name]()
        except Exception:  # keep the other sections' numbers
            traceback.print_exc()
            ROWS.append(dict(op=name, shape="-", impl="section", error=traceback.format_exc()[-300:]))
        md = markdown(copy_gbs, header)  # written after every section, so a cut-off run keeps what it measured
        (out / "bench_kernels.md").write_text(md)
        (out / "bench_kernels.json").write_text(json.dumps(dict(header=header, copy_gbs=copy_gbs, rows=ROWS),
                                                           indent=1))
    print("\n" + md)


if __name__ == "__main__":
    main()
