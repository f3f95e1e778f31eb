"""Render the TensorRT-LLM targets of `builder build --backend` (docs/deploy-tensorrt-llm.md).

tensorrtllm      the same ensemble, preprocessing and postprocessing as the portable repository, and a `tensorrt_llm`
                 model on TensorRT-LLM 1.2.x's C++ `tensorrtllm` backend. Its engine is built by build_engine.sh
                 (trtllm-build) from the TensorRT-LLM checkpoint in tensorrt_llm/1/checkpoint into
                 tensorrt_llm/1/engine.
trtllm-pytorch   TensorRT-LLM's `llmapi` Triton model (python backend, LLM API on the PyTorch backend) over an
                 HF-format checkpoint in tensorrt_llm/1/checkpoint (ModelOpt unified layout when quantized).

Paths: TensorRT-LLM reads gpt_model_path (C++ backend) and model.yaml's `model` (llmapi) as given, relative to the
server's working directory, so both are written absolute, for the repository's final location; launch_triton.sh
rewrites them when the repository has been moved or is mounted elsewhere.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from builder.checkpoint.convert import check_quant_options, convert_checkpoint
from builder.checkpoint.hf_export import check_pytorch_quantization, export_hf_checkpoint
from builder.config import ENGINE_BACKENDS, EngineConfig
from builder.errors import ConfigError, OutputExistsError
from builder.repo.render import (TEMPLATES_DIR, TOKENIZER_SUBDIR, VERSION, ServingOptions, _copy_tokenizer, _flag,
                                 load_pipeline, make_environment, pipeline_for_engine, render_context,
                                 render_templates)
from builder.repo.validate import parse_config
from builder.trtllm_build import (BUILD_SCRIPT, CHECKPOINT_SUBDIR, ENGINE_MODEL, ENGINE_SUBDIR, LAUNCH_SCRIPT,
                                  TRITON_IMAGE, TRTLLM_PIN, TRTLLM_SERIES, launch_args, paged_context_fmha,
                                  script_lines, trtllm_build_args)

ENGINES_DIR = "engines"  # model_repo_templates/engines/<backend>/: the engine model of each TensorRT-LLM target
SCRIPTS_DIR = "scripts"  # model_repo_templates/engines/scripts/: build_engine.sh, launch_triton.sh
SHARED_MODELS = ("ensemble", "preprocessing", "postprocessing")
DEFAULT_DECODING_MODE = "top_k_top_p"


def engine_path(final_repo: Path) -> str:
    """gpt_model_path: the absolute engine folder in the repository's final location."""
    return str(Path(final_repo) / ENGINE_MODEL / ENGINE_SUBDIR)


def checkpoint_path(final_repo: Path) -> str:
    """model.yaml's `model`: the absolute HF checkpoint folder in the repository's final location."""
    return str(Path(final_repo) / ENGINE_MODEL / CHECKPOINT_SUBDIR)


def cpp_parameters(engine_config: EngineConfig, options: ServingOptions, gpt_model_path: str) -> dict[str, str]:
    """The C++ tensorrtllm backend's `parameters`: only keys it reads, each with a value it parses.

    Chunked context and KV-cache reuse need paged context FMHA, which an INT8 KV cache turns off.
    """
    build = engine_config.build
    paged = paged_context_fmha(engine_config)
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": gpt_model_path,
        "max_beam_width": "1",
        "batch_scheduler_policy": options.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": str(build.kv_cache_free_gpu_mem_fraction),
        "enable_chunked_context": _flag(options.enable_chunked_context and paged),
        "enable_kv_cache_reuse": _flag(paged),
        "exclude_input_in_output": _flag(options.exclude_input_in_output),
        "decoding_mode": DEFAULT_DECODING_MODE,
        "normalize_log_probs": "true",
        "cancellation_check_period_ms": str(max(options.cancellation_check_period_ms, 1)),
        "stats_check_period_ms": "100",
        "iter_stats_max_iterations": "1000",
        "request_stats_max_iterations": "0",
        "kv_cache_onboard_blocks": "true",
        "enable_context_fmha_fp32_acc": "false",
        "multi_block_mode": "true",
        "gpu_weights_percent": "1.0",
    }
    if options.max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = str(options.max_tokens_in_paged_kv_cache)
    return params


