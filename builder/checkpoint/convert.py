"""Convert an HF Llama/Mistral/Qwen2 checkpoint into a TensorRT-LLM checkpoint folder, one tensor at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import track

from builder.checkpoint.hf import HFCheckpoint
from builder.checkpoint.safetensors_io import TORCH_DTYPES, write_streaming
from builder.checkpoint.shard import read_shard, shard_shape, validate_tp
from builder.checkpoint.trtllm import WeightSpec, hf_dtype, model_config_from_hf, plan_weights
from builder.config import BuildSettings, EngineConfig, Mapping, ModelConfig

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


def convert_checkpoint(hf_dir: Path, engine_dir: Path, settings: BuildSettings, tp_size: int = 1) -> EngineConfig:
    """Write <engine_dir>/config.json, rank{N}.safetensors (N < tp_size) and build_config.json from hf_dir.

    Each rank's file is streamed from the HF checkpoint on its own, reading only the slices that rank needs,
    so peak memory stays around one tensor whatever tp_size is.
    """
    settings.validate()
    ckpt = HFCheckpoint(hf_dir)
    dtype = resolve_dtype(ckpt, settings.dtype)
    model_cfg = model_config_from_hf(ckpt.config, dtype)
    validate_tp(model_cfg, tp_size)
    model_cfg.mapping = Mapping(world_size=tp_size, tp_size=tp_size, pp_size=1)
    plan = plan_weights(model_cfg, {name: ckpt.shape(name) for name in ckpt.names()})
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = TORCH_DTYPES[dtype]
    entries = [(spec.name, target, shard_shape(spec.name, spec.shape, model_cfg, tp_size)) for spec in plan]
    console = Console(stderr=True)
    for rank in range(tp_size):
        label = "Converting weights" if tp_size == 1 else f"Converting weights (rank {rank + 1}/{tp_size})"
        tensors = track(_converted(ckpt, plan, target, model_cfg, rank, tp_size), total=len(plan), description=label,
                        transient=True, console=console, disable=not console.is_terminal)
        write_streaming(engine_dir / f"rank{rank}.safetensors", entries, tensors)
    engine_cfg = EngineConfig(model_cfg, replace(settings, dtype=dtype))
    engine_cfg.save(engine_dir)
    return engine_cfg


def _converted(ckpt: HFCheckpoint, plan: list[WeightSpec], dtype: torch.dtype, cfg: ModelConfig, rank: int = 0,
               tp_size: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (TRT-LLM name, rank's shard) in plan order; each shard reads only its own slices of the HF sources."""
    for spec in plan:
        sources = [(src, ckpt.shape(src)[0]) for src in spec.sources]
        shard = read_shard(spec.name, spec.shape, sources, cfg, rank, tp_size, ckpt.get_part)
        yield spec.name, shard.to(dtype)
