"""Checks of the TensorRT-LLM targets' engine models, called by builder.repo.validate for every model folder.

tensorrt_llm on the C++ `tensorrtllm` backend: every parameter is a key the backend reads (triton-contract.md
section 2.4) with a value its parsers accept (booleans true/false/1/0 in the three spellings, stoi/stof numbers,
the enums), gpt_model_path is absolute and names this model's 1/engine, and the TensorRT-LLM checkpoint in
1/checkpoint has a config.json whose keys are PretrainedConfig fields (trtllm-checkpoint.md sections 1.2, 1.3) and
one rank{N}.safetensors per rank holding exactly the tensors that config describes.
tensorrt_llm as TensorRT-LLM's llmapi model (python backend with 1/model.yaml): model.yaml's keys and its
triton_config agree with config.pbtxt, and 1/checkpoint is an HF-format checkpoint whose hf_quant_config.json
matches its tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.checkpoint.safetensors_io import ST_DTYPES
from builder.models.layout import expected_weights, rank_layout
from builder.config import ModelConfig
from builder.errors import BuilderError

ENGINE_SUBDIR, CHECKPOINT_SUBDIR = ("1", "engine"), ("1", "checkpoint")

# Keys the C++ backend reads from `parameters` (triton-contract.md section 2.4), by the parser each goes through.
CPP_BOOL_KEYS = {
    "enable_kv_cache_reuse", "enable_chunked_context", "exclude_input_in_output", "kv_cache_onboard_blocks",
    "normalize_log_probs", "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode",
    "speculative_decoding_fast_logits",
}
CPP_INT_KEYS = {
    "max_beam_width", "max_tokens_in_paged_kv_cache", "sink_token_length", "kv_cache_host_memory_bytes",
    "cancellation_check_period_ms", "stats_check_period_ms", "iter_stats_max_iterations",
    "request_stats_max_iterations", "lookahead_window_size", "lookahead_ngram_size",
    "lookahead_verification_set_size", "num_nodes", "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size",
    "lora_cache_host_memory_bytes", "cuda_graph_cache_size", "recv_poll_period_ms",
}
CPP_FLOAT_KEYS = {"kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "lora_cache_gpu_memory_fraction",
                  "gpu_weights_percent"}
CPP_ENUM_KEYS = {
    "gpt_model_type": {"inflight_fused_batching", "inflight_batching", "V1"},
    "batch_scheduler_policy": {"max_utilization", "guaranteed_no_evict"},
    "decoding_mode": {"top_k", "top_p", "top_k_top_p", "beam_search", "medusa", "redrafter", "lookahead", "eagle"},
    "guided_decoding_backend": {"xgrammar"},
}
CPP_TEXT_KEYS = {  # paths, lists and trees: any non-empty value
    "gpt_model_path", "encoder_model_path", "max_attention_window_size", "medusa_choices", "eagle_choices",
    "gpu_device_ids", "participant_ids", "lora_prefetch_dir", "xgrammar_tokenizer_info_path", "tokenizer_dir",
    "executor_worker_path", "FORCE_CPU_ONLY_INPUT_TENSORS",
}
CPP_PARAMETER_KEYS = CPP_BOOL_KEYS | CPP_INT_KEYS | CPP_FLOAT_KEYS | set(CPP_ENUM_KEYS) | CPP_TEXT_KEYS
CPP_REQUIRED_KEYS = ("gpt_model_type", "gpt_model_path")
CPP_BOOLS = {"true", "True", "TRUE", "1", "false", "False", "FALSE", "0"}

# TensorRT-LLM PretrainedConfig (config.json of a checkpoint) for the Llama family and Qwen2.
PRETRAINED_REQUIRED = ("architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers",
                       "num_attention_heads")
PRETRAINED_KEYS = set(PRETRAINED_REQUIRED) | {
    "logits_dtype", "num_key_value_heads", "intermediate_size", "head_size", "hidden_act", "norm_epsilon",
    "position_embedding_type", "max_position_embeddings", "rotary_base", "rotary_scaling", "rotary_pct",
    "rotary_embedding_dim", "use_parallel_embedding", "embedding_sharding_dim", "mapping", "quantization",
    "mlp_bias", "attn_bias", "residual_mlp", "disable_weight_only_quant_plugin", "moe", "tie_word_embeddings",
    "fc_after_embed", "use_input_layernorm_in_first_layer", "use_last_layernorm", "layer_idx_offset",
    "embedding_multiplier", "attention_multiplier", "residual_multiplier", "output_multiplier_scale",
    "qwen_type", "use_logn_attn", "seq_length",
}
MAPPING_KEYS = {"world_size", "tp_size", "pp_size", "cp_size", "moe_tp_size", "moe_ep_size", "gpus_per_node"}
QUANT_KEYS = {"quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point", "pre_quant_scale",
              "exclude_modules", "smoothquant_val", "clamp_val", "use_meta_recipe"}
QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}
KV_QUANT_ALGOS = {"INT8", "FP8", "NVFP4"}

# model.yaml of the llmapi model: the LLM API arguments builder writes, plus triton_config.
LLMAPI_KEYS = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
               "max_num_tokens", "max_seq_len", "enable_chunked_prefill", "kv_cache_config", "triton_config"}
LLMAPI_KV_KEYS = {"free_gpu_memory_fraction", "enable_block_reuse", "dtype"}
LLMAPI_TRITON_KEYS = {"max_batch_size", "decoupled", "cancellation_check_period_ms"}
HF_QUANT_ALGOS = {"W8A16", "W4A16_AWQ", "FP8"}  # what builder's HF export writes


def _parameters(model) -> dict[str, str]:
    """The model's string parameters."""
    return {key: value.string_value for key, value in model.config.parameters.items()}


