"""Convert an HF Llama/Mistral/Qwen2 checkpoint into a TensorRT-LLM checkpoint folder, one tensor at a time."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import Progress, track

from builder.checkpoint.hf import HFCheckpoint, staged_tokenizer
from builder.checkpoint.safetensors_io import write_streaming
from builder.checkpoint.calibration import Calibration, calibrate, calibration_device, calibration_tokens
from builder.checkpoint.trtllm import model_config_from_hf, plan_weights
from builder.config import BuildSettings, EngineConfig, Mapping, ModelConfig, QuantConfig, QuantOptions
from builder.errors import ConfigError
from builder.models import arch_spec
from builder.models.hf_config import hf_dtype
from builder.models.layout import KV_SCALE_SUFFIX, TensorSpec, rank_layout
from builder.models.parallel import read_shard, split_for_rank, validate_tp
from builder.models.spec import WeightSpec
from builder.quantize.calibrate import ActivationStats, load_calibration_text
from builder.quantize.kv_cache import kv_cache_scale
from builder.quantize.linear import quantize_linear
from builder.quantize.modes import CALIBRATED_ALGOS, linear_quant_algo, needs_calibration, resolve_quant_config
from plugins.formats import TORCH_DTYPES

ST_TO_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def resolve_dtype(ckpt: HFCheckpoint, requested: str) -> str:
    """`requested` unless "auto": then the HF config dtype, else the embedding's stored dtype, else float32."""
    if requested != "auto":
        return requested
    return hf_dtype(ckpt.config) or ST_TO_DTYPE.get(_embed_dtype(ckpt), "float32")


def _embed_dtype(ckpt: HFCheckpoint) -> str | None:
    """safetensors dtype of the embedding, if the checkpoint has one."""
    name = "model.embed_tokens.weight"
    return ckpt.dtype(name) if name in ckpt.weight_map else None


def plan_checkpoint(ckpt: HFCheckpoint, dtype: str = "auto") -> tuple[ModelConfig, list[WeightSpec]]:
    """The model config (config.json fields checked) and the conversion plan (every weight's shape checked against
    them), from the config and the safetensors headers alone: CheckpointError before anything is read or written."""
    model_cfg = model_config_from_hf(ckpt.config, resolve_dtype(ckpt, dtype))
    return model_cfg, plan_weights(model_cfg, {name: ckpt.shape(name) for name in ckpt.names()})


def check_quant_options(quant: QuantOptions) -> QuantConfig:
    """Resolve the CLI quantization choices and check the calibration inputs, before any file is written.

    The calibration text is read when the mode needs calibration, and whenever --calib-data names a file
    (a typo there should not go unnoticed): ConfigError for a missing, unreadable or empty file.
    """
    config = resolve_quant_config(quant.quant, quant.kv_cache_dtype, quant.group_size, quant.exclude_modules)
    if quant.calib_size < 1 or quant.calib_seq_len < 1:
        raise ConfigError(f"--calib-size and --calib-seq-len must be >= 1, got {quant.calib_size} and "
                          f"{quant.calib_seq_len}")
    if needs_calibration(config) or quant.calib_data is not None:
        load_calibration_text(quant.calib_data)
    return config


