"""Quantized builds end to end: checkpoint tensors per quant mode / KV-cache dtype / TP rank (trtllm-checkpoint.md
section 3), streaming calibration against HF's own forward, TP=2 == TP=1 in the runtime, quantized outputs close to
the unquantized ones on the trained reference model, and bad options failing before any output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builder.build import BuildOptions, build
from builder.checkpoint.convert import convert_checkpoint
from builder.checkpoint.hf import HFCheckpoint
from builder.checkpoint.reference import heldout_text, reference_model_dir
from builder.models.parallel import merge_shards
from builder.checkpoint.tiny import make_tiny_model
from builder.checkpoint.trtllm import model_config_from_hf
from builder.config import BuildSettings, EngineConfig, QuantConfig, QuantOptions
from builder.errors import ConfigError
from builder.quantize import collect_activation_stats, weight_only_quantize
from builder.accuracy import EvalOptions
from builder.checkpoint.calibration import calibrate, calibration_tokens
from builder.runtime import LLMEngine, SamplingParams

LIMITS = dict(dtype="float32", max_batch_size=16, max_input_len=64, max_seq_len=128, max_num_tokens=256,
              tokens_per_block=8, kv_cache_memory_mb=2)
CALIB = dict(calib_size=4, calib_seq_len=64)  # small: calibration stays well under a second on the test models
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
ROW_PARALLEL = ("attention.dense", "mlp.proj")
F32, F16 = torch.float32, torch.float16
# (--quant, --kv-cache-dtype) cases
CASES = [("none", "auto"), ("int8_wo", "auto"), ("int4_wo", "auto"), ("int4_awq", "auto"), ("fp8", "auto"),
         ("none", "int8"), ("none", "fp8"), ("fp8", "fp8"), ("int4_awq", "int8")]
ALGO = {"none": None, "int8_wo": "W8A16", "int4_wo": "W4A16", "int4_awq": "W4A16_AWQ", "fp8": "FP8"}
KV_ALGO = {"auto": None, "int8": "INT8", "fp8": "FP8"}


def options(quant: str = "none", kv: str = "auto", **extra) -> QuantOptions:
    """QuantOptions with the small test calibration."""
    group = extra.pop("group_size", 128 if quant == "int4_awq" else None)
    return QuantOptions(quant=quant, kv_cache_dtype=kv, group_size=group, **{**CALIB, **extra})


@pytest.fixture(scope="module")
def ref_engines(tmp_path_factory) -> dict:
    """Engines of the trained reference model (hidden 256: group 128 fits at tp 1 and 2), built lazily."""
    root, made = tmp_path_factory.mktemp("ref"), {}

    def get(quant: str, kv: str, tp: int, dtype: str = "float32", **extra) -> Path:
        key = (quant, kv, tp, dtype, tuple(sorted((k, str(v)) for k, v in extra.items())))
        if key not in made:
            out = root / f"{quant}-{kv}-tp{tp}-{dtype}-{len(made)}"
            convert_checkpoint(reference_model_dir(), out, BuildSettings(**{**LIMITS, "dtype": dtype}), tp_size=tp,
                               quant=options(quant, kv, **extra))
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM")}


def rank_files(engine_dir: Path) -> list[dict[str, torch.Tensor]]:
    world = json.loads((engine_dir / "config.json").read_text())["mapping"]["world_size"]
    return [load_file(engine_dir / f"rank{r}.safetensors") for r in range(world)]


def expected_tensors(cfg, quant: str, kv: str, tp: int, group: int, excluded=()) -> dict:
    """name -> (dtype, per-rank shape), written out from trtllm-checkpoint.md section 3 (independently of the code)."""
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_size"]
    nq, nkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    mdt = {"float32": F32, "float16": F16, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    widths = {"attention.qkv": ((nq // tp + 2 * max(1, nkv // tp)) * d, h), "attention.dense": (h, nq * d // tp),
              "mlp.fc": (inter // tp, h), "mlp.gate": (inter // tp, h), "mlp.proj": (h, inter // tp)}
    out = {"transformer.vocab_embedding.weight": (mdt, (vocab, h)), "transformer.ln_f.weight": (mdt, (h,)),
           "lm_head.weight": (mdt, (-(-vocab // tp), h))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        out[p + "input_layernorm.weight"] = out[p + "post_layernorm.weight"] = (mdt, (h,))
        if cfg["attn_bias"]:
            out[p + "attention.qkv.bias"] = (mdt, (widths["attention.qkv"][0],))
        if kv != "auto":
            out[p + "attention.kv_cache_scaling_factor"] = (F32, (1,))
        for module, (o, n) in widths.items():
            m = p + module
            if quant == "int4_awq" and module not in excluded:
                out |= {m + ".weight": (torch.int8, (o // 2, n)), m + ".weights_scaling_factor": (F32, (o, n // group)),
                        m + ".prequant_scaling_factor": (mdt, (n,))}
            elif quant == "fp8" and module not in excluded:
                out |= {m + ".weight": (torch.float8_e4m3fn, (o, n)), m + ".weights_scaling_factor": (F32, (1,)),
                        m + ".activation_scaling_factor": (F32, (1,))}
            else:  # none, and W8A16/W4A16: the float weight (trtllm-build quantizes it)
                out[m + ".weight"] = (mdt, (o, n))
    return out


# ---- checkpoint layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant,kv", CASES)
@pytest.mark.parametrize("tp", [1, 2])
def test_reference_checkpoint_tensors_per_rank(ref_engines, quant, kv, tp):
    engine = ref_engines(quant, kv, tp)
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["quantization"] == {"quant_algo": ALGO[quant], "kv_cache_quant_algo": KV_ALGO[kv],
                                   "group_size": 128, "has_zero_point": False,
                                   "pre_quant_scale": quant == "int4_awq",
                                   "exclude_modules": None if quant == "none" else ["lm_head"]}
    want = expected_tensors(cfg, quant, kv, tp, 128)
    for rank, tensors in enumerate(rank_files(engine)):
        assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == want, f"rank {rank}"
        for name, t in tensors.items():
            if name.endswith("kv_cache_scaling_factor"):
                assert float(t) > 0 and (kv != "fp8" or float(t) >= 1.0)  # FP8 KV scale clamped to >= 1
            if name.endswith("scaling_factor") and t.is_floating_point():
                assert torch.isfinite(t.float()).all() and (t.float() > 0).all(), name


@pytest.mark.parametrize("quant,kv", [("int4_awq", "int8"), ("fp8", "fp8")])
def test_rank_tensors_are_the_split_of_tp1(ref_engines, quant, kv):
    """Quantizing each rank's shard with whole-layer statistics == splitting the tp=1 tensors by SPLIT_DIMS
    (AWQ row-parallel scales sliced, shared prequant of column linears, FP8 scales identical on every rank)."""
    full, ranks = rank_files(ref_engines(quant, kv, 1))[0], rank_files(ref_engines(quant, kv, 2))
    cfg = EngineConfig.load(ref_engines(quant, kv, 2)).model
    for name, tensor in full.items():
        shards = [r[name] for r in ranks]
        if tensor.dtype == torch.float8_e4m3fn:  # compare bytes (merge_shards uses torch.equal)
            tensor, shards = tensor.view(torch.uint8), [s.view(torch.uint8) for s in shards]
        assert torch.equal(merge_shards(name, shards, tuple(tensor.shape), cfg), tensor), name


def test_qwen2_bias_and_tiny_group64(tiny, tmp_path):
    """Qwen2 (qkv bias) takes every mode; the tiny models (hidden 64) need --group-size 64 for int4_awq at tp 1."""
    for quant, kv in (("int4_awq", "fp8"), ("fp8", "int8"), ("int4_wo", "auto")):
        out = tmp_path / quant
        group = 64 if quant == "int4_awq" else None
        convert_checkpoint(tiny["Qwen2ForCausalLM"], out, BuildSettings(**LIMITS),
                           quant=options(quant, kv, group_size=group))
        cfg = json.loads((out / "config.json").read_text())
        tensors = rank_files(out)[0]
        assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == expected_tensors(cfg, quant, kv, 1, 64)
        with LLMEngine(out) as engine:
            assert len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4))[0]) == 4


def test_exclude_modules(ref_engines):
    engine = ref_engines("fp8", "auto", 2, exclude_modules=["lm_head", "transformer.layers.*.mlp.proj"])
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["quantization"]["exclude_modules"] == ["lm_head", "transformer.layers.*.mlp.proj"]
    want = expected_tensors(cfg, "fp8", "auto", 2, 128, excluded=("mlp.proj",))
    assert {n: (t.dtype, tuple(t.shape)) for n, t in rank_files(engine)[1].items()} == want


# ---- streaming calibration ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_layerwise_calibration_matches_hf_hooks(tiny, arch):
    """The layer-by-layer dense forward sees the same linear inputs and K/V as the HF model (hook-based oracle)."""
    from transformers import AutoModelForCausalLM

    ckpt = HFCheckpoint(tiny[arch])
    cfg = model_config_from_hf(ckpt.config, "float32")
    cfg.quantization = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="INT8", exclude_modules=["lm_head"])
    tokens = calibration_tokens(tiny[arch], None, 3, 32)
    assert tokens.shape == (3, 32)
    ours = calibrate(ckpt, cfg, tokens)
    model = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32).eval()
    names = {"attention.qkv": "self_attn.q_proj", "attention.dense": "self_attn.o_proj", "mlp.fc": "mlp.gate_proj",
             "mlp.proj": "mlp.down_proj"}
    for i, layer in enumerate(ours.layers):
        p = f"model.layers.{i}."
        hf = collect_activation_stats(model, list(tokens[:, None, :]), [p + n for n in names.values()],
                                      output_names=[p + "self_attn.k_proj", p + "self_attn.v_proj"],
                                      head_size=cfg.head_size)
        for module, name in names.items():
            assert layer.input_amax[module] == pytest.approx(hf[p + name].input_amax, rel=1e-4), (i, module)
        assert layer.k_amax == pytest.approx(hf[p + "self_attn.k_proj"].output_rope_amax, rel=1e-4)
        assert layer.v_amax == pytest.approx(hf[p + "self_attn.v_proj"].output_amax, rel=1e-4)
        q, k, v = (ckpt.get(f"{p}self_attn.{x}_proj.weight") for x in "qkv")
        assert layer.weight_amax["attention.qkv"] == float(torch.cat([q, k, v]).abs().max())
        assert layer.get("weight_amax", "mlp.gate") == layer.weight_amax["mlp.fc"]  # fc and gate share


def test_calibration_reads_one_layer_at_a_time(tiny, monkeypatch):
    """Streaming: calibration never reads lm_head/ln_f, reads the embedding only in row slices, and finishes reading
    layer i before it reads layer i+1."""
    ckpt = HFCheckpoint(tiny["LlamaForCausalLM"])
    cfg = model_config_from_hf(ckpt.config, "float32")
    cfg.quantization = QuantConfig(quant_algo="W4A16_AWQ", group_size=64, pre_quant_scale=True,
                                   exclude_modules=["lm_head"])
    reads = []
    original_get, original_part = ckpt.get, ckpt.get_part
    monkeypatch.setattr(ckpt, "get", lambda name: reads.append(name) or original_get(name))
    monkeypatch.setattr(ckpt, "get_part", lambda name, *a: reads.append(("part", name)) or original_part(name, *a))
    result = calibrate(ckpt, cfg, calibration_tokens(tiny["LlamaForCausalLM"], None, 2, 32))
    layers = [int(n.split(".")[2]) for n in reads if isinstance(n, str)]
    assert layers == sorted(layers) and set(layers) == {0, 1}
    assert all(not isinstance(n, str) for n in reads if "embed" in str(n))
    assert not any("lm_head" in str(n) or "model.norm" in str(n) for n in reads)
    assert set(result.layers[0].awq_scales) == {"attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"}
    assert result.layers[0].awq_scales["mlp.gate"] is result.layers[0].awq_scales["mlp.fc"]  # one input, one search


# ---- runtime: TP parity and accuracy --------------------------------------------------------------------------

def _prompts(tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["The server streams tokens", "Tensor parallelism splits", "A paged KV cache holds keys and values " * 3]
    return [tok(t).input_ids for t in texts]


@pytest.mark.parametrize("quant,kv", CASES[1:])
def test_tp2_equals_tp1(ref_engines, quant, kv):
    """Greedy outputs of the quantized engine at TP=2 equal TP=1 (fp32 activations), every mode, no layer excluded."""
    params = SamplingParams(max_tokens=12)
    prompts = _prompts(reference_model_dir())
    outs = []
    for tp in (1, 2):
        with LLMEngine(ref_engines(quant, kv, tp)) as engine:
            outs.append(engine.generate(prompts, params))
    assert outs[0] == outs[1]
    assert all(len(o) == 12 for o in outs[0])


def test_weight_only_row_parallel_shards_use_whole_row_scales(ref_engines):
    """W8A16/W4A16 quantized at load: a row-parallel shard given the whole rows' amax (what the engine all-reduces
    under TP) gives exactly its slice of the unsplit layer's quantized weight; its own amax would not."""
    full = rank_files(ref_engines("none", "auto", 1))[0]["transformer.layers.0.mlp.proj.weight"]
    q_full, scale_full = weight_only_quantize(full, 4, torch.float32)
    whole = (q_full.float() * scale_full[:, None]).chunk(2, dim=1)
    row_amax = full.float().abs().amax(dim=1)
    for rank, part in enumerate(full.chunk(2, dim=1)):
        q, scale = weight_only_quantize(part, 4, torch.float32, row_amax)
        assert torch.equal(q.float() * scale[:, None], whole[rank])
    q, scale = weight_only_quantize(full.chunk(2, dim=1)[1], 4, torch.float32)
    assert not torch.equal(q.float() * scale[:, None], whole[1])


