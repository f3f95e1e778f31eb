"""What a model family declares (issue #12): its weight table and its config translation.

A family file (builder/models/<family>.py) defines one ArchSpec subclass. Its weight table, a list of WeightSpec
rows, is the one statement of the family's tensors, read by every stage: the converter (HF sources -> engine name,
shapes checked), the tensor-parallel splitter (the row's parallel style), the quantizer (which rows are linears, which
share a calibrated input), the HF exporter (which norm absorbs an AWQ pre-quant scale), the runtime loader (the
engine names and the runtime's own names), the tiny-model maker and the bench roofline (bytes per decode step).
Names: `engine` is TensorRT-LLM's on-disk name; `hf` the source checkpoint's; `runtime` the name the forward pass
uses (the source model's module names: qkv_proj, o_proj, gate_proj, up_proj, down_proj).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from builder.config import Mapping, ModelConfig, QuantConfig
from builder.errors import CheckpointError
from builder.layers.rotary import SUPPORTED_SCALINGS
from builder.models.hf_config import rope_scaling, rope_theta
from builder.quantize.modes import validate_model_quantization

# tensor-parallel styles (builder.models.parallel says how each one splits)
COLUMN, ROW, REPLICATED = "column", "row", "replicated"
QKV = "qkv"      # column parallel with q, k and v heads split separately (KV heads duplicated when tp > nkv)
VOCAB = "vocab"  # column parallel with the rows zero-padded to a multiple of tp
STYLES = (COLUMN, ROW, REPLICATED, QKV, VOCAB)

LAYER_PREFIX = "transformer.layers.{}."
HF_LAYER_PREFIX = "model.layers.{}."
_LAYER = re.compile(r"^transformer\.layers\.\d+\.")


@dataclass(frozen=True)
class WeightSpec:
    """One engine tensor: its name on disk, the HF tensors it is made of (concatenated on dim 0) with their shapes,
    how it splits under tensor parallelism, and for a linear's weight its calibration group."""

    engine: str                               # e.g. transformer.layers.3.attention.qkv.weight
    hf: tuple[str, ...]                       # e.g. model.layers.3.self_attn.{q,k,v}_proj.weight
    hf_shapes: tuple[tuple[int, ...], ...]
    style: str = REPLICATED
    runtime: str = ""                         # the forward pass's name for the module, e.g. qkv_proj
    quant_group: str | None = None            # a quantizable linear's input: linears of one group share statistics
    fold_into: str | None = None              # HF norm weight (per-layer suffix) absorbing an AWQ pre-quant scale
    fields: str = ""                          # the config.json fields that set the shape (for error messages)

    @property
    def shape(self) -> tuple[int, ...]:
        """The engine tensor's full (unsplit) shape."""
        first = self.hf_shapes[0]
        return (sum(s[0] for s in self.hf_shapes), *first[1:])

    @property
    def module(self) -> str:
        """The engine module name (the tensor name without its last part)."""
        return self.engine.rsplit(".", 1)[0]

    @property
    def relative(self) -> str:
        """The engine module name without the layer prefix (attention.qkv, lm_head)."""
        return relative(self.module)

    @property
    def is_linear_weight(self) -> bool:
        """True for a quantizable linear's weight (a quant_algo may apply to it)."""
        return self.quant_group is not None and self.engine.endswith(".weight")

    @property
    def numel(self) -> int:
        """Elements of the full tensor."""
        return math.prod(self.shape)


def relative(name: str) -> str:
    """A name without its transformer.layers.N. prefix."""
    return _LAYER.sub("", name)


