"""`builder build --backend tensorrtllm | trtllm-pytorch`: the rendered files of both TensorRT-LLM targets.

For tp 1 and 2 and every quantization mode: every config.pbtxt parses as Triton's ModelConfig, the C++ backend's
parameters are keys it reads with values it parses, the checkpoint configs are PretrainedConfig / ModelOpt-unified,
the build script holds the right trtllm-build flags and the launch script the right (mpirun) line. The scripts are
run with stand-ins for trtllm-build / tritonserver / mpirun, and the repositories' Triton side is served by the real
tritonserver with python stand-ins for the two engine models (TensorRT-LLM itself cannot run on this machine).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from builder.build import BuildOptions, build
from builder.config import BuildSettings, QuantOptions
from builder.errors import ConfigError
from builder.repo.trtllm_validate import (CPP_PARAMETER_KEYS, MAPPING_KEYS, PRETRAINED_KEYS, QUANT_KEYS,
                                          check_cpp_parameter)
from builder.repo.validate import find_problems, parse_config, validate_repository

SETTINGS = dict(dtype="bfloat16", max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=256,
                kv_cache_memory_mb=4, tokens_per_block=16, kv_cache_free_gpu_mem_fraction=0.85)
CALIB = dict(calib_size=2, calib_seq_len=32)
MODES = ("none", "int8_wo", "int4_wo", "int4_awq", "fp8")
ALGOS = {"none": None, "int8_wo": "W8A16", "int4_wo": "W4A16", "int4_awq": "W4A16_AWQ", "fp8": "FP8"}
HF_ALGOS = {"none": None, "int8_wo": "W8A16", "int4_wo": "W4A16_AWQ", "int4_awq": "W4A16_AWQ", "fp8": "FP8"}
# (mode, kv cache dtype) per target: every weight mode, plus the KV-cache modes each target supports.
CPP_CASES = [(m, "auto") for m in MODES] + [("fp8", "fp8"), ("int8_wo", "int8")]
PT_CASES = [(m, "auto") for m in MODES] + [("fp8", "fp8"), ("none", "fp8")]
# TensorRT-LLM's ensemble outputs beyond text_output: wired only when the engine model has them (the C++ backend)
UPSTREAM_OUTPUTS = {"cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index",
                    "sequence_index", "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks",
                    "kv_cache_alloc_total_blocks", "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns",
                    "last_token_time_ns", "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens"}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def reference_dir() -> Path:
    """The trained reference Llama (hidden 256, 3 layers, intermediate 512): int4 groups of 128 fit it at tp 2."""
    from builder.checkpoint.reference import reference_model_dir

    return reference_model_dir()


@pytest.fixture(scope="module")
def built(tmp_path_factory, reference_dir):
    """build(...) once per (backend, tp, mode, kv) asked for; returns the output folder."""
    root = tmp_path_factory.mktemp("targets")
    cache: dict[tuple, Path] = {}

    def get(backend: str, tp: int, mode: str = "none", kv: str = "auto") -> Path:
        key = (backend, tp, mode, kv)
        if key not in cache:
            out = root / f"{backend}-tp{tp}-{mode}-{kv}"
            build(BuildOptions(output=out, model=str(reference_dir), settings=BuildSettings(**SETTINGS), tp_size=tp,
                               quant=QuantOptions(quant=mode, kv_cache_dtype=kv, **CALIB), backend=backend))
            cache[key] = out
        return cache[key]
    return get


def _params(config) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _command(script: Path, program: str) -> list[str]:
    """The words of the line of a bash script that runs `program` (continuation lines joined)."""
    text = script.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.strip().startswith((program, f"exec {program}")))
    return shlex.split(line.strip().removeprefix("exec "))


def _flags(words: list[str]) -> dict[str, str]:
    """--flag value pairs of a command line."""
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and "=" not in w}


# ---------------------------------------------------------------------------------------------- tensorrtllm target

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode,kv", CPP_CASES)
def test_tensorrtllm_target(built, tp, mode, kv):
    """Configs parse; tensorrt_llm is the C++ backend with allow-listed, filled parameters; checkpoint, scripts fit."""
    out = built("tensorrtllm", tp, mode, kv)
    assert find_problems(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.sh", "ensemble", "launch_triton.sh",
                                                      "postprocessing", "preprocessing", "tensorrt_llm"]
    configs = {p.parent.name: parse_config(p) for p in out.glob("*/config.pbtxt")}
    engine = configs["tensorrt_llm"]
    assert engine.backend == "tensorrtllm" and engine.model_transaction_policy.decoupled
    assert engine.max_batch_size == SETTINGS["max_batch_size"]
    assert [(g.kind, g.count) for g in engine.instance_group] == [(engine.instance_group[0].KIND_CPU, 1)]
    params = _params(engine)
    assert set(params) <= CPP_PARAMETER_KEYS
    assert all(check_cpp_parameter(k, v) is None for k, v in params.items()), params
    assert not any("${" in v or v == "" for v in params.values())
    paged = kv != "int8"  # INT8 KV turns paged context FMHA off, and with it chunked context and KV reuse
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == str(out / "tensorrt_llm" / "1" / "engine")
    assert params["enable_chunked_context"] == params["enable_kv_cache_reuse"] == ("true" if paged else "false")
    assert params["kv_cache_free_gpu_mem_fraction"] == "0.85" and params["exclude_input_in_output"] == "false"
    # the C++ backend has no detok_context_ids / is_final: the ensemble wires postprocessing without them
    outputs = {t.name for t in engine.output}
    assert {"output_ids", "sequence_length"} <= outputs and not {"detok_context_ids", "is_final"} & outputs
    steps = {s.model_name: s for s in configs["ensemble"].ensemble_scheduling.step}
    assert set(steps["tensorrt_llm"].output_map) == {"output_ids", "sequence_length"} | UPSTREAM_OUTPUTS
    assert set(steps["postprocessing"].input_map) == {"TOKENS_BATCH", "SEQUENCE_LENGTH"}
    # ... and the ensemble passes the C++ backend's log probs, logits, indices and metrics on, as upstream's does
    ensemble_outputs = {t.name: t.data_type for t in configs["ensemble"].output}
    assert set(ensemble_outputs) == {"text_output", "num_output_tokens"} | UPSTREAM_OUTPUTS
    assert all(ensemble_outputs[t.name] == t.data_type for t in engine.output if t.name in UPSTREAM_OUTPUTS)
    assert {"decoder_input_ids", "decoder_input_lengths"} <= {t.name for t in engine.input}

    checkpoint = out / "tensorrt_llm" / "1" / "checkpoint"
    data = json.loads((checkpoint / "config.json").read_text())
    assert set(data) <= PRETRAINED_KEYS and set(data["mapping"]) <= MAPPING_KEYS
    assert set(data["quantization"]) <= QUANT_KEYS
    assert data["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert data["quantization"]["quant_algo"] == ALGOS[mode]
    assert data["quantization"]["kv_cache_quant_algo"] == {"auto": None, "int8": "INT8", "fp8": "FP8"}[kv]
    assert sorted(p.name for p in checkpoint.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]

    words = _command(out / "build_engine.sh", "trtllm-build")
    flags = _flags(words)
    assert flags == {
        "--checkpoint_dir": "$CHECKPOINT_DIR", "--output_dir": "$PARTIAL_DIR", "--gpt_attention_plugin": "auto",
        "--gemm_plugin": "auto", "--kv_cache_type": "paged", "--remove_input_padding": "enable",
        "--context_fmha": "enable", "--use_paged_context_fmha": "enable" if paged else "disable",
        "--tokens_per_block": "16", "--max_batch_size": "8", "--max_input_len": "64", "--max_seq_len": "128",
        "--max_num_tokens": "256", "--max_beam_width": "1", **({"--workers": "2"} if tp == 2 else {})}
    launch = _command(out / "launch_triton.sh", "mpirun" if tp > 1 else "tritonserver")
    if tp == 1:
        assert launch[0] == "tritonserver" and "--disable-auto-complete-config" in launch
    else:
        assert launch[:2] == ["mpirun", "--allow-run-as-root"]
        ranks = " ".join(launch[2:]).split(" : ")
        assert len(ranks) == 2 and all(r.startswith("-n 1 tritonserver --model-repository=$REPO "
                                                   "--disable-auto-complete-config") for r in ranks)
        assert "shm-region-prefix-name=prefix0_" in ranks[0] and "shm-region-prefix-name=prefix1_" in ranks[1]
        assert "--grpc-port=$GRPC_PORT" in ranks[0] and "--load-model" not in ranks[0]
        assert "--model-control-mode=explicit --load-model=tensorrt_llm" in ranks[1]
        assert "--allow-grpc=false" in ranks[1] and "--grpc-port" not in ranks[1]
    for script in ("build_engine.sh", "launch_triton.sh"):
        assert os.access(out / script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0
    assert "1.2." in (out / "build_engine.sh").read_text()  # the version pin travels with the script


def test_tensorrtllm_shares_the_portable_models(built, reference_dir, tmp_path):
    """preprocessing and postprocessing are byte for byte the portable ones; the ensemble differs only in the two
    mappings of builder-only tensors and in the C++ backend's extra outputs (declared and mapped)."""
    portable = tmp_path / "portable"
    build(BuildOptions(output=portable, model=str(reference_dir), settings=BuildSettings(**SETTINGS)))
    cpp = built("tensorrtllm", 1)
    for model in ("preprocessing", "postprocessing"):
        for path in (portable / model).rglob("*"):
            if path.is_file():
                assert path.read_bytes() == (cpp / model / path.relative_to(portable / model)).read_bytes(), path
    old = [line.rstrip(",") for line in (portable / "ensemble" / "config.pbtxt").read_text().splitlines()]
    new = [line.rstrip(",") for line in (cpp / "ensemble" / "config.pbtxt").read_text().splitlines()]
    assert [line for line in old if line not in new] == [
        '      output_map { key: "detok_context_ids" value: "_DETOK_CONTEXT_IDS" }',
        '      output_map { key: "is_final" value: "_IS_FINAL" }',
        '      input_map { key: "DETOK_CONTEXT_IDS" value: "_DETOK_CONTEXT_IDS" }',
        '      input_map { key: "IS_FINAL" value: "_IS_FINAL" }']
    added = [line for line in new if line not in old]  # the C++ backend's extra outputs, declared and wired
    assert len(added) == 2 * len(UPSTREAM_OUTPUTS)
    assert {line.split('"')[1] for line in added} == UPSTREAM_OUTPUTS


