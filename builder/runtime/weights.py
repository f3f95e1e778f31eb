"""Load and check an engine folder's rank{N}.safetensors against the layout of its family's weight table
(builder.models.layout)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from builder.config import ModelConfig
from builder.errors import ConfigError
from builder.models import arch_spec
from builder.models.layout import TensorSpec, expected_weights, rank_layout
from plugins.formats import TORCH_DTYPES


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name."""
    if name not in TORCH_DTYPES:
        raise ConfigError(f"engine dtype {name!r} is not supported; rebuild with one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def expected_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every required tensor of one rank: name -> TensorSpec (per-rank shape and dtype; see docs/contracts.md)."""
    return {t.name: t for t in rank_layout(cfg, expected_weights(cfg), cfg.mapping.tp_size)}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every required tensor name and its per-rank shape for this model config (see docs/contracts.md)."""
    return {name: spec.shape for name, spec in expected_layout(cfg).items()}


def check_mapping(cfg: ModelConfig) -> int:
    """The engine's tensor-parallel size; ConfigError for layouts this runtime cannot run (pipeline parallel)."""
    m = cfg.mapping
    if m.pp_size != 1 or m.world_size != m.tp_size or m.tp_size < 1:
        raise ConfigError(f"engine mapping world_size={m.world_size}, tp_size={m.tp_size}, pp_size={m.pp_size} is "
                          "not supported; this runtime runs tensor parallelism only (world_size = tp_size, "
                          "pp_size 1), rebuild with `builder build --tp N`")
    return m.tp_size


def load_weights(engine_dir: Path, cfg: ModelConfig, device: torch.device, rank: int = 0) -> dict[str, torch.Tensor]:
    """Read rank{rank}.safetensors onto device in the config dtype, checking that every required tensor is there."""
    tp = check_mapping(cfg)
    if not 0 <= rank < tp:
        raise ConfigError(f"rank {rank} is outside the engine's {tp} tensor-parallel ranks")
    path = Path(engine_dir) / f"rank{rank}.safetensors"
    if not path.is_file():
        raise ConfigError(f"engine folder {engine_dir} has no {path.name}; rebuild it with `builder build`")
    dtype = torch_dtype(cfg.dtype)
    arch_spec(cfg.architecture).check_quantization(cfg, tp)
    layout = expected_layout(cfg)
    weights: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            weights[name] = _as_stored(f.get_tensor(name), layout.get(name), dtype, path).to(device)
    _check(weights, {name: spec.shape for name, spec in layout.items()}, path)
    return weights


def _as_stored(tensor: torch.Tensor, spec: TensorSpec | None, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """A loaded tensor in its layout dtype: float tensors cast (model dtype, fp32 scales), int8/e4m3 kept as is."""
    want = dtype if spec is None else spec.dtype
    if want in (torch.int8, torch.float8_e4m3fn):
        if tensor.dtype == want:
            return tensor
        if want == torch.float8_e4m3fn and tensor.dtype in (torch.int8, torch.uint8):
            return tensor.view(torch.float8_e4m3fn)  # TensorRT-LLM also accepts FP8 weights stored as int8 views
        raise ConfigError(f"{path}: {spec.name} is {tensor.dtype}, expected {want} for "
                          "quant_algo in config.json; rebuild the engine with `builder build`")
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        raise ConfigError(f"{path}: {spec.name if spec else 'a tensor'} is {tensor.dtype}, expected {want}; the "
                          "weights do not match config.json's quantization, rebuild the engine")
    return tensor.to(want)


def _check(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise ConfigError naming missing or mis-shaped tensors."""
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} tensors (e.g. {missing[0]}); the engine does not match its "
                          "config.json, rebuild it with `builder build`")
    wrong = [f"{n} {tuple(weights[n].shape)} != {s}" for n, s in shapes.items() if tuple(weights[n].shape) != s]
    if wrong:
        raise ConfigError(f"{path} has tensors of the wrong shape ({'; '.join(wrong[:3])}); rebuild the engine")
