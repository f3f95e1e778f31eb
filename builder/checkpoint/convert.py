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
from builder.checkpoint.trtllm import WeightSpec, hf_dtype, model_config_from_hf, plan_weights
from builder.config import BuildSettings, EngineConfig

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


def convert_checkpoint(hf_dir: Path, engine_dir: Path, settings: BuildSettings) -> EngineConfig:
    """Write <engine_dir>/config.json, rank0.safetensors and build_config.json from the HF checkpoint in hf_dir."""
    settings.validate()
    ckpt = HFCheckpoint(hf_dir)
    dtype = resolve_dtype(ckpt, settings.dtype)
    model_cfg = model_config_from_hf(ckpt.config, dtype)
    plan = plan_weights(model_cfg, {name: ckpt.shape(name) for name in ckpt.names()})
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = TORCH_DTYPES[dtype]
    entries = [(spec.name, target, spec.shape) for spec in plan]
    console = Console(stderr=True)
    tensors = track(_converted(ckpt, plan, target), total=len(plan), description="Converting weights",
                    transient=True, console=console, disable=not console.is_terminal)
    write_streaming(engine_dir / "rank0.safetensors", entries, tensors)
    engine_cfg = EngineConfig(model_cfg, replace(settings, dtype=dtype))
    engine_cfg.save(engine_dir)
    return engine_cfg


def _converted(ckpt: HFCheckpoint, plan: list[WeightSpec], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (TRT-LLM name, tensor) in plan order; fused tensors read only their own HF sources."""
    for spec in plan:
        parts = [ckpt.get(src).to(dtype) for src in spec.sources]
        yield spec.name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