def test_decoupled_mode_false_in_both_targets(reference_dir, tmp_path):
    """--decoupled-mode false: the C++ tensorrt_llm model and the llmapi model (config.pbtxt and model.yaml's
    triton_config) are not decoupled, so the ensemble is unary; both repositories validate."""
    from builder.repo.render import ServingOptions

    for backend in ("tensorrtllm", "trtllm-pytorch"):
        out = tmp_path / backend
        build(BuildOptions(output=out, model=str(reference_dir), settings=BuildSettings(**SETTINGS), backend=backend,
                           serving=ServingOptions(decoupled_mode=False)))
        assert find_problems(out) == []
        assert not parse_config(out / "tensorrt_llm" / "config.pbtxt").model_transaction_policy.decoupled
    model_yaml = yaml.safe_load((tmp_path / "trtllm-pytorch" / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert model_yaml["triton_config"]["decoupled"] is False


def test_validation_catches_bad_cpp_parameters(built, tmp_path):
    """An unknown key, an unfilled value, a bad boolean or enum, a relative engine path, bad checkpoint keys."""
    repo = Path(shutil.copytree(built("tensorrtllm", 1), tmp_path / "repo"))
    path = repo / "tensorrt_llm" / "config.pbtxt"
    text = path.read_text()
    engine_path = _params(parse_config(path))["gpt_model_path"]  # the original build's location (still absolute)
    text = text.replace('key: "max_beam_width"', 'key: "max_beams"')
    text = text.replace('string_value: "inflight_fused_batching"', 'string_value: "${batching_strategy}"')
    text = text.replace('"enable_kv_cache_reuse" value: { string_value: "true"', '"enable_kv_cache_reuse" value: '
                        '{ string_value: "yes"')
    text = text.replace('string_value: "max_utilization"', 'string_value: "max_util"')
    text = text.replace(engine_path, "tensorrt_llm/1/engine")
    path.write_text(text)
    config = repo / "tensorrt_llm" / "1" / "checkpoint" / "config.json"
    data = json.loads(config.read_text())
    data["max_batch_size"] = 8
    data["quantization"]["quant_algo"] = "INT3"
    config.write_text(json.dumps(data))
    problems = " | ".join(find_problems(repo))
    for needle in ("'max_beams' is not a parameter the tensorrtllm backend reads", "'gpt_model_type' is not filled",
                   "'enable_kv_cache_reuse' = 'yes' is not a boolean", "'batch_scheduler_policy' = 'max_util'",
                   "gpt_model_path 'tensorrt_llm/1/engine' must be the absolute path",
                   "config.json key 'max_batch_size' is not a TensorRT-LLM PretrainedConfig field",
                   "quant_algo 'INT3' is not a TensorRT-LLM QuantAlgo", "still holds an unfilled"):
        assert needle in problems, needle


def test_validation_catches_checkpoint_tensor_mismatch(built, tmp_path):
    """A rank file whose tensors do not match config.json (here: FP8 config over float weights) is reported."""
    repo = Path(shutil.copytree(built("tensorrtllm", 2), tmp_path / "repo"))
    config = repo / "tensorrt_llm" / "1" / "checkpoint" / "config.json"
    data = json.loads(config.read_text())
    data["quantization"]["quant_algo"] = "FP8"
    data["quantization"]["exclude_modules"] = ["lm_head"]
    config.write_text(json.dumps(data))
    problems = " | ".join(find_problems(repo))
    assert "rank0.safetensors does not match config.json" in problems
    assert "rank1.safetensors does not match config.json" in problems


# ------------------------------------------------------------------------------------------- trtllm-pytorch target

def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {n: (f.get_slice(n).get_dtype(), list(f.get_slice(n).get_shape())) for n in f.keys()}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("mode,kv", PT_CASES)
def test_trtllm_pytorch_target(built, tp, mode, kv):
    """llmapi config + model.yaml agree; the HF checkpoint's tensors and hf_quant_config.json follow ModelOpt."""
    out = built("trtllm-pytorch", tp, mode, kv)
    assert find_problems(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["launch_triton.sh", "tensorrt_llm"]
    config = parse_config(out / "tensorrt_llm" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0 and config.model_transaction_policy.decoupled
    inputs = {t.name: (t.data_type, list(t.dims), t.optional) for t in config.input}
    from tritonclient.grpc import model_config_pb2 as pb

    assert inputs["text_input"] == (pb.TYPE_STRING, [-1], False)
    assert inputs["streaming"] == (pb.TYPE_BOOL, [1], True)
    assert inputs["sampling_param_max_tokens"] == (pb.TYPE_INT32, [1], True)
    assert [t.name for t in config.output][0] == "text_output"
    model_yaml = yaml.safe_load((out / "tensorrt_llm" / "1" / "model.yaml").read_text())
    checkpoint = out / "tensorrt_llm" / "1" / "checkpoint"
    assert model_yaml["model"] == str(checkpoint) and model_yaml["backend"] == "pytorch"
    assert model_yaml["tensor_parallel_size"] == tp and model_yaml["pipeline_parallel_size"] == 1
    assert model_yaml["triton_config"] == {"max_batch_size": 0, "decoupled": True, "cancellation_check_period_ms": 100}
    assert (model_yaml["max_batch_size"], model_yaml["max_num_tokens"], model_yaml["max_seq_len"]) == (8, 256, 128)
    assert model_yaml["kv_cache_config"]["free_gpu_memory_fraction"] == 0.85

    hf_config = json.loads((checkpoint / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["dtype"] == "bfloat16"
    assert (checkpoint / "tokenizer.json").is_file()
    tensors = _header(checkpoint / "model.safetensors")
    algo = HF_ALGOS[mode]
    kv_algo = "FP8" if kv == "fp8" else None
    if algo is None and kv_algo is None:
        assert not (checkpoint / "hf_quant_config.json").exists() and "quantization_config" not in hf_config
    else:
        quant = json.loads((checkpoint / "hf_quant_config.json").read_text())
        expected = {"quant_algo": algo, "kv_cache_quant_algo": kv_algo,
                    "exclude_modules": ["lm_head", "model.embed_tokens"]}
        if algo == "W4A16_AWQ":
            expected.update(group_size=128, has_zero_point=False, pre_quant_scale=True)
        assert quant["quantization"] == expected and quant["producer"]["name"] == "builder"
        assert hf_config["quantization_config"]["quant_method"] == "modelopt"
        assert hf_config["quantization_config"]["quant_algo"] == algo
    p = "model.layers.1."
    q, o, down = (tensors.get(p + n + ".weight") for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))
    if algo is None:
        assert q == ("BF16", [256, 256]) and not any(n.endswith("weight_scale") for n in tensors)
    elif algo == "W8A16":
        assert q == ("I8", [256, 256]) and tensors[p + "self_attn.q_proj.weight_scale"] == ("F32", [256])
    elif algo == "W4A16_AWQ":
        assert q == ("U8", [128, 256]) and down == ("U8", [128, 512])
        assert tensors[p + "mlp.down_proj.weight_scale"] == ("F32", [256, 4])
        with_pqs = {n.removesuffix(".pre_quant_scale").split(".", 3)[-1] for n in tensors if "pre_quant_scale" in n}
        # AWQ: o_proj/down_proj keep their pre-quant scale, q/k/v and gate/up have theirs folded into the norms;
        # int4_wo (ModelOpt's INT4 blockwise weight-only export) has none at all
        assert with_pqs == ({"self_attn.o_proj", "mlp.down_proj"} if mode == "int4_awq" else set())
    else:
        assert q == ("F8_E4M3", [256, 256]) and tensors[p + "self_attn.q_proj.weight_scale"] == ("F32", [])
        assert tensors[p + "self_attn.q_proj.input_scale"] == ("F32", [])
    assert tensors["lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"][0] == "BF16"
    assert (p + "self_attn.k_proj.k_scale" in tensors) == (kv == "fp8")
    assert (p + "self_attn.v_proj.v_scale" in tensors) == (kv == "fp8")
    assert o is not None


def _dequantized(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The float32 weights an HF export stands for (reference math of each ModelOpt-unified layout)."""
    from safetensors.torch import load_file

    from plugins.formats import unpack_int4

    raw = load_file(checkpoint / "model.safetensors")
    out = {}
    for name, tensor in raw.items():
        if name.endswith((".weight_scale", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale")):
            continue
        module = name.removesuffix(".weight")
        scale = raw.get(module + ".weight_scale")
        if scale is None:
            out[name] = tensor.float()
        elif tensor.dtype == torch.int8:
            out[name] = tensor.float() * scale.float()[:, None]
        elif tensor.dtype == torch.uint8:
            w = unpack_int4(tensor.view(torch.int8)).float()
            w = w * scale.float().repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
            pqs = raw.get(module + ".pre_quant_scale")
            out[name] = w if pqs is None else w * pqs.float()[None, :]
        else:
            out[name] = tensor.float() * scale.float()
    return out


@pytest.mark.parametrize("mode,limit", [("int8_wo", 0.02), ("fp8", 0.08), ("int4_wo", 0.25), ("int4_awq", 0.25)])
def test_hf_export_dequantizes_to_the_model(built, reference_dir, mode, limit):
    """Dequantizing the export (norms with folded AWQ scales included) gives logits close to the original model's."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    weights = _dequantized(built("trtllm-pytorch", 1, mode) / "tensorrt_llm" / "1" / "checkpoint")
    missing, unexpected = quantized.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied embeddings
    ids = torch.arange(3, 67)[None, :]
    with torch.no_grad():
        want, got = original(ids).logits, quantized(ids).logits
    error = float((got - want).norm() / want.norm())
    assert error < limit, error


@pytest.mark.parametrize("mode", ["int4_awq", "fp8"])
def test_both_targets_hold_the_same_quantized_weights(built, mode):
    """The HF export and the TensorRT-LLM checkpoint quantize alike (same calibration): q_proj's bytes are the q rows
    of attention.qkv, the scales match, and AWQ's pre-quant scale sits in the HF RMSNorm weight instead."""
    from safetensors.torch import load_file

    hf = load_file(built("trtllm-pytorch", 1, mode) / "tensorrt_llm" / "1" / "checkpoint" / "model.safetensors")
    trt = load_file(built("tensorrtllm", 1, mode) / "tensorrt_llm" / "1" / "checkpoint" / "rank0.safetensors")
    h, t = "model.layers.2.", "transformer.layers.2."
    q_rows = 256 // 2 if mode == "int4_awq" else 256  # int4 packs two output rows per byte
    q = trt[t + "attention.qkv.weight"][:q_rows]
    assert torch.equal(hf[h + "self_attn.q_proj.weight"].view(torch.int8), q.view(torch.int8))
    assert torch.equal(hf[h + "self_attn.o_proj.weight"].view(torch.int8),
                       trt[t + "attention.dense.weight"].view(torch.int8))
    if mode == "int4_awq":
        assert torch.equal(hf[h + "self_attn.q_proj.weight_scale"],
                           trt[t + "attention.qkv.weights_scaling_factor"][:256])
        assert torch.equal(hf[h + "mlp.down_proj.pre_quant_scale"], trt[t + "mlp.proj.prequant_scaling_factor"])
        norm = load_file(Path(__file__).parents[1] / "builder/checkpoint/data/reference/model.safetensors")
        folded = (norm[h + "input_layernorm.weight"].float() * trt[t + "attention.qkv.prequant_scaling_factor"].float())
        assert torch.equal(hf[h + "input_layernorm.weight"], folded.to(torch.bfloat16))
    else:
        assert float(hf[h + "self_attn.q_proj.weight_scale"]) == float(trt[t + "attention.qkv.weights_scaling_factor"])
        assert float(hf[h + "mlp.up_proj.input_scale"]) == float(trt[t + "mlp.gate.activation_scaling_factor"])


def test_pytorch_target_refuses_int8_kv(reference_dir, tmp_path):
    """TensorRT-LLM's PyTorch backend has no INT8 KV cache: refused before any work."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no INT8 KV cache"):
        build(BuildOptions(output=out, model=str(reference_dir), settings=BuildSettings(**SETTINGS),
                           quant=QuantOptions(kv_cache_dtype="int8"), backend="trtllm-pytorch"))
    assert not out.exists()


# ---------------------------------------------------------------------------- CLI, exit codes, scripts with stand-ins

def _fake_bin(folder: Path, scripts: dict[str, str]) -> Path:
    """Executables named after TensorRT-LLM / Triton tools that record their arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text("#!/usr/bin/env bash\n" + body)
        (folder / name).chmod(0o755)
    return folder


FAKE_TRTLLM_BUILD = """printf '%s\\n' "$@" > "$FAKE_LOG/trtllm-build.args"
[ "$FAKE_FAIL" = "1" ] && { echo "fake trtllm-build: failing" >&2; exit 1; }
out=""; prev=""; for a in "$@"; do [ "$prev" = "--output_dir" ] && out="$a"; prev="$a"; done
echo '{"version": "fake"}' > "$out/config.json"
ws=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['mapping']['world_size'])" "$CKPT_CONFIG")
for ((r = 0; r < ws; r++)); do echo engine > "$out/rank$r.engine"; done
"""


def test_cli_without_trtllm_build_prepares_and_exits_0(reference_dir, tmp_path):
    """No trtllm-build on PATH: exit 0 and one line saying what to run where TensorRT-LLM 1.2.x is installed."""
    out = tmp_path / "repo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "builder.cli", "build", "--model", str(reference_dir), "--output",
                           str(out), "--backend", "tensorrtllm", "--tp", "2", "--max-seq-len", "128"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("engine not built (no trtllm-build on PATH): run `") and "TensorRT-LLM 1.2.x" in last
    assert str(out / "build_engine.sh") in last and str(out / "launch_triton.sh") in last
    validate_repository(out)
    bad = subprocess.run([sys.executable, "-m", "builder.cli", "build", "--output", str(tmp_path / "x"),
                          "--backend", "tensorrt"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--backend" in bad.stderr


def test_engine_build_runs_the_script_with_the_exact_command(built, tmp_path, monkeypatch):
    """With trtllm-build on PATH, `finish` runs build_engine.sh: the tool gets the checkpoint, the engine folder and
    the flags; the engine lands in tensorrt_llm/1/engine and validates. A failing build gives exit code 3."""
    from builder.trtllm_build import finish

    repo = Path(shutil.copytree(built("tensorrtllm", 2, "fp8", "fp8"), tmp_path / "repo"))
    log = tmp_path / "log"
    log.mkdir()
    bin_dir = _fake_bin(tmp_path / "bin", {"trtllm-build": FAKE_TRTLLM_BUILD})
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("CKPT_CONFIG", str(repo / "tensorrt_llm" / "1" / "checkpoint" / "config.json"))
    result = finish(repo, "tensorrtllm")
    assert result.exit_code == 0 and result.line.startswith("engine built in"), (result, (repo / "build_engine.log")
                                                                                  .read_text())
    args = (log / "trtllm-build.args").read_text().split("\n")[:-1]
    flags = _flags(args)
    assert flags["--checkpoint_dir"] == str(repo / "tensorrt_llm" / "1" / "checkpoint")
    assert flags["--output_dir"] == str(repo / "tensorrt_llm" / "1" / "engine.partial")
    assert flags["--workers"] == "2" and flags["--use_paged_context_fmha"] == "enable"
    engine = repo / "tensorrt_llm" / "1" / "engine"
    assert sorted(p.name for p in engine.iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    assert not (repo / "tensorrt_llm" / "1" / "engine.partial").exists()
    validate_repository(repo)
    (engine / "rank1.engine").unlink()
    assert "lacks rank1.engine" in " | ".join(find_problems(repo))
    monkeypatch.setenv("FAKE_FAIL", "1")
    failed = finish(repo, "tensorrtllm")
    assert failed.exit_code == 3 and "build_engine.log" in failed.line
    assert "fake trtllm-build: failing" in (repo / "build_engine.log").read_text()


def test_engine_build_refuses_another_trtllm_version(built, tmp_path):
    """build_engine.sh stops (exit 2) when the installed TensorRT-LLM is not 1.2.x."""
    repo = Path(shutil.copytree(built("tensorrtllm", 1), tmp_path / "repo"))
    bin_dir = _fake_bin(tmp_path / "bin", {
        "trtllm-build": "exit 0\n",
        "python3": 'echo "1.3.0"\n'})  # what `importlib.metadata.version("tensorrt_llm")` would print
    done = subprocess.run(["bash", str(repo / "build_engine.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert done.returncode == 2 and "found TensorRT-LLM 1.3.0" in done.stderr


FAKE_RECORDER = 'printf \'%s\\n\' "$@" > "$FAKE_LOG/$(basename "$0").args"\n'


@pytest.mark.parametrize("backend,tp", [("tensorrtllm", 2), ("trtllm-pytorch", 2)])
def test_launch_script_after_moving_the_repository(built, tmp_path, backend, tp):
    """launch_triton.sh re-points the absolute engine / checkpoint path at the moved repository, then runs the
    launch line (tensorrtllm tp 2: mpirun with two ranks; trtllm-pytorch: one tritonserver)."""
    repo = Path(shutil.copytree(built(backend, tp), tmp_path / "moved repo"))
    log = tmp_path / "log"
    log.mkdir()
    bin_dir = _fake_bin(tmp_path / "bin", {"tritonserver": FAKE_RECORDER, "mpirun": FAKE_RECORDER})
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "FAKE_LOG": str(log),
           "GRPC_PORT": "9101"}
    if backend == "tensorrtllm":
        engine = repo / "tensorrt_llm" / "1" / "engine"
        engine.mkdir()
        for name in ("config.json", "rank0.engine", "rank1.engine"):
            (engine / name).write_text("{}")
    else:
        llmapi = _fake_bin(tmp_path / "llmapi", {"model.py": "", "helpers.py": ""})
        no_code = subprocess.run(["bash", str(repo / "launch_triton.sh")], capture_output=True, text=True, env=env)
        assert no_code.returncode == 1 and "TRTLLM_LLMAPI_DIR" in no_code.stderr
        env["TRTLLM_LLMAPI_DIR"] = str(llmapi)
    done = subprocess.run(["bash", str(repo / "launch_triton.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    if backend == "tensorrtllm":
        params = _params(parse_config(repo / "tensorrt_llm" / "config.pbtxt"))
        assert params["gpt_model_path"] == str(engine)
        args = (log / "mpirun.args").read_text().split("\n")[:-1]
        assert args[:4] == ["--allow-run-as-root", "-n", "1", "tritonserver"]
        assert f"--model-repository={repo}" in args and "--grpc-port=9101" in args and args.count(":") == 1
        assert args.count("tritonserver") == 2 and "--load-model=tensorrt_llm" in args
    else:
        model_yaml = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
        assert model_yaml["model"] == str(repo / "tensorrt_llm" / "1" / "checkpoint")
        assert (repo / "tensorrt_llm" / "1" / "model.py").is_file()
        args = (log / "tritonserver.args").read_text().split("\n")[:-1]
        assert f"--model-repository={repo}" in args and "--grpc-port=9101" in args
    validate_repository(repo)


# ------------------------------------------------------------------- the real tritonserver with engine stand-ins

CPP_STAND_IN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stands in for the C++ tensorrtllm backend: answers the prompt's ids reversed, one token per response when
    streaming (only output_ids and sequence_length, as the C++ backend sends for the ensemble)."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
            n = int(pb_utils.get_input_tensor_by_name(request, "request_output_len").as_numpy().reshape(-1)[0])
            stream = pb_utils.get_input_tensor_by_name(request, "streaming")
            stream = bool(stream.as_numpy().reshape(-1)[0]) if stream is not None else False
            out = ids[::-1][:n]
            chunks = [[t] for t in out] if stream else [out]
            for i, chunk in enumerate(chunks):
                tensors = [pb_utils.Tensor("output_ids", np.array([[chunk]], dtype=np.int32)),
                           pb_utils.Tensor("sequence_length", np.array([[len(chunk)]], dtype=np.int32))]
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == len(chunks) - 1 else 0
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
        return None
'''

LLMAPI_STAND_IN = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Stands in for TensorRT-LLM's llmapi model: text_output is the text so far (the prompt upper-cased, one
    character more per streamed response, up to sampling_param_max_tokens characters)."""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0].decode().upper()
            n = int(pb_utils.get_input_tensor_by_name(request, "sampling_param_max_tokens").as_numpy()[0])
            stream = pb_utils.get_input_tensor_by_name(request, "streaming")
            stream = bool(stream.as_numpy()[0]) if stream is not None else False
            ends = range(1, min(n, len(text)) + 1) if stream else [min(n, len(text))]
            ends = list(ends)
            for end in ends:
                out = pb_utils.Tensor("text_output", np.array([text[:end].encode()], dtype=object))
                flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if end == ends[-1] else 0
                sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=flags)
        return None
'''


def _serve(repo: Path, log: Path):
    from builder.serve import TritonServer, free_port

    return TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), log_path=log)


@pytest.mark.server
def test_tensorrtllm_ensemble_streams_on_tritonserver(built, reference_dir, tmp_path):
    """The tensorrtllm repository as rendered (scripts at the root included), with only the engine model's backend
    swapped for a python stand-in of the same config: Triton loads it and the ensemble streams text deltas that
    postprocessing decodes without detok_context_ids / is_final."""
    from transformers import AutoTokenizer

    from triton_helpers import ensemble_inputs, run_stream

    repo = Path(shutil.copytree(built("tensorrtllm", 1), tmp_path / "repo"))
    config = repo / "tensorrt_llm" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "tensorrtllm"', 'backend: "python"'))
    (repo / "tensorrt_llm" / "1" / "model.py").write_text(CPP_STAND_IN)
    tokenizer = AutoTokenizer.from_pretrained(repo / "preprocessing" / "1" / "tokenizer")
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(prompt)["input_ids"]
    with _serve(repo, tmp_path / "server.log") as server:
        streamed = run_stream(server.grpc_url, "ensemble", ensemble_inputs(text_input=prompt, max_tokens=6,
                                                                          stream=True))
        whole = run_stream(server.grpc_url, "ensemble", ensemble_inputs(text_input=prompt, max_tokens=6))
    assert streamed.error is None and whole.error is None
    expected = ids[::-1][:6]
    assert streamed.texts == [tokenizer.decode([t], skip_special_tokens=True) for t in expected]
    assert whole.texts == [tokenizer.decode(expected, skip_special_tokens=True)]


@pytest.mark.server
def test_llmapi_config_serves_on_tritonserver(built, tmp_path):
    """The llmapi model's config (max_batch_size 0, decoupled) loads in Triton with a stand-in model.py, and a gRPC
    stream with text_input / streaming / sampling_param_max_tokens gets the responses of its contract."""
    import queue

    import tritonclient.grpc as grpcclient

    repo = Path(shutil.copytree(built("trtllm-pytorch", 2), tmp_path / "repo"))
    (repo / "tensorrt_llm" / "1" / "model.py").write_text(LLMAPI_STAND_IN)

    def tensor(name, array, dtype):
        item = grpcclient.InferInput(name, list(array.shape), dtype)
        item.set_data_from_numpy(array)
        return item

    responses: queue.Queue = queue.Queue()
    with _serve(repo, tmp_path / "server.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            client.async_stream_infer("tensorrt_llm", [
                tensor("text_input", np.array([b"hello"], dtype=object), "BYTES"),
                tensor("streaming", np.array([True]), "BOOL"),
                tensor("sampling_param_max_tokens", np.array([3], dtype=np.int32), "INT32")])
            texts = []
            while len(texts) < 3:
                result, error = responses.get(timeout=60)
                assert error is None, error
                texts.append(result.as_numpy("text_output")[0].decode())
        finally:
            client.stop_stream()
            client.close()
    assert texts == ["H", "HE", "HEL"]
