#!/usr/bin/env python3
"""Quantization accuracy table on the trained reference model (docs/performance.md).

Converts builder's committed reference model (builder.checkpoint.reference) once unquantized (its own dtype,
bfloat16, tp 1: the reference) and once per quantization mode, scores every engine through builder's runtime on
the reference model's held-out text (non-overlapping 256-token windows) and reports perplexity, its increase over
the unquantized engine, mean KL(unquantized || quantized) of the next-token distributions and top-1 agreement.

Besides the CLI modes it builds "int4_rtn_g{64,128}": the int4_awq engine with every AWQ tensor re-made by plain
round-to-nearest group-wise int4 of the same float weights (scales amax/7, prequant scale 1, same layout and group
size), i.e. AWQ with its scale search and its clip search switched off, and "int4_clip_g{64,128}": the same with
builder's per-group clip search (unweighted) but no AWQ scales. TensorRT-LLM's int4_wo (W4A16) is per channel, so
it is not the same-group baseline for AWQ; both comparisons are printed.

  nice -n 10 python scripts/eval_quant.py --out /tmp/eval_quant
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> QuantOptions fields (None: derived engine, see make_rtn_engine)
CONFIGS = {
    "none": {},
    "int8_wo": {"quant": "int8_wo"},
    "int4_wo": {"quant": "int4_wo"},
    "int4_awq_g128": {"quant": "int4_awq", "group_size": 128},
    "int4_rtn_g128": None,
    "int4_clip_g128": None,
    "int4_awq_g64": {"quant": "int4_awq", "group_size": 64},
    "int4_rtn_g64": None,
    "int4_clip_g64": None,
    "fp8": {"quant": "fp8"},
    "kv_int8": {"kv_cache_dtype": "int8"},
    "kv_fp8": {"kv_cache_dtype": "fp8"},
    "fp8+kv_fp8": {"quant": "fp8", "kv_cache_dtype": "fp8"},
}


def make_rtn_engine(awq_dir: Path, float_dir: Path, out_dir: Path, clip: bool = False) -> None:
    """Copy the int4_awq engine, replacing each AWQ linear by plain group-wise int4 (RTN) of the float weight;
    clip=True: with builder's per-group clip search (unweighted) but no AWQ scales."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import torch

    from builder.config import EngineConfig
    from builder.quantize.awq import quantize_awq
    from builder.quantize.weight_only import groupwise_scales, pack_int4, quantize_int4_groupwise
    from builder.runtime.weights import torch_dtype

    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(awq_dir, out_dir)
    config = EngineConfig.load(awq_dir)
    dtype, group = torch_dtype(config.model.dtype), config.model.quantization.group_size
    with safe_open(str(awq_dir / "rank0.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    with safe_open(str(float_dir / "rank0.safetensors"), "pt") as f:
        for name in [n for n in tensors if n.endswith(".prequant_scaling_factor")]:
            module = name.rsplit(".", 1)[0]
            weight = f.get_tensor(module + ".weight").float()
            scales = groupwise_scales(weight, group)  # amax/7 per group: no clip search, no AWQ scales
            plain = {"weight": pack_int4(quantize_int4_groupwise(weight, scales)), "weights_scaling_factor": scales,
                     "prequant_scaling_factor": torch.ones(weight.shape[1], dtype=dtype)}
            if clip:
                plain = quantize_awq(weight, group, None, dtype)  # clip search on W, prequant scale 1
            for suffix, tensor in plain.items():
                old = tensors[f"{module}.{suffix}"]
                assert old.shape == tensor.shape and old.dtype == tensor.dtype, (module, suffix)
                tensors[f"{module}.{suffix}"] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "rank0.safetensors"))


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return rev + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | quant_algo | kv cache | perplexity | ppl increase | mean KL (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = r["quantization"]
        lines.append(f"| {r['name']} | {q.get('quant_algo') or '-'} | {q.get('kv_cache_quant_algo') or '-'} | "
                     f"{r['perplexity']:.4f} | {r['ppl_increase_pct']:+.2f}% | {r['mean_kl']:.5f} | "
                     f"{100 * r['top1_agreement']:.2f}% |")
    return "\n".join(lines)


def check_bars(by_name: dict[str, dict]) -> list[str]:
    """The issue's acceptance bars, each a PASS/FAIL line with its numbers."""
    lines = []

    def bar(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}: {text}")

    for g in (128, 64):
        awq, rtn, wo = by_name.get(f"int4_awq_g{g}"), by_name.get(f"int4_rtn_g{g}"), by_name.get("int4_wo")
        if awq and wo:
            bar(awq["mean_kl"] < wo["mean_kl"], f"int4_awq g{g} KL {awq['mean_kl']:.5f} < int4_wo (per-channel) KL "
                f"{wo['mean_kl']:.5f}")
        if awq and rtn:
            bar(awq["mean_kl"] < rtn["mean_kl"], f"int4_awq g{g} KL {awq['mean_kl']:.5f} < plain group-wise int4 "
                f"g{g} KL {rtn['mean_kl']:.5f}")
    if "int8_wo" in by_name:
        inc = by_name["int8_wo"]["ppl_increase_pct"]
        bar(inc <= 1.0, f"int8_wo perplexity increase {inc:+.3f}% within 1%")
    if "fp8" in by_name:
        inc = by_name["fp8"]["ppl_increase_pct"]
        bar(inc <= 2.0, f"fp8 perplexity increase {inc:+.3f}% within 2%")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/eval_quant"), help="engines, JSON and markdown")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--max-tokens", type=int, default=0, help="held-out tokens to score (0: all)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-size", type=int, default=None, help="calibration sequences (default: builder's)")
    parser.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence")
    args = parser.parse_args(argv)

    from builder.checkpoint.convert import convert_checkpoint
    from builder.checkpoint.reference import heldout_text, reference_model_dir
    from builder.config import BuildSettings, QuantOptions
    from builder.accuracy import evaluate, tokenize

    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}")
    hf_dir = reference_model_dir()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    settings = BuildSettings(dtype="auto", max_seq_len=512, max_input_len=512, max_num_tokens=4096)
    calib = {k: v for k, v in (("calib_size", args.calib_size), ("calib_seq_len", args.calib_seq_len)) if v}

    def engine(name: str) -> Path:
        path = out / "engines" / name
        if CONFIGS[name] is None:  # int4_{rtn,clip}_g{G}: derived from int4_awq_g{G}
            awq = name.replace("rtn", "awq").replace("clip", "awq")
            make_rtn_engine(engine(awq), engine("none"), path, clip="clip" in name)
        elif not (path / "config.json").is_file():
            convert_checkpoint(hf_dir, path, BuildSettings(**vars(settings)), tp_size=1,
                               quant=QuantOptions(**CONFIGS[name], **calib))
        return path

    ids = tokenize(heldout_text(), hf_dir)
    reference = engine("none")
    cache: dict = {}
    rows = []
    for name in names:
        started = time.monotonic()
        report = evaluate(engine(name), reference, ids, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                          text_source="reference heldout.txt", reference_cache=cache)
        row = {"name": name, **report.to_dict()}
        rows.append(row)
        print(f"{name}: ppl {report.perplexity:.4f} ({report.ppl_increase_pct:+.2f}%), KL {report.mean_kl:.5f}, "
              f"top-1 {100 * report.top1_agreement:.2f}% [{time.monotonic() - started:.0f} s]", flush=True)
    command = "python scripts/eval_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), "date": datetime.date.today().isoformat(), "machine": machine(),
              "revision": git_revision(), "model": str(hf_dir.relative_to(ROOT)), "dtype": "bfloat16",
              "tokens": rows[0]["tokens"] if rows else 0, "seq_len": args.seq_len, "rows": rows,
              "bars": check_bars({r["name"]: r for r in rows})}
    (out / "eval_quant.json").write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(rows)
    (out / "eval_quant.md").write_text(table + "\n\n" + "\n".join(record["bars"]) + "\n")
    print(table)
    print("\n".join(record["bars"]))
    print(f"wrote {out / 'eval_quant.json'} and {out / 'eval_quant.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
