"""Accuracy measurement: the engine's scoring path, perplexity/KL against a reference engine, and the build gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.checkpoint.convert import convert_checkpoint
from builder.checkpoint.reference import heldout_perplexity, heldout_text, load_reference, reference_model_dir
from builder.config import BuildSettings
from builder.errors import BuilderError, RequestError
from builder.accuracy import (AccuracyGateError, AccuracyReport, check_ppl_increase, compare_logits,
                                       evaluate, read_report, token_windows, tokenize, write_report)
from builder.runtime import LLMEngine, SamplingParams

EVAL_TOKENS = 512  # 2 windows of 256: well under a second per engine on an idle machine
LIMITS = dict(dtype="float32", max_batch_size=8, max_input_len=256, max_seq_len=256, max_num_tokens=512,
              tokens_per_block=16, kv_cache_memory_mb=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF float32 model, engine folder) of the built-in tiny Llama, with a small step budget (chunked scoring)."""
    from transformers import LlamaForCausalLM

    from builder.checkpoint.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    hf_dir = make_tiny_model(root / "hf")
    engine = root / "engine"
    convert_checkpoint(hf_dir, engine, BuildSettings(**{**LIMITS, "max_num_tokens": 24, "tokens_per_block": 4}))
    return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval(), engine


@pytest.fixture(scope="module")
def reference_engine(tmp_path_factory) -> Path:
    """The trained reference model converted to a float32 engine."""
    engine = tmp_path_factory.mktemp("reference") / "engine"
    convert_checkpoint(reference_model_dir(), engine, BuildSettings(**LIMITS))
    return engine


def test_score_matches_transformers_logits(tiny):
    model, engine_dir = tiny
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (1, 7, 40, 23)]
    with LLMEngine(engine_dir) as engine:
        scores = engine.score(prompts)  # 71 tokens at 24 per step: several prompts per step, 40 split in chunks
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert engine.generate([prompts[1]], SamplingParams(max_tokens=2))  # still serves afterwards
    for prompt, logits in zip(prompts, scores):
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([prompt])).logits[0]
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_score_rejects_bad_prompts(tiny):
    _, engine_dir = tiny
    with LLMEngine(engine_dir) as engine:
        with pytest.raises(RequestError, match="max_seq_len"):
            engine.score([[5] * 300])
        with pytest.raises(RequestError, match="vocabulary"):
            engine.score([[10**6]])
        engine.add_request("busy", [5, 6], SamplingParams(max_tokens=4))
        with pytest.raises(RequestError, match="idle"):
            engine.score([[5, 6]])


def test_reference_perplexity_equals_transformers(reference_engine, monkeypatch):
    from builder.accuracy import _LogitStore

    monkeypatch.setattr(_LogitStore, "RAM_LIMIT", 0)  # the reference logits go through the temp file
    report = evaluate(reference_engine, reference_engine, heldout_text(), max_tokens=EVAL_TOKENS,
                      tokenizer_dir=reference_model_dir(), text_source="held-out")
    model, tokenizer = load_reference()
    expected = heldout_perplexity(model, tokenizer, max_tokens=EVAL_TOKENS)
    assert report.reference_perplexity == pytest.approx(expected, rel=1e-5)
    assert report.perplexity == report.reference_perplexity
    assert report.tokens == EVAL_TOKENS and report.windows == EVAL_TOKENS // 256
    assert report.mean_kl == 0.0 and report.top1_agreement == 1.0 and report.ppl_increase_pct == 0.0


def test_perturbed_engine_has_positive_kl(reference_engine, tmp_path):
    perturbed = tmp_path / "perturbed"
    shutil.copytree(reference_engine, perturbed)
    weights = load_file(perturbed / "rank0.safetensors")
    gen = torch.Generator().manual_seed(0)
    name = "transformer.layers.0.mlp.proj.weight"
    weights[name] = weights[name] + 0.02 * torch.randn(weights[name].shape, generator=gen)
    save_file(weights, perturbed / "rank0.safetensors")
    report = evaluate(perturbed, reference_engine, heldout_text(), max_tokens=EVAL_TOKENS,
                      tokenizer_dir=reference_model_dir(), text_source="held-out")
    assert report.mean_kl > 1e-4
    assert report.top1_agreement < 1.0
    assert report.perplexity != report.reference_perplexity
    assert report.ppl_increase_pct == pytest.approx(100 * (report.perplexity / report.reference_perplexity - 1))