def is_llmapi_model(model) -> bool:
    """A python-backend model with a 1/model.yaml: TensorRT-LLM's llmapi model."""
    return model.config.backend == "python" and (model.folder / "1" / "model.yaml").is_file()


def data_dirs(model) -> list[Path]:
    """Folders of a TensorRT-LLM engine model that hold data (checkpoints, engines): not searched for `${`."""
    if model.config.backend != "tensorrtllm" and not is_llmapi_model(model):
        return []
    version = model.folder / "1"
    return [(version / name).resolve() for name in ("checkpoint", "engine", "engine.partial")]


def check_trtllm_target(model) -> list[str]:
    """Problems of a TensorRT-LLM engine model (none for any other model)."""
    if model.config.backend == "tensorrtllm":
        return check_cpp_model(model)
    if is_llmapi_model(model):
        return check_llmapi_model(model)
    return []


def check_cpp_parameter(key: str, value: str) -> str | None:
    """Why a tensorrtllm parameter value would not parse as intended, or None when it does."""
    if key not in CPP_PARAMETER_KEYS:
        return f"{key!r} is not a parameter the tensorrtllm backend reads"
    if value == "" or "${" in value:
        return f"{key!r} is not filled ({value!r}); the backend would fall back to its default"
    if key in CPP_BOOL_KEYS and value not in CPP_BOOLS:
        return f"{key!r} = {value!r} is not a boolean the backend parses (true/false/1/0)"
    if key in CPP_INT_KEYS:
        try:
            int(value)
        except ValueError:
            return f"{key!r} = {value!r} is not an integer"
    if key in CPP_FLOAT_KEYS:
        try:
            number = float(value)
        except ValueError:
            return f"{key!r} = {value!r} is not a number"
        if key.endswith("fraction") and not 0.0 < number <= 1.0:
            return f"{key!r} = {value!r} is outside (0, 1]"
    if key in CPP_ENUM_KEYS and value not in CPP_ENUM_KEYS[key]:
        return f"{key!r} = {value!r} is not one of {', '.join(sorted(CPP_ENUM_KEYS[key]))}"
    return None


def check_cpp_model(model) -> list[str]:
    """The C++ tensorrtllm model: instance group, parameters, checkpoint, and the engine if built."""
    name, config = model.name, model.config
    problems = []
    groups = list(config.instance_group)
    if len(groups) != 1 or groups[0].count != 1 or groups[0].kind != groups[0].KIND_CPU:
        problems.append(f"{name}: the tensorrtllm backend wants one KIND_CPU instance (it places the engine on GPUs "
                        "itself)")
    params = _parameters(model)
    for key, value in params.items():
        problem = check_cpp_parameter(key, value)
        if problem:
            problems.append(f"{name}: parameter {problem}")
    problems += [f"{name}: parameter {key!r} is missing" for key in CPP_REQUIRED_KEYS if key not in params]
    path = params.get("gpt_model_path", "")
    if path and (not Path(path).is_absolute() or Path(path).parts[-3:] != (name, *ENGINE_SUBDIR)):
        problems.append(f"{name}: gpt_model_path {path!r} must be the absolute path of {name}/1/engine (the backend "
                        "resolves relative paths against the server's working directory)")
    checkpoint = model.folder.joinpath(*CHECKPOINT_SUBDIR)
    problems += [f"{name}: {p}" for p in check_trtllm_checkpoint(checkpoint)]
    engine = model.folder.joinpath(*ENGINE_SUBDIR)
    if engine.is_dir():
        problems += [f"{name}: {p}" for p in check_engine(engine, _world_size(checkpoint))]
    return problems