def _check_target_dir(repo_dir: Path) -> Path:
    """An empty or new folder to render into."""
    repo_dir = Path(repo_dir)
    if repo_dir.exists() and any(repo_dir.iterdir()):
        raise OutputExistsError(f"repository folder {repo_dir} is not empty; render into a new or empty folder")
    repo_dir.mkdir(parents=True, exist_ok=True)
    return repo_dir


def _place(src: Path, target: Path, copy_it: bool) -> None:
    """Move (or copy) a checkpoint folder into the repository."""
    if not (Path(src) / "config.json").is_file():
        raise ConfigError(f"checkpoint folder {src} has no config.json; write the checkpoint first")
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy_it:
        shutil.copytree(src, target)
    else:
        shutil.move(str(src), str(target))


def _quant_names(engine_config: EngineConfig) -> tuple[str, str]:
    """(weights, KV cache) quantization as the scripts' comments show them."""
    quant = engine_config.model.quantization
    return quant.quant_algo or "unquantized", quant.kv_cache_quant_algo or "model dtype"


def write_scripts(repo_dir: Path, engine_config: EngineConfig, backend: str,
                  templates_dir: Path = TEMPLATES_DIR) -> list[Path]:
    """build_engine.sh (tensorrtllm only) and launch_triton.sh at the repository root, executable."""
    env = make_environment(Path(templates_dir) / ENGINES_DIR / SCRIPTS_DIR)
    world_size = engine_config.model.mapping.world_size
    weights, kv = _quant_names(engine_config)
    launch_world = world_size if backend == "tensorrtllm" else 1  # the LLM API starts its own TP workers
    context = {
        "backend": backend, "trtllm_pin": TRTLLM_PIN, "trtllm_series": TRTLLM_SERIES, "triton_image": TRITON_IMAGE,
        "world_size": world_size, "architecture": engine_config.model.architecture,
        "dtype": engine_config.model.dtype, "quant_algo": weights, "kv_cache_quant_algo": kv,
        "checkpoint_subdir": CHECKPOINT_SUBDIR, "engine_subdir": ENGINE_SUBDIR,
        "checkpoint_leaf": Path(CHECKPOINT_SUBDIR).name,
        "trtllm_build_command": script_lines(trtllm_build_args(engine_config, "$CHECKPOINT_DIR", "$PARTIAL_DIR")),
        "launch_command": script_lines(launch_args(launch_world)),
    }
    names = (BUILD_SCRIPT, LAUNCH_SCRIPT) if backend == "tensorrtllm" else (LAUNCH_SCRIPT,)
    written = []
    for name in names:
        path = Path(repo_dir) / name
        path.write_text(env.get_template(name + ".j2").render(**context), encoding="utf-8")
        path.chmod(0o755)
        written.append(path)
    return written


def render_tensorrtllm_repository(repo_dir: Path, engine_config: EngineConfig, checkpoint_dir: Path,
                                  tokenizer_dir: Path, final_repo: Path, options: ServingOptions | None = None,
                                  copy_checkpoint: bool = False, templates_dir: Path = TEMPLATES_DIR) -> Path:
    """Write the tensorrtllm target into an empty repo_dir (final_repo: where it will live, for gpt_model_path).

    The TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) is moved (copied when copy_checkpoint) into
    tensorrt_llm/1/checkpoint; build_engine.sh turns it into tensorrt_llm/1/engine.
    """
    options = options or ServingOptions()
    options.validate()
    repo_dir = _check_target_dir(repo_dir)
    templates_dir = Path(templates_dir)
    context = render_context(engine_config, options)
    context.update(trtllm_series=TRTLLM_SERIES, world_size=engine_config.model.mapping.world_size,
                   logits_datatype="TYPE_FP32",
                   tensorrt_llm_parameters=cpp_parameters(engine_config, options, engine_path(final_repo)))
    render_templates(templates_dir / ENGINES_DIR / "tensorrtllm", repo_dir, context)
    engine_outputs = {t.name for t in parse_config(repo_dir / ENGINE_MODEL / "config.pbtxt").output}
    context["pipeline"] = pipeline_for_engine(load_pipeline(options.pipeline), ENGINE_MODEL, engine_outputs)
    for model in SHARED_MODELS:
        render_templates(templates_dir / model, repo_dir / model, context)
    for model in (*SHARED_MODELS, ENGINE_MODEL):
        (repo_dir / model / VERSION).mkdir(parents=True, exist_ok=True)
    for model in ("preprocessing", "postprocessing"):
        _copy_tokenizer(Path(tokenizer_dir), repo_dir / model / TOKENIZER_SUBDIR)
    _place(Path(checkpoint_dir), repo_dir / ENGINE_MODEL / CHECKPOINT_SUBDIR, copy_checkpoint)
    write_scripts(repo_dir, engine_config, "tensorrtllm", templates_dir)
    return repo_dir


