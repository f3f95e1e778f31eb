#!/usr/bin/env python3
"""Benchmark the streaming converter on a random-weight Llama-3-8B-shaped checkpoint (a benchmark, not a test).

Creates once (cached in --work-dir) an HF checkpoint with Llama-3-8B's shapes (hidden 4096, 32 layers, 32 heads,
8 KV heads, intermediate 14336, vocab 128256, bfloat16, ~5 GB safetensors shards + index; the tiny Llama's
tokenizer, whose ids all fit the vocabulary, stands in for calibration). The tensors are generated one at a time
from a fixed seed and written with builder's streaming safetensors writer, so the model is never in memory.

Then, for each --modes x --tp, converts it in a fresh subprocess (builder.checkpoint.convert.convert_checkpoint)
and measures: conversion seconds (inside the child, around convert_checkpoint), process wall seconds, input GB/s
(input checkpoint bytes / conversion seconds), peak RSS (the child's VmHWM, read by the child itself at the end;
wait4's ru_maxrss is recorded too but also counts the parent's RSS carried over the fork/exec), the peaks of its
anonymous and file-backed RSS (/proc polled every 0.1 s; mmap'ed input pages count as file-backed RSS), output
bytes. The input files are dropped from the page cache (posix_fadvise DONTNEED) before each run and every output
is deleted right after its measurement.

  nice -n 10 timeout 3h python scripts/bench_convert.py --modes none --tp 1,2
  python scripts/bench_convert.py --only-create
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "int8_wo", "int4_wo", "int4_awq", "fp8")
SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             intermediate_size=14336, vocab_size=128256)
SHARD_BYTES = 5_000_000_000
SEED = 0
STD = 0.02
GiB = 2**30


def hf_config(shape: dict) -> dict:
    """config.json of Llama-3-8B (bf16) with the given shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02, **shape}


def tensor_plan(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes in layer order."""
    h, i, v, d = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["head_dim"]
    nq, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    plan = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        plan += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (nq * d, h)),
                 (p + "self_attn.k_proj.weight", (nkv * d, h)), (p + "self_attn.v_proj.weight", (nkv * d, h)),
                 (p + "self_attn.o_proj.weight", (h, nq * d)), (p + "post_attention_layernorm.weight", (h,)),
                 (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                 (p + "mlp.down_proj.weight", (h, i))]
    return plan + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_tensor(name: str, shape: tuple[int, ...], index: int):
    """bf16 tensor for one name: norms ~1, matrices N(0, STD); generated in row chunks from seed SEED + index."""
    import torch

    gen = torch.Generator().manual_seed(SEED + index)
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (64 * 2**20) // shape[1])  # 64 Mi float32 elements at a time
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        out[start:start + n] = torch.randn((n, shape[1]), generator=gen).mul_(STD)
    return out


def create_checkpoint(hf_dir: Path, shape: dict = SHAPE) -> Path:
    """Write the random checkpoint shard by shard (never the whole model in memory); no-op when complete."""
    import torch

    from builder.checkpoint.safetensors_io import write_streaming
    from builder.checkpoint.tiny import make_tiny_model

    done = hf_dir / ".complete"
    if done.is_file():
        return hf_dir
    hf_dir.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(shape)
    shards: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for index, (name, shp) in enumerate(plan):
        nbytes = 2 * torch.Size(shp).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((index, name, shp))
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(name, torch.bfloat16, shp) for _, name, shp in shard]
        started = time.monotonic()
        write_streaming(hf_dir / file, entries, ((name, random_tensor(name, shp, i)) for i, name, shp in shard))
        total += (hf_dir / file).stat().st_size
        weight_map.update({name: file for _, name, _ in shard})
        print(f"wrote {file} ({(hf_dir / file).stat().st_size / 1e9:.2f} GB, {time.monotonic() - started:.0f} s)",
              flush=True)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (hf_dir / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
    tiny = make_tiny_model(hf_dir.parent / "tiny-llama-tokenizer")  # its tokenizer ids (< 768) fit the vocab
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy2(tiny / name, hf_dir / name)
    done.write_text("ok\n")
    return hf_dir


def input_files(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to drop these files' cached pages, so each run reads its input from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


CHILD = r"""
import json, sys, time
from pathlib import Path
from builder.checkpoint.convert import convert_checkpoint
from builder.config import BuildSettings
hf, out, tp, mode, calib_size, calib_seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], \
    int(sys.argv[5]), int(sys.argv[6])
kwargs = {}
try:
    from builder.config import QuantOptions
    kwargs["quant"] = QuantOptions(quant=mode, calib_size=calib_size, calib_seq_len=calib_seq_len)
except ImportError:
    if mode != "none":
        raise SystemExit("this checkout has no quantization options (builder.config.QuantOptions)")