def _world_size(checkpoint: Path) -> int:
    """mapping.world_size of a checkpoint's config.json (1 when unreadable; the checkpoint check reports that)."""
    try:
        return int(json.loads((checkpoint / "config.json").read_text())["mapping"]["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def check_engine(engine: Path, world_size: int) -> list[str]:
    """A built engine folder: config.json and one rank{N}.engine per rank."""
    problems = [] if (engine / "config.json").is_file() else [f"engine folder {engine} lacks config.json"]
    problems += [f"engine folder {engine} lacks rank{r}.engine" for r in range(world_size)
                 if not (engine / f"rank{r}.engine").is_file()]
    return problems


def check_checkpoint_config(data: dict) -> list[str]:
    """config.json of a TensorRT-LLM checkpoint against PretrainedConfig's fields and value rules."""
    problems = [f"config.json key {key!r} is not a TensorRT-LLM PretrainedConfig field"
                for key in sorted(set(data) - PRETRAINED_KEYS)]
    problems += [f"config.json lacks {key!r}" for key in PRETRAINED_REQUIRED if key not in data]
    mapping = data.get("mapping") or {}
    problems += [f"config.json mapping key {key!r} is not a Mapping field"
                 for key in sorted(set(mapping) - MAPPING_KEYS)]
    world, tp, pp = (int(mapping.get(k, 1)) for k in ("world_size", "tp_size", "pp_size"))
    if world != tp * pp * int(mapping.get("cp_size", 1)):
        problems.append(f"config.json mapping world_size {world} != tp_size {tp} x pp_size {pp}")
    quant = data.get("quantization") or {}
    problems += [f"config.json quantization key {key!r} is not a QuantConfig field"
                 for key in sorted(set(quant) - QUANT_KEYS)]
    if quant.get("quant_algo") not in QUANT_ALGOS | {None}:
        problems.append(f"config.json quant_algo {quant.get('quant_algo')!r} is not a TensorRT-LLM QuantAlgo")
    if quant.get("kv_cache_quant_algo") not in KV_QUANT_ALGOS | {None}:
        problems.append(f"config.json kv_cache_quant_algo {quant.get('kv_cache_quant_algo')!r} is not INT8/FP8")
    if data.get("dtype") not in ("float32", "float16", "bfloat16"):
        problems.append(f"config.json dtype {data.get('dtype')!r} is not float32/float16/bfloat16")
    return problems


def _header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) from a safetensors header."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}


def check_trtllm_checkpoint(path: Path) -> list[str]:
    """A TensorRT-LLM checkpoint folder: PretrainedConfig keys, and per rank the tensors its config implies."""
    if not (path / "config.json").is_file():
        return [f"checkpoint folder {path} lacks config.json"]
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"checkpoint config.json is not valid JSON ({exc})"]
    problems = check_checkpoint_config(data)
    if problems:
        return problems
    world_size = int(data["mapping"]["world_size"])
    missing = [r for r in range(world_size) if not (path / f"rank{r}.safetensors").is_file()]
    if missing:
        return [f"checkpoint folder {path} lacks rank{r}.safetensors" for r in missing]
    return problems + _check_rank_tensors(path, data, world_size)


def _check_rank_tensors(path: Path, data: dict, world_size: int) -> list[str]:
    """Every rank file holds exactly the tensors (names, dtypes, shapes) that the config describes."""
    try:
        cfg = ModelConfig.from_dict(data)
        layout = rank_layout(cfg, expected_weights(cfg), int(data["mapping"]["tp_size"]))
    except (BuilderError, KeyError, TypeError, ValueError) as exc:
        return [f"checkpoint config.json does not describe a supported model ({exc})"]
    want = {t.name: (ST_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape)) for t in layout}
    problems = []
    for rank in range(world_size):
        got = _header(path / f"rank{rank}.safetensors")
        if got != want:
            extra, lacking = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            wrong = sorted(n for n in set(got) & set(want) if got[n] != want[n])
            problems.append(f"rank{rank}.safetensors does not match config.json: missing {lacking[:3]}, unexpected "
                            f"{extra[:3]}, wrong dtype/shape {[(n, got[n], want[n]) for n in wrong[:2]]}")
    return problems