def teacher_forced_logits(engine_dir: Path, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), V] of one sequence through the engine's model (TP=1), by one prefill."""
    from builder.runtime.model_runner import ModelRunner
    from plugins import AttentionMetadata

    config = EngineConfig.load(engine_dir)
    tpb = config.build.tokens_per_block
    blocks = -(-len(ids) // tpb)
    runner = ModelRunner(engine_dir, config, torch.device("cpu"), num_blocks=blocks)
    n = len(ids)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                             query_start=torch.tensor([0, n], dtype=torch.int32),
                             context_lens=torch.tensor([n], dtype=torch.int32), query_lens_host=[n],
                             context_lens_host=[n])
    with torch.inference_mode():
        hidden = runner.model.forward(torch.tensor(ids), torch.arange(n), runner.kv_cache, meta)
        return runner.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def heldout_ids() -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    return tok(heldout_text()[:4000]).input_ids[:128]


# measured (128 held-out tokens, small calibration): int8_wo 0.98, fp8 0.94, int4_awq 0.72, int4_wo 0.74,
# kv int8 0.95, kv fp8 0.92 top-1 agreement; |loss change| <= 0.12 nats
@pytest.mark.parametrize("quant,kv,min_agree", [("int8_wo", "auto", 0.95), ("fp8", "auto", 0.88),
                                                ("int4_awq", "auto", 0.6), ("int4_wo", "auto", 0.6),
                                                ("none", "int8", 0.9), ("none", "fp8", 0.88)])