def test_compare_logits_matches_closed_form():
    ref = [torch.tensor([[0.0, 0.0], [1.0, 0.0]])]
    other = [torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    stats = compare_logits(other, ref, [[0, 0]])
    p = torch.tensor([1.0, 0.0]).softmax(0).double()
    kl_row2 = float((p * (p.log() - p.flip(0).log())).sum())
    assert stats["mean_kl"] == pytest.approx(kl_row2 / 2)
    assert stats["top1_agreement"] == 0.5  # row 1 ties (argmax 0 both), row 2 disagrees
    ref_nll = -(torch.tensor(0.5).double().log() + p[0].log()) / 2
    assert stats["reference_perplexity"] == pytest.approx(float(ref_nll.exp()))
    assert stats["perplexity"] == pytest.approx(float((-(torch.tensor(0.5).double().log() + p[1].log()) / 2).exp()))
    assert stats["tokens"] == 2


def test_token_windows():
    windows = token_windows(list(range(10)), seq_len=3)
    assert windows == [([0, 1, 2], [1, 2, 3]), ([3, 4, 5], [4, 5, 6]), ([6, 7, 8], [7, 8, 9])]
    assert token_windows(list(range(10)), seq_len=3, max_tokens=6) == windows[:2]
    with pytest.raises(BuilderError, match="fewer than one window"):
        token_windows([1, 2, 3], seq_len=3)


def test_tokenize_uses_the_model_tokenizer():
    _, tokenizer = load_reference()
    ids = tokenize("The --verbose option", reference_model_dir())
    assert ids == tokenizer("The --verbose option")["input_ids"] and ids[0] == tokenizer.bos_token_id


def make_report(increase: float) -> AccuracyReport:
    return AccuracyReport(perplexity=13.3 * (1 + increase / 100), reference_perplexity=13.3,
                          ppl_increase_pct=increase, mean_kl=0.01, top1_agreement=0.95, tokens=1024,
                          text_source="held-out", quantization={"quant_algo": "W4A16"})


def test_gate_passes_and_fails_with_one_line():
    check_ppl_increase(make_report(0.5), 1.0)
    check_ppl_increase(make_report(5.0), None)
    with pytest.raises(AccuracyGateError) as info:
        check_ppl_increase(make_report(1.5), 1.0)
    message = str(info.value)
    assert "\n" not in message and "--max-ppl-increase 1%" in message and "1.50%" in message
    assert isinstance(info.value, BuilderError)
    with pytest.raises(AccuracyGateError):
        check_ppl_increase(make_report(float("nan")), 1.0)


def test_report_round_trips(tmp_path):
    report = make_report(0.25)
    path = write_report(report, tmp_path)
    assert json.loads(path.read_text())["ppl_increase_pct"] == 0.25
    assert read_report(tmp_path) == report
    assert "+0.25%" in report.summary() and "W4A16" in report.summary() and "\n" not in report.summary()
    assert read_report(tmp_path / "missing") is None
    checkpoint = tmp_path / "repo" / "tensorrt_llm" / "1" / "checkpoint"  # --backend tensorrtllm keeps it here
    checkpoint.mkdir(parents=True)
    write_report(report, checkpoint)
    assert read_report(tmp_path / "repo") == report


# ---- the build: accuracy.json in the repository, --max-ppl-increase gate -----------------------------------------

def build_reference(output: Path, quant: str, **evaluation):
    from builder.build import BuildOptions, build
    from builder.config import QuantOptions
    from builder.accuracy import EvalOptions

    settings = BuildSettings(max_seq_len=256, max_input_len=256, max_num_tokens=512, kv_cache_memory_mb=4)
    return build(BuildOptions(output=output, model=str(reference_model_dir()), settings=settings,
                              quant=QuantOptions(quant=quant), evaluation=EvalOptions(max_tokens=512, **evaluation)))


def test_build_writes_the_report_into_the_repository(tmp_path):
    build_reference(tmp_path / "repo", "int8_wo", max_ppl_increase=5.0)
    report = read_report(tmp_path / "repo")
    assert (tmp_path / "repo" / "tensorrt_llm" / "1" / "engine" / "accuracy.json").is_file()
    assert report.quantization["quant_algo"] == "W8A16" and report.tokens == 512 and report.seq_len == 256
    assert abs(report.ppl_increase_pct) < 5.0 and 0.0 < report.mean_kl < 0.05
    assert report.reference_perplexity > 1.0 and "heldout.txt" in report.text_source


def test_gate_fails_the_build_with_one_line_and_no_output(tmp_path, capsys):
    from builder.cli import main

    output = tmp_path / "repo"
    code = main(["build", "--model", str(reference_model_dir()), "--output", str(output), "--quant", "int4_wo",
                 "--max-seq-len", "256", "--eval-tokens", "512", "--max-ppl-increase", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: perplexity increased")
    assert "more than --max-ppl-increase 0.5%" in err
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder left behind


def test_eval_options_are_checked_before_work(tmp_path):
    from builder.config import QuantConfig
    from builder.errors import ConfigError
    from builder.accuracy import EvalOptions, check_eval_options, wants_eval

    with pytest.raises(ConfigError, match="drop --eval off"):
        check_eval_options(EvalOptions(mode="off", max_ppl_increase=1.0))
    with pytest.raises(ConfigError, match=">= 0"):
        check_eval_options(EvalOptions(max_ppl_increase=-1.0))
    with pytest.raises(ConfigError, match="does not exist"):
        check_eval_options(EvalOptions(eval_data=tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_reference(tmp_path / "repo", "int8_wo", eval_data=tmp_path / "missing.txt")
    assert not (tmp_path / "repo").exists()
    assert not wants_eval(EvalOptions(), QuantConfig())
    assert wants_eval(EvalOptions(), QuantConfig(kv_cache_quant_algo="INT8"))
    assert wants_eval(EvalOptions(max_ppl_increase=1.0), QuantConfig())
    assert wants_eval(EvalOptions(mode="on"), QuantConfig()) and not wants_eval(EvalOptions(mode="off"),
                                                                             QuantConfig(quant_algo="FP8"))