def convert_checkpoint(hf_dir: Path, engine_dir: Path, settings: BuildSettings, tp_size: int = 1,
                       quant: QuantOptions | None = None) -> EngineConfig:
    """Write <engine_dir>/config.json, rank{N}.safetensors (N < tp_size) and build_config.json from hf_dir.

    Each rank's file is streamed from the HF checkpoint on its own, reading only the slices that rank needs,
    so peak memory stays around one tensor whatever tp_size is. With `quant`, every quantized linear of a rank is
    quantized from its float shard with statistics of the whole layer (calibrated layer by layer first when the
    mode needs it), so the ranks' tensors are the TP split of the tp=1 tensors (trtllm-checkpoint.md section 3).
    Every check (options, model, tp, calibration text) runs before engine_dir is created.
    """
    settings.validate()
    quant = quant or QuantOptions()
    quant_config = check_quant_options(quant)
    ckpt = HFCheckpoint(hf_dir)
    model_cfg, plan = plan_checkpoint(ckpt, settings.dtype)
    dtype = model_cfg.dtype
    validate_tp(model_cfg, tp_size)
    model_cfg.mapping = Mapping(world_size=tp_size, tp_size=tp_size, pp_size=1)
    model_cfg.quantization = quant_config
    arch_spec(model_cfg.architecture).check_quantization(model_cfg, tp_size)
    console = Console(stderr=True)
    calib = None
    if needs_calibration(quant_config):
        with staged_tokenizer(hf_dir) as tokenizer_dir:
            tokens = calibration_tokens(tokenizer_dir, quant.calib_data, quant.calib_size, quant.calib_seq_len,
                                        settings.max_seq_len)
        with Progress(transient=True, console=console, disable=not console.is_terminal) as progress:
            task = progress.add_task(f"Calibrating ({tokens.shape[0]} x {tokens.shape[1]} tokens)",
                                     total=model_cfg.num_hidden_layers)
            calib = calibrate(ckpt, model_cfg, tokens, progress=lambda _: progress.advance(task),
                              device=calibration_device(settings.device))
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    layout = rank_layout(model_cfg, {row.engine: row.shape for row in plan}, tp_size)
    entries = [(t.name, t.dtype, t.shape) for t in layout]
    sources = {row.engine: row for row in plan}
    for rank in range(tp_size):
        label = "Converting weights" if tp_size == 1 else f"Converting weights (rank {rank + 1}/{tp_size})"
        tensors = track(_converted(ckpt, layout, sources, model_cfg, calib, rank, tp_size), total=len(layout),
                        description=label, transient=True, console=console, disable=not console.is_terminal)
        write_streaming(engine_dir / f"rank{rank}.safetensors", entries, tensors)
    engine_cfg = EngineConfig(model_cfg, replace(settings, dtype=dtype))
    engine_cfg.save(engine_dir)
    return engine_cfg


def _converted(ckpt: HFCheckpoint, layout: list[TensorSpec], sources: dict[str, WeightSpec], cfg: ModelConfig,
               calib: Calibration | None, rank: int = 0, tp_size: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (TRT-LLM name, rank's tensor) in layout order; each float shard is read once, only its own slices."""
    done: dict[str, torch.Tensor] = {}
    current = None
    for spec in layout:
        if spec.source != current:
            current = spec.source
            done = _produce(ckpt, spec.source, sources, cfg, calib, rank, tp_size)
        yield spec.name, done.pop(spec.name)


def _produce(ckpt: HFCheckpoint, source: str, sources: dict[str, WeightSpec], cfg: ModelConfig,
             calib: Calibration | None, rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """Every tensor of this rank made from `source`: the float shard, or a quantized linear's tensors, or a KV scale."""
    quant, dtype = cfg.quantization, TORCH_DTYPES[cfg.dtype]
    layer = _layer_index(source)
    if source.endswith(KV_SCALE_SUFFIX):
        stats = calib.layers[layer]
        return {source: kv_cache_scale(quant.kv_cache_quant_algo, stats.k_amax, stats.v_amax)}
    row = sources[source]
    parts = [(src, ckpt.shape(src)[0]) for src in row.hf]
    shard = read_shard(row.engine, row.shape, parts, cfg, rank, tp_size, ckpt.get_part).to(dtype)
    module = row.module
    algo = linear_quant_algo(quant, module) if row.is_linear_weight else None
    if algo not in CALIBRATED_ALGOS:
        return {row.engine: shard}  # float tensors; W8A16/W4A16 are quantized by trtllm-build (decisions.md)
    stats, short = calib.layers[layer], row.relative  # e.g. attention.qkv
    scales = x_abs_mean = None
    if algo == "W4A16_AWQ":  # column-parallel: the full [in] vectors; row-parallel: the rank's input slice
        scales, x_abs_mean = (split_for_rank(f"{module}.prequant_scaling_factor", stats.get(table, short), cfg, rank,
                                             tp_size) for table in ("awq_scales", "awq_x_abs_mean"))
    tensors = quantize_linear(shard, algo, group_size=quant.group_size, dtype=dtype,
                              act_stats=ActivationStats(input_amax=stats.get("input_amax", short)),
                              awq_scales=scales, awq_x_abs_mean=x_abs_mean, weight_amax=stats.get("weight_amax", short))
    return {f"{module}.{part}": tensor for part, tensor in tensors.items()}


def _layer_index(name: str) -> int | None:
    """i of a `transformer.layers.{i}.` name, None for global tensors."""
    match = re.match(r"transformer\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None
