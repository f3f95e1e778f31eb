"""Load and check an engine folder's rank{N}.safetensors against the TensorRT-LLM Llama-family weight names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from builder.checkpoint.shard import shard_shape
from builder.config import ModelConfig
from builder.errors import ConfigError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name."""
    if name not in TORCH_DTYPES:
        raise ConfigError(f"engine dtype {name!r} is not supported; rebuild with one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every required tensor name and its per-rank shape for this model config (see docs/contracts.md)."""
    hidden, inter, head = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head
    shapes = {"transformer.vocab_embedding.weight": (cfg.vocab_size, hidden),
              "transformer.ln_f.weight": (hidden,), "lm_head.weight": (cfg.vocab_size, hidden)}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_layernorm.weight": (hidden,),
                   p + "attention.qkv.weight": (qkv_rows, hidden),
                   p + "attention.dense.weight": (hidden, cfg.num_attention_heads * head),
                   p + "mlp.fc.weight": (inter, hidden), p + "mlp.gate.weight": (inter, hidden),
                   p + "mlp.proj.weight": (hidden, inter)}
        if cfg.attn_bias:
            shapes[p + "attention.qkv.bias"] = (qkv_rows,)
    tp = cfg.mapping.tp_size
    return {name: shard_shape(name, shape, cfg, tp) for name, shape in shapes.items()}


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
    weights: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            weights[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    _check(weights, expected_shapes(cfg), path)
    return weights


def _check(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise ConfigError naming missing or mis-shaped tensors."""
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} tensors (e.g. {missing[0]}); the engine does not match its "
                          "config.json, rebuild it with `builder build`")
    wrong = [f"{n} {tuple(weights[n].shape)} != {s}" for n, s in shapes.items() if tuple(weights[n].shape) != s]
    if wrong:
        raise ConfigError(f"{path} has tensors of the wrong shape ({'; '.join(wrong[:3])}); rebuild the engine")
