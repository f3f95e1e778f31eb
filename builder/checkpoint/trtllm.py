"""The one place that knows TensorRT-LLM names: HF config -> ModelConfig, HF tensor names -> TRT-LLM weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from builder.checkpoint.shard import shard_shape
from builder.config import DTYPES, Mapping, ModelConfig, QuantConfig
from builder.errors import CheckpointError
from builder.quantize.modes import linear_quant_algo
from plugins.formats import TORCH_DTYPES

# HF per-layer suffix -> TRT-LLM per-layer suffix (q/k/v are fused separately into attention.qkv).
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "attention.dense.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.fc.weight",  # the SiLU branch
    "mlp.up_proj.weight": "mlp.gate.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
EMBED = "model.embed_tokens.weight"
GLOBAL_NAMES = {EMBED: "transformer.vocab_embedding.weight", "model.norm.weight": "transformer.ln_f.weight"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exports still contain
# Bound on config.json's max_position_embeddings (4M tokens; the longest supported models have ~1M): `builder build`
# takes max_seq_len from it by default, and an absurd value would otherwise fail only when the server allocates.
MAX_POSITION_EMBEDDINGS = 2**22
REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")  # absent or null: derived / unused
ROPE_SIZES = ("original_max_position_embeddings",)
ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings")}


@dataclass(frozen=True)
class WeightSpec:
    """One TRT-LLM tensor: its name, expected shape, and the HF tensors it is made from (concatenated on dim 0)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]


def hf_dtype(hf_config: dict[str, Any]) -> str | None:
    """The checkpoint dtype named in an HF config (`dtype` or `torch_dtype`), or None if absent."""
    value = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if value is None:
        return None
    value = str(value).removeprefix("torch.")
    if value not in DTYPES:
        raise CheckpointError(f"config.json dtype {value!r} is not supported; pass --dtype with one of "
                              f"{', '.join(DTYPES)}")
    return value


def _rope_dicts(hf_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rope dicts an HF config may carry: transformers 5 `rope_parameters`, older `rope_scaling`."""
    return [d for d in (hf_config.get("rope_parameters"), hf_config.get("rope_scaling")) if isinstance(d, dict)]


def rope_theta(hf_config: dict[str, Any]) -> float:
    """RoPE base: top-level `rope_theta`, else the one inside rope_parameters/rope_scaling, else 10000."""
    if hf_config.get("rope_theta") is not None:
        return float(hf_config["rope_theta"])
    for d in _rope_dicts(hf_config):
        if d.get("rope_theta") is not None:
            return float(d["rope_theta"])
    return 10000.0


def rope_scaling(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """HF rope scaling (minus rope_theta) when it is a real scaling, None for plain/default RoPE."""
    for d in _rope_dicts(hf_config):
        kind = d.get("rope_type", d.get("type"))
        if kind not in (None, "default"):
            return {k: v for k, v in d.items() if k != "rope_theta"}
    return None


def _require(hf_config: dict[str, Any], key: str) -> Any:
    """hf_config[key], or CheckpointError saying which field config.json lacks."""
    if hf_config.get(key) is None:
        raise CheckpointError(f"config.json lacks {key!r}; restore the config.json of the original model")
    return hf_config[key]


def _bad_field(key: str, value: Any, want: str) -> CheckpointError:
    """The one-line error for a config.json field of the wrong type or value."""
    return CheckpointError(f"config.json: {key} must be {want}, got {value!r} ({type(value).__name__}); "
                           "restore the config.json of the original model or correct that field")


def _positive_int(key: str, value: Any) -> int:
    """value when it is an int >= 1 (JSON true/false and 64.0 are not), else CheckpointError naming key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad_field(key, value, "a positive integer")
    return value


def _positive_number(key: str, value: Any) -> float:
    """value as a float when it is a finite number > 0 (not a bool or a string), else CheckpointError naming key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad_field(key, value, "a finite number > 0")
    return float(value)


def _check_rope_dict(key: str, rope: Any) -> None:
    """A rope_scaling / rope_parameters dict: numbers finite, factors > 0, the keys the rope type needs present."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise _bad_field(key, rope, "an object such as {\"rope_type\": \"linear\", \"factor\": 2.0}, or null")
    kind = rope.get("rope_type", rope.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise _bad_field(f"{key}.rope_type", kind, "a string")
    for name in ROPE_REQUIRED.get(kind, ()):
        if rope.get(name) is None:
            raise CheckpointError(f"config.json: {key} of rope_type {kind!r} lacks {name!r}; restore the "
                                  "config.json of the original model")
    for name, value in rope.items():
        if name in ROPE_SIZES and value is not None:
            _positive_int(f"{key}.{name}", value)
        elif (name == "factor" or name.endswith("_factor")) and isinstance(value, list):
            for item in value:  # longrope's short_factor / long_factor
                _positive_number(f"{key}.{name}", item)
        elif name == "factor" or name.endswith("_factor") or name == "rope_theta":
            if value is not None:
                _positive_number(f"{key}.{name}", value)
        elif isinstance(value, float) and not math.isfinite(value):  # beta_fast, mscale, ...
            raise _bad_field(f"{key}.{name}", value, "a finite number")
    if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise CheckpointError(f"config.json: {key}.high_freq_factor ({rope['high_freq_factor']}) must exceed "
                              f"low_freq_factor ({rope['low_freq_factor']}); restore the config.json of the "
                              "original model")


def check_hf_config(hf_config: dict[str, Any]) -> None:
    """Check the config.json fields the conversion uses, before anything is written: CheckpointError naming the field.

    Sizes are positive integers (not strings, floats or booleans), heads divide as attention needs them
    (hidden_size by num_attention_heads when head_dim is absent, num_attention_heads by num_key_value_heads),
    max_position_embeddings is at most MAX_POSITION_EMBEDDINGS, rope_theta and rms_norm_eps are finite and > 0,
    and rope scaling factors are finite and positive.
    """
    for key in REQUIRED_SIZES:
        _positive_int(key, _require(hf_config, key))
    for key in OPTIONAL_SIZES:
        if hf_config.get(key) is not None:
            _positive_int(key, hf_config[key])
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if hf_config.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                              f"({heads}) and there is no head_dim; restore the config.json of the original model")
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                              f"({kv_heads}); restore the config.json of the original model")
    positions = hf_config["max_position_embeddings"]
    if positions > MAX_POSITION_EMBEDDINGS:
        raise CheckpointError(f"config.json: max_position_embeddings {positions} is beyond {MAX_POSITION_EMBEDDINGS} "
                              "(builder's bound; --max-seq-len defaults to it); restore the config.json of the "
                              "original model or correct that field")
    for key in ("rope_theta", "rms_norm_eps"):
        if hf_config.get(key) is not None:
            _positive_number(key, hf_config[key])
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope_dict(key, hf_config.get(key))
    for key in ("tie_word_embeddings", "mlp_bias", "attention_bias", "use_sliding_window"):
        if hf_config.get(key) is not None and not isinstance(hf_config[key], bool):
            raise _bad_field(key, hf_config[key], "true or false")