started = time.perf_counter()
convert_checkpoint(Path(hf), Path(out), BuildSettings(), tp_size=tp, **kwargs)
seconds = time.perf_counter() - started
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print("BENCH " + json.dumps({"convert_seconds": seconds, "vm_hwm_kb": int(status["VmHWM"].split()[0])}), flush=True)
"""


class ProcPoller(threading.Thread):
    """Polls /proc/<pid>/status for the peak VmRSS, RssAnon and RssFile (kB)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]))
            except (OSError, ValueError, IndexError):
                pass
            self.stop.wait(self.interval)


def run_one(hf_dir: Path, out_dir: Path, mode: str, tp: int, calib_size: int, calib_seq_len: int,
            timeout: float) -> dict:
    """Convert once in a fresh subprocess and return its measurements."""
    files = input_files(hf_dir)
    input_bytes = sum(p.stat().st_size for p in files)
    shutil.rmtree(out_dir, ignore_errors=True)
    drop_page_cache(files)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = out_dir.with_name(out_dir.name + ".log")
    started = time.monotonic()
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(hf_dir), str(out_dir), str(tp), mode,
                                 str(calib_size), str(calib_seq_len)], stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
        poller = ProcPoller(proc.pid)
        poller.start()
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    poller.stop.set()
    poller.join()
    output = log.read_text()
    result = {"mode": mode, "tp": tp, "returncode": proc.returncode, "wall_seconds": round(wall, 1),
              "input_bytes": input_bytes, "ru_maxrss_gib": round(usage.ru_maxrss * 1024 / GiB, 3),
              "peak_rss_anon_gib": round(poller.peak["RssAnon"] * 1024 / GiB, 3),
              "peak_rss_file_gib": round(poller.peak["RssFile"] * 1024 / GiB, 3),
              "calib": f"{calib_size}x{calib_seq_len}" if mode in ("int4_awq", "fp8") else None}
    bench = [line for line in output.splitlines() if line.startswith("BENCH ")]
    if proc.returncode == 0 and bench:
        report = json.loads(bench[-1][6:])
        seconds = report["convert_seconds"]
        result |= {"convert_seconds": round(seconds, 1), "peak_rss_gib": round(report["vm_hwm_kb"] * 1024 / GiB, 3),
                   "input_gb_per_s": round(input_bytes / seconds / 1e9, 3),
                   "output_bytes": sum(p.stat().st_size for p in out_dir.glob("rank*.safetensors"))}
    else:
        result["error"] = output.strip().splitlines()[-1][:300] if output.strip() else f"exit {proc.returncode}"
    shutil.rmtree(out_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    return result


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM"


def markdown(results: list[dict]) -> str:
    lines = ["| mode | tp | convert s | process s | input GB/s | peak RSS GiB | anon GiB | file GiB | output GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['tp']} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['mode']} | {r['tp']} | {r['convert_seconds']} | {r['wall_seconds']} | "
                     f"{r['input_gb_per_s']} | {r['peak_rss_gib']} | {r['peak_rss_anon_gib']} | "
                     f"{r['peak_rss_file_gib']} | {r['output_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--tp", default="1,2", help="comma-separated tensor-parallel sizes")
    parser.add_argument("--only-create", action="store_true", help="create the checkpoint and stop")
    parser.add_argument("--calib-size", type=int, default=1, help="calibration sequences (int4_awq, fp8)")
    parser.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per conversion")
    parser.add_argument("--results", type=Path, default=None, help="JSON file (default WORK_DIR/results.json); "
                        "results of other mode/tp pairs already in it are kept")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    tps = [int(t) for t in args.tp.split(",") if t]
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    hf_dir = work / "llama3-8b-random"
    need = (0 if (hf_dir / ".complete").is_file() else 16.1e9) + (0 if args.only_create else 16.5e9)
    if free < need:
        print(f"error: {work} has {free / 1e9:.1f} GB free, this needs about {need / 1e9:.1f} GB", file=sys.stderr)
        return 2
    started = time.monotonic()
    create_checkpoint(hf_dir)
    print(f"checkpoint ready in {hf_dir} ({sum(p.stat().st_size for p in input_files(hf_dir)) / 1e9:.2f} GB, "
          f"{time.monotonic() - started:.0f} s)", flush=True)
    if args.only_create:
        return 0
    results_path = args.results or work / "results.json"
    record = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    for mode in modes:
        for tp in tps:
            result = run_one(hf_dir, work / f"out-{mode}-tp{tp}", mode, tp, args.calib_size, args.calib_seq_len,
                             args.timeout)
            result["date"] = datetime.date.today().isoformat()
            print(json.dumps(result), flush=True)
            record["runs"] = [r for r in record["runs"] if (r["mode"], r["tp"]) != (mode, tp)] + [result]
            record |= {"machine": machine(), "disk_free_gb": round(shutil.disk_usage(work).free / 1e9, 1),
                       "shape": SHAPE, "dtype": "bfloat16"}
            results_path.write_text(json.dumps(record, indent=2) + "\n")
    order = {m: k for k, m in enumerate(MODES)}
    runs = sorted(record["runs"], key=lambda r: (order.get(r["mode"], 99), r["tp"]))
    print(markdown(runs))
    print(f"results: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