def layer_index(name: str) -> int | None:
    """N of a transformer.layers.N. name, None for a global tensor."""
    match = re.match(r"^transformer\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


class ArchSpec:
    """A model family: config.json -> ModelConfig, and the weight table (override layer_weights, and the globals
    when they differ from embedding / final norm / LM head)."""

    name = ""
    tiny_layout: dict[str, Any] = {}  # HF architecture -> its tiny-model choices (builder.checkpoint.tiny.TinySpec)

    def model_config(self, hf_config: dict[str, Any], dtype: str) -> ModelConfig:
        """The engine's ModelConfig for a checked HF config.json dict (builder.models.hf_config.check_hf_config)."""
        raise NotImplementedError

    def layer_weights(self, cfg: ModelConfig, layer: int) -> list[WeightSpec]:
        """The weight table of decoder layer `layer`, in write order."""
        raise NotImplementedError

    def weights(self, cfg: ModelConfig) -> list[WeightSpec]:
        """Every engine tensor in write order: the embedding, each layer's table, the final norm, the LM head."""
        h, v = cfg.hidden_size, cfg.vocab_size
        sizes = f"vocab_size {v}, hidden_size {h}"
        out = [WeightSpec("transformer.vocab_embedding.weight", ("model.embed_tokens.weight",), ((v, h),),
                          runtime="embed_tokens", fields=sizes)]
        for layer in range(cfg.num_hidden_layers):
            out += self.layer_weights(cfg, layer)
        out.append(WeightSpec("transformer.ln_f.weight", ("model.norm.weight",), ((h,),), runtime="norm",
                              fields=f"hidden_size {h}"))
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out.append(WeightSpec("lm_head.weight", (head,), ((v, h),), VOCAB, runtime="lm_head", fields=sizes))
        return out

    def modules(self, cfg: ModelConfig) -> dict[str, WeightSpec]:
        """Relative module name (attention.qkv, lm_head) -> the row of its weight (or its only tensor)."""
        rows = self.layer_weights(cfg, 0) + [w for w in self.weights_outside_layers(cfg)]
        table: dict[str, WeightSpec] = {}
        for row in rows:
            table.setdefault(row.relative, row)
        return table

    def weights_outside_layers(self, cfg: ModelConfig) -> list[WeightSpec]:
        """The global rows (embedding, final norm, LM head), computed without walking the layers."""
        return [w for w in self.weights(_no_layers(cfg)) if layer_index(w.engine) is None]

    def model_class(self) -> type:
        """The class that runs the family (the forward pass); imported by the runtime."""
        raise NotImplementedError

    def decoder_linears(self, cfg: ModelConfig) -> list[tuple[str, int, int, str]]:
        """(module without the layer prefix, out, in, parallel style) of each quantizable decoder linear."""
        return [(row.relative, row.shape[0], row.shape[1], row.style) for row in self.layer_weights(cfg, 0)
                if row.is_linear_weight]

    def stats_keys(self, cfg: ModelConfig) -> dict[str, str]:
        """Quantizable decoder linear -> the module whose calibration statistics it uses: the first linear of its
        quant_group (linears that read the same input share them: mlp.gate uses mlp.fc's)."""
        first: dict[str, str] = {}
        keys = {}
        for row in self.layer_weights(cfg, 0):
            if row.is_linear_weight:
                keys[row.relative] = first.setdefault(row.quant_group, row.relative)
        return keys

    def check_quantization(self, cfg: ModelConfig, tp_size: int = 1) -> None:
        """ConfigError (with a fix) when cfg.quantization cannot be applied to this model at tp_size."""
        validate_model_quantization(cfg, tp_size, self.decoder_linears(cfg))


def _no_layers(cfg: ModelConfig) -> ModelConfig:
    """cfg with zero layers (for the global rows only)."""
    return replace(cfg, num_hidden_layers=0)


def base_model_config(hf_config: dict[str, Any], dtype: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig fields every decoder family reads the same way from a checked config.json, then overrides."""
    hidden, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    fields: dict[str, Any] = dict(
        architecture=hf_config["architectures"][0],
        dtype=dtype,
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(hf_config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf_config.get("num_key_value_heads") or heads),
        head_size=int(hf_config.get("head_dim") or hidden // heads),
        intermediate_size=int(hf_config["intermediate_size"]),
        max_position_embeddings=int(hf_config["max_position_embeddings"]),
        norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
        hidden_act="silu",
        position_embedding_type="rope_gpt_neox",
        rotary_base=rope_theta(hf_config),
        rotary_scaling=rope_scaling(hf_config),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        mapping=Mapping(world_size=1, tp_size=1, pp_size=1),
        quantization=QuantConfig(),
    )
    fields.update(overrides)
    scaling = fields["rotary_scaling"] or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", *SUPPORTED_SCALINGS):
        raise CheckpointError(f"config.json: rope scaling {kind!r} is not supported yet (supported: "
                              f"{', '.join(SUPPORTED_SCALINGS)}); use a checkpoint without it or with one of those")
    return ModelConfig(**fields)
