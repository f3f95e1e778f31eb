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


def linear_quant_algo(config: QuantConfig, trtllm_name: str) -> str | None:
    """The quant_algo that applies to the linear module `trtllm_name` (None when unquantized or excluded); which
    modules are quantizable linears is the family's weight table's to say (builder.models.spec.WeightSpec)."""
    if config.quant_algo is None:
        return None
    return None if is_excluded(trtllm_name, config.exclude_modules) else config.quant_algo


CALIBRATED_ALGOS = ("W4A16_AWQ", "FP8")  # need activation statistics (KV-cache quantization needs them too)


def needs_calibration(config: QuantConfig) -> bool:
    """True when the checkpoint needs calibrated activation statistics (AWQ, FP8, INT8/FP8 KV cache)."""
    return config.quant_algo in CALIBRATED_ALGOS or config.kv_cache_quant_algo is not None


def validate_model_quantization(cfg, tp_size: int, linears: Sequence[tuple[str, int, int, str]]) -> None:
    """Raise ConfigError (with a fix) when cfg.quantization cannot be applied to this model at tp_size.

    linears: (module without the layer prefix, out, in, parallel style) of each quantizable decoder linear, from the
    family's weight table (builder.models.spec.ArchSpec.decoder_linears).

    Checks: lm_head stays excluded (no mode quantizes it: TensorRT-LLM's weight-only build never does, and the
    calibrated modes are not wired for it); for int4_awq every quantized linear's per-rank input width is a
    multiple of the group size and its per-rank output rows are even (two rows per packed byte).
    """
    config = cfg.quantization
    if config.quant_algo not in QUANT_MODES.values() or config.kv_cache_quant_algo not in KV_CACHE_MODES.values():
        raise ConfigError(f"quantization {config.quant_algo}/{config.kv_cache_quant_algo} is not supported; "
                          f"quant_algo must be one of {', '.join(str(a) for a in QUANT_MODES.values())} and "
                          "kv_cache_quant_algo one of None, INT8, FP8 (rebuild with `builder build --quant ...`)")
    if config.quant_algo is None:
        return
    if linear_quant_algo(config, "lm_head") is not None:
        raise ConfigError("quantizing lm_head is not supported (TensorRT-LLM keeps it in the model dtype by "
                          "default); keep 'lm_head' in --exclude-modules")
    if config.quant_algo not in GROUPWISE_ALGOS:
        return
    problems = _awq_width_problems(cfg, config.group_size, tp_size, linears)
    if not problems:
        return
    fixes = []
    sizes = [g for g in SUPPORTED_GROUP_SIZES
             if g != config.group_size and not _awq_width_problems(cfg, g, tp_size, linears)]
    if sizes:
        fixes.append(f"--group-size {sizes[0]}")
    tps = [t for t in _valid_tps(cfg)
           if t != tp_size and not _awq_width_problems(cfg, config.group_size, t, linears)]
    if tps:
        fixes.append(f"--tp {' or '.join(map(str, tps))}")
    module = problems[0].split(":")[0]
    fixes.append(f"keep the layer unquantized with --exclude-modules lm_head 'transformer.layers.*.{module}'")
    raise ConfigError(f"int4_awq with --group-size {config.group_size} at --tp {tp_size}: {problems[0]}; "
                      f"use {', or '.join(fixes)}")


def _awq_width_problems(cfg, group_size: int, tp_size: int, linears: Sequence[tuple[str, int, int, str]]) -> list[str]:
    """Why group-wise int4 does not fit the quantized linears at (group_size, tp_size); empty when it does."""
    problems = []
    for layer in range(cfg.num_hidden_layers):
        for module, out, in_features, style in linears:
            if linear_quant_algo(cfg.quantization, f"transformer.layers.{layer}.{module}") is None:
                continue
            row = style == "row"
            local_in = in_features // tp_size if row else in_features
            if in_features % tp_size if row else False:
                problems.append(f"{module}: {in_features} input features do not split over tp {tp_size}")
            elif local_in % group_size:
                where = f"{in_features}/{tp_size} = {local_in}" if row and tp_size > 1 else f"{in_features}"
                problems.append(f"{module}: input features per rank ({where}) are not a multiple of the group size "
                                f"{group_size}")
            elif _local_out(cfg, out, style, tp_size) % 2:
                problems.append(f"{module}: {_local_out(cfg, out, style, tp_size)} output rows per rank are "
                                "odd, but int4 packs two rows per byte")
    return problems


def _local_out(cfg, out: int, style: str, tp_size: int) -> int:
    """Output rows of a linear on one rank (qkv: local query heads + duplicated-or-split KV heads)."""
    row = style == "row"
    if style == "qkv":
        return (cfg.num_attention_heads // tp_size + 2 * -(-cfg.num_key_value_heads // tp_size)) * cfg.head_size
    return out if row else out // tp_size


def _valid_tps(cfg) -> list[int]:
    """Tensor-parallel sizes this model's heads and MLP split into."""
    nq, nkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return [t for t in range(1, nq + 1) if not nq % t and not (nkv % t and t % nkv) and not inter % t]