def model_config_from_hf(hf_config: dict[str, Any], dtype: str) -> ModelConfig:
    """Translate an HF Llama/Mistral/Qwen2 config.json dict into the TensorRT-LLM PretrainedConfig (checked first by
    check_hf_config)."""
    check_hf_config(hf_config)
    arch = hf_config["architectures"][0]
    qwen2 = arch == "Qwen2ForCausalLM"
    hidden, heads = int(_require(hf_config, "hidden_size")), int(_require(hf_config, "num_attention_heads"))
    if hf_config.get("mlp_bias") or (not qwen2 and hf_config.get("attention_bias")):
        raise CheckpointError(f"{arch} with mlp_bias/attention_bias is not supported; use a checkpoint without "
                              "linear-layer biases")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (only silu); use a standard {arch} checkpoint")
    return ModelConfig(
        architecture=arch,
        dtype=dtype,
        vocab_size=int(_require(hf_config, "vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(_require(hf_config, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_size=int(hf_config.get("head_dim") or hidden // heads),
        intermediate_size=int(_require(hf_config, "intermediate_size")),
        max_position_embeddings=int(_require(hf_config, "max_position_embeddings")),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        hidden_act="silu",
        position_embedding_type="rope_gpt_neox",
        rotary_base=rope_theta(hf_config),
        rotary_scaling=rope_scaling(hf_config),
        attn_bias=qwen2,
        mlp_bias=False,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qwen_type="qwen2" if qwen2 else None,
        mapping=Mapping(world_size=1, tp_size=1, pp_size=1),
        quantization=QuantConfig(),
    )


def expected_weights(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """TRT-LLM name -> full (unsplit) shape of every tensor; per-rank shapes: builder.checkpoint.shard.shard_shape."""
    h, v, i, d = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    out: dict[str, tuple[int, ...]] = {"transformer.vocab_embedding.weight": (v, h)}
    for layer in range(cfg.num_hidden_layers):
        p = f"transformer.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "attention.qkv.weight"] = (qkv, h)
        if cfg.attn_bias:
            out[p + "attention.qkv.bias"] = (qkv,)
        out[p + "attention.dense.weight"] = (h, cfg.num_attention_heads * d)
        out[p + "post_layernorm.weight"] = (h,)
        out[p + "mlp.fc.weight"] = (i, h)
        out[p + "mlp.gate.weight"] = (i, h)
        out[p + "mlp.proj.weight"] = (h, i)
    out["transformer.ln_f.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def _sources(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """TRT-LLM name -> HF tensor names it is built from, in concatenation order."""
    src: dict[str, tuple[str, ...]] = {trt: (hf,) for hf, trt in GLOBAL_NAMES.items()}
    for layer in range(cfg.num_hidden_layers):
        hp, tp = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        for hf, trt in LAYER_NAMES.items():
            src[tp + trt] = (hp + hf,)
        src[tp + "attention.qkv.weight"] = tuple(f"{hp}self_attn.{x}_proj.weight" for x in "qkv")
        if cfg.attn_bias:
            src[tp + "attention.qkv.bias"] = tuple(f"{hp}self_attn.{x}_proj.bias" for x in "qkv")
    src["lm_head.weight"] = (EMBED,) if cfg.tie_word_embeddings else ("lm_head.weight",)
    return src


def plan_weights(cfg: ModelConfig, hf_shapes: dict[str, list[int]]) -> list[WeightSpec]:
    """Conversion plan checked against the HF tensor shapes; CheckpointError on missing/extra/misshaped tensors."""
    sources = _sources(cfg)
    used = {hf for srcs in sources.values() for hf in srcs}
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints still store it; the embedding is used
    extra = sorted(n for n in hf_shapes if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"unexpected tensors for {cfg.architecture}: {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''}; the checkpoint does not match its config.json")
    plan = []
    for name, shape in expected_weights(cfg).items():
        missing = [s for s in sources[name] if s not in hf_shapes]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}; download the complete checkpoint")
        for source, want in zip(sources[name], _source_shapes(cfg, name, shape), strict=True):
            if tuple(hf_shapes[source]) != want:
                raise CheckpointError(f"{source} has shape {list(hf_shapes[source])}, but config.json "
                                      f"({_shape_fields(cfg, name)}) implies {list(want)}; the weights do not "
                                      "match config.json: restore the original config.json and weights")
        plan.append(WeightSpec(name, shape, sources[name]))
    return plan


def _source_shapes(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Expected shape of each HF tensor that TRT-LLM tensor `name` (full shape `shape`) is made from."""
    if name.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        q, kv = cfg.num_attention_heads * cfg.head_size, cfg.num_key_value_heads * cfg.head_size
        return [(rows, *shape[1:]) for rows in (q, kv, kv)]
    return [shape]


def _shape_fields(cfg: ModelConfig, name: str) -> str:
    """The config.json fields that determine the shape of TRT-LLM tensor `name`, with their values."""
    h = f"hidden_size {cfg.hidden_size}"
    if name.endswith(("vocab_embedding.weight", "lm_head.weight")):
        return f"vocab_size {cfg.vocab_size}, {h}"
    if ".attention." in name:
        return (f"num_attention_heads {cfg.num_attention_heads}, num_key_value_heads {cfg.num_key_value_heads}, "
                f"head_dim {cfg.head_size}, {h}")
    if ".mlp." in name:
        return f"intermediate_size {cfg.intermediate_size}, {h}"
    return h


# ---- per-rank checkpoint layout (quantization included) -----------------------------------------------------------

KV_SCALE_SUFFIX = "attention.kv_cache_scaling_factor"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a rank{N}.safetensors: name, dtype, per-rank shape, and the float tensor it is made from.

    `source` is the full-model TRT-LLM float tensor (a WeightSpec name) for weights and their quantization
    tensors, or the tensor's own name for a per-layer KV-cache scale.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str


def quantized_linear_layout(algo: str | None, out: int, in_features: int, group_size: int,
                            dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of one rank's linear [out, in] under quant_algo (trtllm-checkpoint.md section 3).

    W8A16/W4A16 keep the float weight (trtllm-build quantizes it); W4A16_AWQ: int8 [out/2, in] packed int4,
    fp32 [out, in/g] group scales, model-dtype [in] prequant scale; FP8: e4m3 [out, in] + fp32 [1] scales.
    """
    if algo == "W4A16_AWQ":
        return [("weight", torch.int8, (out // 2, in_features)),
                ("weights_scaling_factor", torch.float32, (out, in_features // group_size)),
                ("prequant_scaling_factor", dtype, (in_features,))]
    if algo == "FP8":
        return [("weight", torch.float8_e4m3fn, (out, in_features)),
                ("weights_scaling_factor", torch.float32, (1,)),
                ("activation_scaling_factor", torch.float32, (1,))]
    return [("weight", dtype, (out, in_features))]


def rank_layout(cfg: ModelConfig, full_shapes: dict[str, tuple[int, ...]], tp: int) -> list[TensorSpec]:
    """Every tensor of one rank's file, in write order, from the full float shapes (plan_weights/expected_weights).

    The layout is the same on every rank. Quantized linears follow cfg.quantization (exclude_modules honoured);
    with a quantized KV cache each layer also holds `attention.kv_cache_scaling_factor` fp32 [1].
    """
    quant, dtype = cfg.quantization, TORCH_DTYPES[cfg.dtype]
    specs = []
    for name, shape in full_shapes.items():
        module, suffix = name.rsplit(".", 1)
        if quant.kv_cache_quant_algo is not None and module.endswith(".post_layernorm"):
            kv_name = module.removesuffix("post_layernorm") + KV_SCALE_SUFFIX
            specs.append(TensorSpec(kv_name, torch.float32, (1,), kv_name))
        local = shard_shape(name, shape, cfg, tp)
        algo = linear_quant_algo(quant, module) if suffix == "weight" and len(local) == 2 else None
        if algo is None:
            specs.append(TensorSpec(name, dtype, tuple(local), name))
            continue
        for part, part_dtype, part_shape in quantized_linear_layout(algo, local[0], local[1], quant.group_size, dtype):
            specs.append(TensorSpec(f"{module}.{part}", part_dtype, part_shape, name))
    return specs
