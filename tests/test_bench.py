"""`builder bench` against a real tritonserver, scripts/bench_engine.py on the CPU engine and HF, the workloads."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from builder.bench import RequestRecord, markdown_table, plot, stats, summarize
from builder.cli import main
from builder.workload import WorkloadSpec, draw_lengths, text_prompts, token_prompts

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_bench_engine():
    """scripts/bench_engine.py as a module."""
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "scripts" / "bench_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_stats(s: dict) -> None:
    """Percentiles present, positive and ordered."""
    assert s["min"] > 0
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["min"] <= s["mean"] <= s["max"]


def test_workloads_are_deterministic_and_exact(tiny_checkpoints):
    from builder.triton.detokenizer import load_tokenizer

    mixed = WorkloadSpec(kind="mixed", seed=0)
    rng = random.Random(0)
    expected = [(rng.randint(32, 1024), rng.randint(16, 512)) for _ in range(5)]
    assert draw_lengths(mixed, 5) == expected
    assert draw_lengths(mixed, 3) == expected[:3]  # sweep points share a prefix
    for arch, hf_dir in tiny_checkpoints.items():
        tokenizer = load_tokenizer(hf_dir)
        spec = WorkloadSpec(kind="mixed", input_range=(2, 60), output_range=(1, 9), seed=3)
        requests = text_prompts(spec, 12, tokenizer)
        assert [len(tokenizer.encode(r.text)) for r in requests] == [r.input_len for r in requests], arch
        assert [r.text for r in text_prompts(spec, 12, tokenizer)] == [r.text for r in requests]
    ids = token_prompts(WorkloadSpec(input_len=7, output_len=3), 4, 768, exclude_ids=[766, 767])
    assert all(len(r.prompt_ids) == 7 and r.output_len == 3 and max(r.prompt_ids) < 766 for r in ids)


def test_summary_plot_and_table(tmp_path):
    records = []
    for i in range(10):
        r = RequestRecord(i, 16, 4, send=float(i))
        r.token_times = [i + 0.1 + 0.01 * i, i + 0.5, i + 0.6, i + 0.9]
        r.end = i + 0.9
        records.append(r)
    bad = RequestRecord(10, 16, 4, send=10.0, end=10.5, error="refused")
    point = summarize(records + [bad], concurrency=2)
    assert (point["requests"], point["completed"], point["errors"]) == (11, 10, 1)
    assert point["output_tokens"] == 40 and point["exact_output_lengths"]
    assert point["duration_s"] == pytest.approx(10.5)
    assert point["ttft_ms"]["min"] == pytest.approx(100.0)
    for key in ("ttft_ms", "itl_ms", "chunk_gap_ms", "e2e_latency_ms"):
        check_stats(point[key])
    assert stats([]) == {k: None for k in ("p50", "p90", "p99", "mean", "min", "max")}
    assert "| 2 | 11 | 1 |" in markdown_table([point])
    png = plot([point, dict(point, concurrency=4)], tmp_path / "p.png", "concurrency")
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.server
def test_bench_against_tritonserver(llama_server, tmp_path):
    out = tmp_path / "out"
    rc = main(["bench", "--url", llama_server.grpc_url, "--repo", str(llama_server.repo), "--concurrency", "1,4",
               "--input-len", "16", "--output-len", "8", "--num-requests", "8", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    meta = data["metadata"]
    assert meta["url"] == llama_server.grpc_url and meta["model"] == "ensemble" and meta["sweep"] == "concurrency"
    assert meta["workload"]["input_len"] == 16 and meta["command"] and meta["time"]
    assert [p["concurrency"] for p in data["results"]] == [1, 4]
    for p in data["results"]:
        assert (p["requests"], p["completed"], p["errors"]) == (8, 8, 0)
        assert p["output_tokens"] == 8 * 8 and p["exact_output_lengths"]  # min_tokens forces every length
        assert p["input_tokens"] == 8 * 16
        assert p["output_tokens_retokenized"] > 0 and p["output_tok_s"] > 0 and p["request_throughput"] > 0
        for key in ("ttft_ms", "itl_ms", "chunk_gap_ms", "e2e_latency_ms"):
            check_stats(p[key])
        assert p["e2e_latency_ms"]["p50"] >= p["ttft_ms"]["p50"]
        assert p["client_cpu_s"] >= 0
    png = (out / "bench.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000

    # open loop, and a request the server refuses (prompt longer than max_input_len = 128) counted as an error
    rc = main(["bench", "--url", llama_server.grpc_url, "--repo", str(llama_server.repo), "--request-rate", "inf",
               "--input-len", "8", "--output-len", "4", "--num-requests", "4", "--warmup", "0",
               "--out", str(out), "--no-plot"])
    point = json.loads((out / "bench.json").read_text())["results"][0]
    assert rc == 0 and point["request_rate"] == "inf" and point["output_tokens"] == 16
    assert point["send_lag_ms"]["max"] >= 0
    rc = main(["bench", "--url", llama_server.grpc_url, "--repo", str(llama_server.repo), "--input-len", "200",
               "--output-len", "4", "--num-requests", "2", "--warmup", "0", "--out", str(out), "--no-plot"])
    point = json.loads((out / "bench.json").read_text())["results"][0]
    assert rc == 1 and point["errors"] == 2 and "max_input_len" in point["error_messages"][0]


def test_bench_needs_a_tokenizer(capsys):
    assert main(["bench", "--url", "127.0.0.1:1"]) == 2
    assert "--repo" in capsys.readouterr().err


def test_bench_engine_and_hf_baseline(tiny_checkpoints, tmp_path):
    bench_engine = load_bench_engine()
    threads = torch.get_num_threads()
    out = tmp_path / "engine.json"
    try:
        rc = bench_engine.main(["--model", str(tiny_checkpoints["LlamaForCausalLM"]), "--input-len", "12",
                                "--output-len", "6", "--num-requests", "4", "--concurrency", "1,all", "--hf",
                                "--hf-batch-size", "1,2", "--threads", "1", "--out", str(out)])
        assert rc == 0
        data = json.loads(out.read_text())
        assert [p["concurrency"] for p in data["engine"]] == [1, 4]
        assert [p["batch_size"] for p in data["hf"]] == [1, 2]
        for p in data["engine"] + data["hf"]:
            assert p["errors"] == 0 and p["output_tokens"] == 4 * 6 and p["exact_output_lengths"]
            check_stats(p["ttft_ms"])
            check_stats(p["itl_ms"])
            assert p["decode_tok_s_per_request"] > 0
        assert data["engine"][0]["engine"]["steps"] == 4 * 6  # batch 1: one step per token
        assert data["engine"][1]["engine"]["max_seqs_in_step"] == 4
        assert data["hf"][1]["hf_generated_tokens"] == 4 * 6
        assert {(r["engine_concurrency"], r["hf_batch_size"]) for r in data["ratios"]} == {(1, 1), ("best", "best")}

        # a random-weight model made in memory (the --random-llama3-8b path, tiny shapes), mixed lengths
        rc = bench_engine.main(["--random", "tiny", "--workload", "mixed", "--input-range", "4-20",
                                "--output-range", "2-6", "--num-requests", "3", "--threads", "1", "--out", str(out)])
        data = json.loads(out.read_text())
        assert rc == 0 and data["engine"][0]["exact_output_lengths"] and data["engine"][0]["concurrency"] == 3
    finally:
        torch.set_num_threads(threads)