def test_quantized_close_to_unquantized(ref_engines, heldout_ids, quant, kv, min_agree):
    """On held-out text the quantized engine's teacher-forced top-1 mostly agrees with the unquantized engine's,
    its logits are not identical (it really is quantized), and its next-token loss stays close."""
    assert_close_to_unquantized(ref_engines("none", "auto", 1), ref_engines(quant, kv, 1), heldout_ids, min_agree)


def assert_close_to_unquantized(base_engine: Path, engine: Path, ids: list[int], min_agree: float) -> None:
    """Teacher-forced on ids: top-1 agreement with the unquantized engine >= min_agree, logits not identical (it
    really is quantized), next-token loss at most 0.25 nats above."""
    base, got = teacher_forced_logits(base_engine, ids), teacher_forced_logits(engine, ids)
    agree = float((base.argmax(-1) == got.argmax(-1)).float().mean())
    target = torch.tensor(ids[1:])
    loss_base = float(torch.nn.functional.cross_entropy(base[:-1], target))
    loss_got = float(torch.nn.functional.cross_entropy(got[:-1], target))
    assert not torch.equal(base, got)
    assert agree >= min_agree, agree
    assert loss_got - loss_base < 0.25, (loss_base, loss_got)


def test_fp16_engine_runs_every_mode(ref_engines):
    """A float16 engine (weights, prequant scales, activations in fp16) runs each quantized mode."""
    prompts = _prompts(reference_model_dir())[:1]
    for quant, kv in (("int4_awq", "fp8"), ("fp8", "int8"), ("int8_wo", "auto")):
        with LLMEngine(ref_engines(quant, kv, 1, dtype="float16")) as engine:
            assert len(engine.generate(prompts, SamplingParams(max_tokens=6))[0]) == 6