def check_llmapi_model(model) -> list[str]:
    """TensorRT-LLM's llmapi model: model.yaml keys and triton_config, and its HF checkpoint."""
    import yaml

    name, config = model.name, model.config
    try:
        data = yaml.safe_load((model.folder / "1" / "model.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"{name}/1/model.yaml does not parse ({exc})"]
    if not isinstance(data, dict):
        return [f"{name}/1/model.yaml is not a mapping"]
    problems = [f"{name}/1/model.yaml key {key!r} is not one builder writes for the LLM API"
                for key in sorted(set(data) - LLMAPI_KEYS)]
    problems += [f"{name}/1/model.yaml kv_cache_config key {key!r} is not a KvCacheConfig field builder writes"
                 for key in sorted(set(data.get("kv_cache_config") or {}) - LLMAPI_KV_KEYS)]
    triton = data.get("triton_config") or {}
    problems += [f"{name}/1/model.yaml triton_config key {key!r} is not read by the llmapi model"
                 for key in sorted(set(triton) - LLMAPI_TRITON_KEYS)]
    if triton.get("max_batch_size") != config.max_batch_size:
        problems.append(f"{name}: model.yaml triton_config.max_batch_size {triton.get('max_batch_size')} differs "
                        f"from config.pbtxt's {config.max_batch_size}")
    if bool(triton.get("decoupled")) != config.model_transaction_policy.decoupled:
        problems.append(f"{name}: model.yaml triton_config.decoupled differs from config.pbtxt")
    if data.get("backend") != "pytorch":
        problems.append(f"{name}: model.yaml backend {data.get('backend')!r} is not 'pytorch'")
    path = str(data.get("model") or "")
    if not Path(path).is_absolute() or Path(path).parts[-3:] != (name, *CHECKPOINT_SUBDIR):
        problems.append(f"{name}: model.yaml model {path!r} must be the absolute path of {name}/1/checkpoint")
    tp = data.get("tensor_parallel_size")
    if not isinstance(tp, int) or tp < 1:
        problems.append(f"{name}: model.yaml tensor_parallel_size {tp!r} is not a positive integer")
    problems += [f"{name}: {p}" for p in check_hf_checkpoint(model.folder.joinpath(*CHECKPOINT_SUBDIR))]
    return problems


def check_hf_checkpoint(path: Path) -> list[str]:
    """An HF-format checkpoint: config, weights, tokenizer, and hf_quant_config.json consistent with the tensors."""
    if not (path / "config.json").is_file():
        return [f"checkpoint folder {path} lacks config.json"]
    problems = []
    if not (path / "model.safetensors").is_file():
        problems.append(f"checkpoint folder {path} lacks model.safetensors")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append(f"checkpoint folder {path} has no tokenizer (TensorRT-LLM loads it from the model folder)")
    quant_file = path / "hf_quant_config.json"
    try:
        config = json.loads((path / "config.json").read_text())
        quant = (json.loads(quant_file.read_text()).get("quantization") or {}) if quant_file.is_file() else None
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        return problems + [f"checkpoint config.json / hf_quant_config.json is not valid JSON ({exc})"]
    if quant is None:
        if "quantization_config" in config:
            problems.append("config.json has a quantization_config but there is no hf_quant_config.json")
        return problems
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo not in HF_QUANT_ALGOS | {None} or kv not in ("FP8", None):
        return problems + [f"hf_quant_config.json quant_algo {algo!r} / kv_cache_quant_algo {kv!r} is not one "
                           "TensorRT-LLM's PyTorch backend loads from builder's export"]
    inline = config.get("quantization_config") or {}
    if inline.get("quant_method") != "modelopt" or inline.get("quant_algo") != algo:
        problems.append("config.json quantization_config disagrees with hf_quant_config.json")
    if not problems and (path / "model.safetensors").is_file():
        names = set(_header(path / "model.safetensors"))
        wanted = {"W8A16": ("weight_scale",), "W4A16_AWQ": ("weight_scale",),
                  "FP8": ("weight_scale", "input_scale")}.get(algo, ())
        for suffix in wanted:
            if not any(n.endswith("." + suffix) for n in names):
                problems.append(f"hf_quant_config.json says {algo} but model.safetensors has no *.{suffix}")
        if kv == "FP8" and not any(n.endswith((".k_scale", ".v_scale")) for n in names):
            problems.append("hf_quant_config.json says an FP8 KV cache but model.safetensors has no k_scale/v_scale")
    return problems
