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


@pytest.mark.parametrize("quant, kv", [("int4_awq", "int8"), ("int8_wo", "auto"), ("fp8", "fp8")])
def test_bench_engine_random_quantized(quant, kv, tmp_path, capsys):
    from builder.runtime.weights import expected_layout

    bench_engine = load_bench_engine()
    cfg = bench_engine.random_model_config("tiny", "float32", quant, kv)
    assert cfg.quantization.exclude_modules == ["lm_head"]
    assert cfg.quantization.group_size == (64 if quant == "int4_awq" else 128)  # tiny widths: 128 does not divide
    weights = bench_engine.random_weights(tmp_path, cfg, torch.device("cpu"))
    layout = expected_layout(cfg)
    assert weights.keys() == layout.keys()
    for name, spec in layout.items():
        t = weights[name]
        assert (t.dtype, tuple(t.shape)) == (spec.dtype, tuple(spec.shape)), name
        assert torch.isfinite(t.float()).all(), name
        if "scaling_factor" in name:
            assert (t.float() > 0).all(), name
    if kv != "auto":
        assert weights["transformer.layers.0.attention.kv_cache_scaling_factor"].item() == pytest.approx(0.05)
    layer0 = {n: t for n, t in weights.items() if n.startswith("transformer.layers.0.mlp.fc.")}
    if quant == "int4_awq":
        assert layer0["transformer.layers.0.mlp.fc.weight"].dtype == torch.int8
        assert layer0["transformer.layers.0.mlp.fc.prequant_scaling_factor"].dtype == torch.float32  # model dtype
    elif quant == "fp8":
        w = layer0["transformer.layers.0.mlp.fc.weight"].float() * layer0["transformer.layers.0.mlp.fc."
                                                                          "weights_scaling_factor"]
        assert 0.015 < w.std().item() < 0.025  # dequantized ~ N(0, 0.02)
    assert weights["lm_head.weight"].dtype == torch.float32  # excluded

    threads = torch.get_num_threads()
    out = tmp_path / "q.json"
    try:
        rc = bench_engine.main(["--random", "tiny", "--quant", quant, "--kv-cache-dtype", kv, "--device", "cpu",
                                "--input-len", "10", "--output-len", "5", "--num-requests", "2", "--concurrency",
                                "1,all", "--warmup", "0", "--threads", "1", "--roofline", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads(out.read_text())
    meta = data["metadata"]["quantization"]
    assert (meta["quant"], meta["kv_cache_dtype"]) == (quant, kv)
    assert meta["quant_algo"] == {"int4_awq": "W4A16_AWQ", "int8_wo": "W8A16", "fp8": "FP8"}[quant]
    assert data["metadata"]["engine"]["model"]["quantization"]["quant_algo"] == meta["quant_algo"]
    for p in data["engine"]:
        assert p["errors"] == 0 and p["output_tokens"] == 2 * 5 and p["exact_output_lengths"]
    assert "skipped" in data["roofline"]
    printed = capsys.readouterr().out
    assert f"quant {quant}" in printed and f"kv {kv}" in printed and "roofline: --roofline needs a CUDA" in printed


def test_bench_engine_quant_flags_need_random(tiny_checkpoints, tmp_path, capsys):
    bench_engine = load_bench_engine()
    for argv in (["--model", str(tiny_checkpoints["LlamaForCausalLM"]), "--quant", "int8_wo"],
                 ["--engine", str(tmp_path), "--kv-cache-dtype", "int8"],
                 ["--random", "tiny", "--quant", "int8_wo", "--group-size", "64"]):
        with pytest.raises(SystemExit) as exc:
            bench_engine.parse_args(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "apply to --random models only" in err and "--group-size only applies to --quant int4_awq" in err


def test_decode_bytes_and_roofline_math():
    bench_engine = load_bench_engine()
    bf16 = bench_engine.random_model_config("llama3-8b", "bfloat16")
    # by hand: per layer qkv (32 + 2 * 8) * 128 x 4096, dense 4096 x 4096, fc/gate/proj 3 x 14336 x 4096
    per_layer = 6144 * 4096 + 4096 * 4096 + 3 * 14336 * 4096
    params = 32 * per_layer + 32 * 2 * 4096 + 4096 + 128256 * 4096 + 4096  # + norms + lm_head + ONE embedding row
    assert bench_engine.decode_bytes_per_token(bf16, 2, 0) == 2 * params
    full_model = 2 * (params - 4096 + 128256 * 4096)  # the whole checkpoint: ~16.06e9 bytes
    assert 16.0e9 < full_model < 16.1e9
    assert 14.95e9 < bench_engine.decode_bytes_per_token(bf16, 2, 0) < 15.05e9  # minus (almost) the embedding
    kv_per_token = 32 * 2 * 8 * 128 * 2  # layers * K,V * kv heads * head size * bf16
    assert bench_engine.decode_bytes_per_token(bf16, 2, 100) - bench_engine.decode_bytes_per_token(bf16, 2, 0) == \
        pytest.approx(100 * kv_per_token)

    awq = bench_engine.random_model_config("llama3-8b", "bfloat16", "int4_awq", "int8")
    parts_bf16 = bench_engine.decode_bytes_breakdown(bf16, 2, 0)
    parts_awq = bench_engine.decode_bytes_breakdown(awq, 1, 0)
    assert parts_awq["lm_head"] == parts_bf16["lm_head"] == 2 * 128256 * 4096  # lm_head stays bf16
    ratio = parts_bf16["decoder_linears"] / parts_awq["decoder_linears"]
    assert 3.5 < ratio < 4.0  # 0.5 byte + fp32 scale per 128 weights + prequant scale vs 2 bytes
    int8 = bench_engine.random_model_config("llama3-8b", "bfloat16", "int8_wo")
    fp8 = bench_engine.random_model_config("llama3-8b", "bfloat16", "fp8", "fp8")
    for cfg in (int8, fp8):
        linears = bench_engine.decode_bytes_breakdown(cfg, 1, 0)["decoder_linears"]
        assert 1.99 < parts_bf16["decoder_linears"] / linears < 2.0
    assert bench_engine.kv_elem_bytes(awq) == 1 and bench_engine.kv_elem_bytes(bf16) == 2

    # mean decode context: prompt 10, 5 outputs -> steps attend to 11..14; prompt 4, 3 outputs -> 5, 6
    requests = [type("R", (), {"prompt_ids": [0] * 10, "output_len": 5})(),
                type("R", (), {"prompt_ids": [0] * 4, "output_len": 3})()]
    assert bench_engine.mean_decode_context(requests) == pytest.approx((11 + 12 + 13 + 14 + 5 + 6) / 6)
    flops = bench_engine.flops_per_token(bf16, 0)
    assert flops == 2 * (32 * per_layer + 128256 * 4096)
    hw = {"hbm": {"read_gb_s": 3000.0}, "gemm": {"tflop_s": 700.0}}
    points = [{"concurrency": 1, "decode_tok_s_per_request": 100.0, "output_tok_s": 90.0, "total_tok_s": 180.0},
              {"concurrency": 64, "decode_tok_s_per_request": 50.0, "output_tok_s": 3000.0, "total_tok_s": 6000.0}]
    roof = bench_engine.engine_roofline(hw, awq, requests, points)
    expected = 3000e9 / bench_engine.decode_bytes_per_token(awq, 1, roof["mean_decode_context"])
    assert roof["roofline_tok_s"] == pytest.approx(expected) and 550 < expected < 650
    assert points[0]["roofline_pct"] == pytest.approx(100.0 / expected * 100)
    assert "roofline_pct" not in points[1]
    assert points[1]["tensor_core_pct"] == pytest.approx(3000 * roof["flops_per_token"] / 700e12 * 100)
    assert points[1]["total_tensor_core_pct"] == pytest.approx(2 * points[1]["tensor_core_pct"])
    assert roof["notes"] and "tinygemm" in roof["notes"][0]
