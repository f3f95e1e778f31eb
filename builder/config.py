"""Configuration dataclasses shared by build and serve: the model (TensorRT-LLM PretrainedConfig) and build settings.

The engine folder holds:
  config.json        TensorRT-LLM PretrainedConfig (what `trtllm-build --checkpoint_dir` reads)
  rank{N}.safetensors per-rank weights with TensorRT-LLM names
  build_config.json  our build settings (names follow trtllm-build's BuildConfig where one exists)
The server reads everything back from these files, never from CLI defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")  # the names of plugins.formats.TORCH_DTYPES (config stays torch-free)
# `builder build --backend` targets (docs/deploy-tensorrt-llm.md): our portable runtime in Triton's python backend,
# TensorRT-LLM 1.2.x's C++ `tensorrtllm` backend over a trtllm-build engine, TensorRT-LLM's PyTorch backend (llmapi).
ENGINE_BACKENDS = ("portable", "tensorrtllm", "trtllm-pytorch")
CHECKPOINT_CONFIG = "config.json"
BUILD_CONFIG = "build_config.json"


@dataclass
class Mapping:
    """Parallel layout of the checkpoint (TensorRT-LLM `mapping`)."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1


@dataclass
class QuantConfig:
    """TensorRT-LLM `quantization` sub-dict (QuantConfig); all None means unquantized."""

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None


@dataclass
class QuantOptions:
    """What `builder build` was asked to quantize (CLI names); resolved into QuantConfig by the converter."""

    quant: str = "none"                  # none, int8_wo, int4_wo, int4_awq, fp8
    kv_cache_dtype: str = "auto"         # auto (model dtype), int8, fp8
    group_size: int | None = None        # int4_awq only: 64 or 128 (default 128)
    exclude_modules: list[str] | None = None  # fnmatch patterns of TRT-LLM module names; default ["lm_head"]
    calib_data: Path | None = None       # calibration text file; default: the bundled corpus
    calib_size: int = 16                 # calibration sequences
    calib_seq_len: int = 256             # tokens per calibration sequence


@dataclass
class ModelConfig:
    """A Llama-family decoder as TensorRT-LLM's PretrainedConfig describes it (config.json of the checkpoint)."""

    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    intermediate_size: int
    max_position_embeddings: int
    norm_epsilon: float = 1e-5
    hidden_act: str = "silu"
    position_embedding_type: str = "rope_gpt_neox"
    rotary_base: float = 10000.0
    rotary_scaling: dict[str, Any] | None = None
    attn_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    logits_dtype: str = "float32"
    use_parallel_embedding: bool = False
    embedding_sharding_dim: int = 0
    qwen_type: str | None = None
    mapping: Mapping = field(default_factory=Mapping)
    quantization: QuantConfig = field(default_factory=QuantConfig)

    def local_heads(self, tp: int | None = None) -> tuple[int, int]:
        """(query heads, KV heads) held by each of tp ranks (default: the mapping's): nq/tp and ceil(nkv/tp), one
        duplicated KV head per rank when tp > nkv."""
        tp = self.mapping.tp_size if tp is None else tp
        return self.num_attention_heads // tp, -(-self.num_key_value_heads // tp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in TensorRT-LLM's config.json layout (None-valued optional keys dropped)."""
        data = asdict(self)
        if data["qwen_type"] is None:
            del data["qwen_type"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a TensorRT-LLM config.json dict; unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["mapping"] = Mapping(**{k: v for k, v in data.get("mapping", {}).items()
                                       if k in Mapping.__dataclass_fields__})
        kwargs["quantization"] = QuantConfig(**{k: v for k, v in (data.get("quantization") or {}).items()
                                                if k in QuantConfig.__dataclass_fields__})
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"engine config.json is incomplete ({exc}); rebuild the engine with `builder build`") from exc


@dataclass
class BuildSettings:
    """Engine limits and runtime defaults chosen at build time (build_config.json)."""

    dtype: str = "auto"  # resolved to the checkpoint's dtype by the converter
    max_batch_size: int = 64
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    kv_cache_memory_mb: int = 256
    kv_cache_free_gpu_mem_fraction: float = 0.9
    device: str = "cpu"

    def validate(self) -> None:
        """Raise ConfigError when settings are inconsistent."""
        if self.dtype not in DTYPES + ("auto",):
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use auto or one of {', '.join(DTYPES)}")
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block",
                     "kv_cache_memory_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_input_len > self.max_seq_len:
            raise ConfigError(f"max_input_len ({self.max_input_len}) must not exceed max_seq_len ({self.max_seq_len})")
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise ConfigError(f"tokens_per_block must be a power of two, got {self.tokens_per_block}")
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ConfigError("kv_cache_free_gpu_mem_fraction must be in (0, 1]")


@dataclass
class EngineConfig:
    """Everything the runtime needs to know about an engine folder."""

    model: ModelConfig
    build: BuildSettings

    def save(self, engine_dir: Path) -> None:
        """Write config.json and build_config.json into engine_dir."""
        engine_dir.mkdir(parents=True, exist_ok=True)
        (engine_dir / CHECKPOINT_CONFIG).write_text(json.dumps(self.model.to_dict(), indent=2) + "\n")
        (engine_dir / BUILD_CONFIG).write_text(json.dumps(asdict(self.build), indent=2) + "\n")

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineConfig":
        """Read an engine folder written by `save`."""
        engine_dir = Path(engine_dir)
        try:
            model = json.loads((engine_dir / CHECKPOINT_CONFIG).read_text())
            build = json.loads((engine_dir / BUILD_CONFIG).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"engine folder {engine_dir} lacks {Path(exc.filename).name}; "
                              "rebuild it with `builder build`") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"engine folder {engine_dir} has invalid JSON ({exc}); rebuild it") from exc
        known = BuildSettings.__dataclass_fields__
        return cls(ModelConfig.from_dict(model), BuildSettings(**{k: v for k, v in build.items() if k in known}))