def render_llmapi_repository(repo_dir: Path, engine_config: EngineConfig, checkpoint_dir: Path, final_repo: Path,
                             options: ServingOptions | None = None, copy_checkpoint: bool = False,
                             templates_dir: Path = TEMPLATES_DIR) -> Path:
    """Write the trtllm-pytorch target (TensorRT-LLM's llmapi model) into an empty repo_dir.

    checkpoint_dir is the HF-format export (builder.checkpoint.hf_export), moved (copied when copy_checkpoint) into
    tensorrt_llm/1/checkpoint; model.yaml names its absolute path in final_repo.
    """
    options = options or ServingOptions()
    options.validate()
    repo_dir = _check_target_dir(repo_dir)
    build = engine_config.build
    context = {
        "trtllm_series": TRTLLM_SERIES, "trtllm_pin": TRTLLM_PIN, "decoupled": options.decoupled_mode,
        "model_path": checkpoint_path(final_repo), "tp": engine_config.model.mapping.tp_size,
        "max_batch_size": build.max_batch_size, "max_num_tokens": build.max_num_tokens,
        "max_seq_len": build.max_seq_len, "enable_chunked_prefill": options.enable_chunked_context,
        "kv_cache_free_gpu_mem_fraction": build.kv_cache_free_gpu_mem_fraction, "enable_block_reuse": True,
        "cancellation_check_period_ms": max(options.cancellation_check_period_ms, 1),
    }
    render_templates(Path(templates_dir) / ENGINES_DIR / "trtllm-pytorch", repo_dir, context)
    _place(Path(checkpoint_dir), repo_dir / ENGINE_MODEL / CHECKPOINT_SUBDIR, copy_checkpoint)
    write_scripts(repo_dir, engine_config, "trtllm-pytorch", templates_dir)
    return repo_dir


def build_trtllm_target(options, hf_dir: Path, staging: Path, settings, final_repo: Path,
                        evaluate: Callable[[Path, EngineConfig], None] | None = None) -> EngineConfig:
    """The TensorRT-LLM part of `builder build` (options: builder.build.BuildOptions): checkpoint + repository in
    staging/repository. The caller validates it and moves it into place.

    evaluate(checkpoint_dir, config), when given, measures a TensorRT-LLM checkpoint of these quantized weights with
    builder's runtime (the accuracy report and --max-ppl-increase gate) before anything is rendered."""
    repo = staging / "repository"
    if options.backend == "tensorrtllm":
        engine_config = convert_checkpoint(hf_dir, staging / "engine", settings, tp_size=options.tp_size,
                                           quant=options.quant)
        if evaluate is not None:
            evaluate(staging / "engine", engine_config)
        render_tensorrtllm_repository(repo, engine_config, staging / "engine", staging / "tokenizer", final_repo,
                                      options.serving)
        return engine_config
    if options.backend == "trtllm-pytorch":
        if evaluate is not None:  # the HF export holds the same quantized values as this TensorRT-LLM checkpoint
            checkpoint = staging / "eval-checkpoint"
            evaluate(checkpoint, convert_checkpoint(hf_dir, checkpoint, settings, tp_size=options.tp_size,
                                                    quant=options.quant))
            shutil.rmtree(checkpoint, ignore_errors=True)
        engine_config = export_hf_checkpoint(hf_dir, staging / "hf_export", settings, tp_size=options.tp_size,
                                             quant_config=check_quant_options(options.quant),
                                             quant_options=options.quant)
        render_llmapi_repository(repo, engine_config, staging / "hf_export", final_repo, options.serving)
        return engine_config
    raise ConfigError(f"--backend {options.backend!r} is not a TensorRT-LLM target")


def precheck_backend(options) -> None:
    """Refuse, before any work, a backend name or a quantization the chosen backend cannot serve."""
    if options.backend not in ENGINE_BACKENDS:
        raise ConfigError(f"--backend {options.backend!r} is not supported; choose one of {', '.join(ENGINE_BACKENDS)}")
    if options.backend == "trtllm-pytorch":
        check_pytorch_quantization(check_quant_options(options.quant))
