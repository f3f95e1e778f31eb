"""CLI quantization names -> TensorRT-LLM QuantConfig, group-size rules and module exclusion."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from builder.config import QuantConfig
from builder.errors import ConfigError

# CLI name -> TensorRT-LLM `quant_algo`.
QUANT_MODES: dict[str, str | None] = {
    "none": None,
    "int8_wo": "W8A16",
    "int4_wo": "W4A16",
    "int4_awq": "W4A16_AWQ",
    "fp8": "FP8",
}
# CLI name -> TensorRT-LLM `kv_cache_quant_algo`.
KV_CACHE_MODES: dict[str, str | None] = {"auto": None, "int8": "INT8", "fp8": "FP8"}

# TensorRT-LLM's fine-grained (group-wise) CUTLASS kernels accept only these group sizes.
SUPPORTED_GROUP_SIZES = (64, 128)
DEFAULT_GROUP_SIZE = 128
DEFAULT_EXCLUDE_MODULES = ("lm_head",)
GROUPWISE_ALGOS = ("W4A16_AWQ",)
# TensorRT-LLM module names (weight name minus ".weight") of the linears a quant_algo applies to.
QUANTIZABLE_LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj", "lm_head")
ROW_PARALLEL_LINEARS = ("attention.dense", "mlp.proj")


def resolve_quant_config(quantization: str = "none", kv_cache: str = "auto", group_size: int | None = None,
                         exclude_modules: Sequence[str] | None = None) -> QuantConfig:
    """Turn CLI choices into the checkpoint's `quantization` dict; raise ConfigError on bad input."""
    algo = _lookup(quantization, QUANT_MODES, "--quant")
    kv_algo = _lookup(kv_cache, KV_CACHE_MODES, "--kv-cache-dtype")
    size = _resolve_group_size(algo, quantization, group_size)
    excluded = None
    if algo is not None:
        excluded = list(DEFAULT_EXCLUDE_MODULES if exclude_modules is None else exclude_modules)
    return QuantConfig(quant_algo=algo, kv_cache_quant_algo=kv_algo, group_size=size, has_zero_point=False,
                       pre_quant_scale=algo == "W4A16_AWQ", exclude_modules=excluded)


def _lookup(name: str, table: dict[str, str | None], flag: str) -> str | None:
    """Map a CLI name through table or raise a ConfigError listing the choices."""
    if name not in table:
        raise ConfigError(f"{flag} {name!r} is not supported; choose one of {', '.join(table)}")
    return table[name]


def _resolve_group_size(algo: str | None, mode: str, group_size: int | None) -> int:
    """Default or validate the group size; it only applies to group-wise algorithms."""
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if algo not in GROUPWISE_ALGOS:
        raise ConfigError(f"--group-size only applies to int4_awq (group-wise); {mode} quantizes per channel, "
                          "drop --group-size")
    validate_group_size(group_size)
    return group_size


def validate_group_size(group_size: int) -> None:
    """Raise ConfigError unless TensorRT-LLM's group-wise kernels support group_size."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(f"group size {group_size} is not supported; use 64 or 128 (TensorRT-LLM's group-wise "
                          "int4 kernels implement only these)")


def check_group_divisible(name: str, in_features: int, group_size: int, tp_size: int = 1,
                          row_parallel: bool = False) -> None:
    """Raise ConfigError when a group-wise linear's per-rank input width is not a multiple of group_size."""
    if row_parallel and in_features % tp_size:
        raise ConfigError(f"{name}: in_features {in_features} is not divisible by tp_size {tp_size}; "
                          "choose a tp_size that divides it")
    local = in_features // tp_size if row_parallel else in_features
    if local % group_size:
        where = f"in_features/tp_size = {in_features}/{tp_size} = {local}" if row_parallel else \
            f"in_features {in_features}"
        raise ConfigError(f"{name}: {where} is not a multiple of group size {group_size}; use a smaller "
                          "--group-size, a smaller tp_size, or add the layer to --exclude-modules")


def is_excluded(trtllm_name: str, patterns: Sequence[str] | None) -> bool:
    """True when a TensorRT-LLM module name matches one of the fnmatch patterns (as TensorRT-LLM matches them)."""
    return any(fnmatch.fnmatchcase(trtllm_name, pattern) for pattern in patterns or ())


def is_row_parallel(trtllm_name: str) -> bool:
    """True for linears split along their input dimension under tensor parallelism (dense, proj)."""
    return trtllm_name.endswith(ROW_PARALLEL_LINEARS)


def linear_quant_algo(config: QuantConfig, trtllm_name: str) -> str | None:
    """The quant_algo that applies to one module (None when unquantized, excluded or not a linear)."""
    if config.quant_algo is None or not trtllm_name.endswith(QUANTIZABLE_LINEARS):
        return None
    return None if is_excluded(trtllm_name, config.exclude_modules) else config.quant_algo