# ---- bad input: ConfigError before any output ------------------------------------------------------------------

def _build(tmp_path: Path, model, tp: int = 1, **quant) -> Path:
    output = tmp_path / "repo"
    build(BuildOptions(output=output, model=str(model), tp_size=tp, settings=BuildSettings(**LIMITS),
                       quant=QuantOptions(**{**CALIB, **quant}), evaluation=EvalOptions(mode="off")))
    return output


@pytest.mark.parametrize("quant,tp,match", [
    (dict(quant="int4_awq", group_size=32), 1, "group size 32 is not supported; use 64 or 128"),
    (dict(quant="int8_wo", group_size=64), 1, "only applies to int4_awq"),
    (dict(quant="int4_awq"), 1, r"input features per rank \(64\) are not a multiple of the group size 128; "
                                r"use --group-size 64"),
    (dict(quant="int4_awq", group_size=64), 2, r"attention.dense: input features per rank \(64/2 = 32\).*use --tp 1"),
    (dict(quant="fp8", calib_data=Path("/nonexistent/calib.txt")), 1, "does not exist"),
    (dict(quant="int8_wo", calib_data=Path("/nonexistent/calib.txt")), 1, "does not exist"),
    (dict(quant="fp8", exclude_modules=[]), 1, "quantizing lm_head is not supported"),
    (dict(quant="fp4"), 1, "--quant 'fp4' is not supported"),
    (dict(kv_cache_dtype="int4"), 1, "--kv-cache-dtype 'int4' is not supported"),
    (dict(quant="fp8", calib_size=0), 1, "--calib-size"),
])
def test_bad_options_leave_no_output(tiny, tmp_path, quant, tp, match):
    with pytest.raises(ConfigError, match=match):
        _build(tmp_path, tiny["LlamaForCausalLM"], tp, **quant)
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging leftovers


