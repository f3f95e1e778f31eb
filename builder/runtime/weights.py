"""Load and check an engine folder's rank0.safetensors against the TensorRT-LLM Llama-family weight names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from builder.config import ModelConfig
from builder.errors import ConfigError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name."""
    if name not in TORCH_DTYPES:
        raise ConfigError(f"engine dtype {name!r} is not supported; rebuild with one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every required tensor name and its shape for this model config (see docs/contracts.md)."""
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
    return shapes


def load_weights(engine_dir: Path, cfg: ModelConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Read rank0.safetensors onto device in the config dtype, checking that every required tensor is there."""
    if cfg.mapping.world_size != 1:
        raise ConfigError(f"engine was built for {cfg.mapping.world_size} ranks; this runtime runs single-rank "
                          "engines only, rebuild with tensor/pipeline parallel size 1")
    path = Path(engine_dir) / "rank0.safetensors"
    if not path.is_file():
        raise ConfigError(f"engine folder {engine_dir} has no rank0.safetensors; rebuild it with `builder build`")
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
