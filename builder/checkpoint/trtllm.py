"""The one place that knows TensorRT-LLM names: HF config -> ModelConfig, HF tensor names -> TRT-LLM weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from builder.config import DTYPES, Mapping, ModelConfig, QuantConfig
from builder.errors import CheckpointError

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


def model_config_from_hf(hf_config: dict[str, Any], dtype: str) -> ModelConfig:
    """Translate an HF Llama/Mistral/Qwen2 config.json dict into the TensorRT-LLM PretrainedConfig."""
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
        got = [hf_shapes[s] for s in sources[name]]
        fused = (sum(g[0] for g in got), *got[0][1:])
        if tuple(fused) != shape or any(list(g[1:]) != list(got[0][1:]) for g in got):
            raise CheckpointError(f"{' + '.join(sources[name])} has shape {' + '.join(map(str, got))}, expected "
                                  f"{list(shape)} for {name}; config.json does not match the weights")
        plan.append(WeightSpec(name, shape, sources[name]))
    return plan