def test_empty_calibration_file(tiny, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n \n")
    with pytest.raises(ConfigError, match="empty"):
        _build(tmp_path, tiny["LlamaForCausalLM"], quant="none", kv_cache_dtype="int8", calib_data=calib)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_build_with_calib_file_and_cli(tiny, tmp_path):
    """builder build --quant fp8 --kv-cache-dtype int8 --calib-data FILE through the CLI, then generate."""
    from builder.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text about caches, tensors and servers. " * 40)
    out = tmp_path / "repo"
    assert main(["build", "--model", str(tiny["LlamaForCausalLM"]), "--output", str(out), "--dtype", "float32",
                 "--max-seq-len", "128", "--kv-cache-memory-mb", "2", "--quant", "fp8", "--kv-cache-dtype", "int8",
                 "--calib-data", str(calib), "--calib-size", "2", "--calib-seq-len", "32", "--eval", "off"]) == 0
    engine = out / "tensorrt_llm" / "1" / "engine"
    cfg = json.loads((engine / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8" and cfg["quantization"]["kv_cache_quant_algo"] == "INT8"
    with LLMEngine(engine) as eng:
        assert len(eng.generate([[5, 6, 7]], SamplingParams(max_tokens=5))[0]) == 5
    assert main(["build", "--model", str(tiny["LlamaForCausalLM"]), "--output", str(tmp_path / "bad"),
                 "--quant", "int4_awq"]) == 2
    assert not (tmp_path / "bad").exists()


def test_kv_cache_pool_holds_more_blocks_when_quantized(ref_engines):
    """An 8-bit KV cache takes a quarter of the fp32 bytes per block, so the same memory holds 4x the blocks."""
    with LLMEngine(ref_engines("none", "auto", 1)) as plain, LLMEngine(ref_engines("none", "int8", 1)) as q8:
        assert q8.stats.kv_blocks_total >= 4 * plain.stats.kv_blocks_total
