"""The Llama family: LlamaForCausalLM (Llama 2 / 3 / 3.1 / 3.2), MistralForCausalLM, Qwen2ForCausalLM.

One file holds what the family is: config.json -> ModelConfig, the weight table every stage reads
(builder.models.spec), the forward pass on the shared layers (builder.layers), and the tiny-model layout.
Pre-norm decoder layers: RMSNorm -> q/k/v (fused, GQA, RoPE; Qwen2 has a q/k/v bias) -> paged attention -> o_proj,
RMSNorm -> SwiGLU MLP (gate_proj, up_proj fused on the GPU, down_proj).
"""

from __future__ import annotations

from typing import Any

from builder.config import ModelConfig
from builder.errors import CheckpointError
from builder.layers.decoder import DecoderModel
from builder.models.spec import (COLUMN, HF_LAYER_PREFIX, LAYER_PREFIX, QKV, ROW, ArchSpec, WeightSpec,
                                 base_model_config)


def attention_fields(cfg: ModelConfig) -> str:
    """The config fields that set the attention tensors' shapes."""
    return (f"num_attention_heads {cfg.num_attention_heads}, num_key_value_heads {cfg.num_key_value_heads}, "
            f"head_dim {cfg.head_size}, hidden_size {cfg.hidden_size}")


def decoder_layer_weights(cfg: ModelConfig, layer: int, qk_norm: bool = False) -> list[WeightSpec]:
    """A Llama-style layer's table (qk_norm: per-head RMSNorm weights on q and k, as Qwen3 and Gemma 3 have)."""
    p, hp = LAYER_PREFIX.format(layer), HF_LAYER_PREFIX.format(layer)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn, mlp, hidden = attention_fields(cfg), f"intermediate_size {i}, hidden_size {h}", f"hidden_size {h}"
    qkv_sources = tuple(f"{hp}self_attn.{x}_proj.weight" for x in "qkv")
    rows = [WeightSpec(p + "input_layernorm.weight", (hp + "input_layernorm.weight",), ((h,),),
                       runtime="input_layernorm", fields=hidden),
            WeightSpec(p + "attention.qkv.weight", qkv_sources, ((q, h), (kv, h), (kv, h)), QKV, "qkv_proj",
                       "attn_in", "input_layernorm", attn)]
    if cfg.attn_bias:
        rows.append(WeightSpec(p + "attention.qkv.bias", tuple(s.replace(".weight", ".bias") for s in qkv_sources),
                               ((q,), (kv,), (kv,)), QKV, "qkv_proj", fields=attn))
    if qk_norm:
        rows += [WeightSpec(p + "attention.q_layernorm.weight", (hp + "self_attn.q_norm.weight",), ((d,),),
                            runtime="q_norm", fields=f"head_dim {d}"),
                 WeightSpec(p + "attention.k_layernorm.weight", (hp + "self_attn.k_norm.weight",), ((d,),),
                            runtime="k_norm", fields=f"head_dim {d}")]
    rows += [WeightSpec(p + "attention.dense.weight", (hp + "self_attn.o_proj.weight",), ((h, q),), ROW, "o_proj",
                        "attn_out", None, attn),
             WeightSpec(p + "post_layernorm.weight", (hp + "post_attention_layernorm.weight",), ((h,),),
                        runtime="post_attention_layernorm", fields=hidden),
             WeightSpec(p + "mlp.fc.weight", (hp + "mlp.gate_proj.weight",), ((i, h),), COLUMN, "gate_proj", "mlp_in",
                        "post_attention_layernorm", mlp),
             WeightSpec(p + "mlp.gate.weight", (hp + "mlp.up_proj.weight",), ((i, h),), COLUMN, "up_proj", "mlp_in",
                        "post_attention_layernorm", mlp),
             WeightSpec(p + "mlp.proj.weight", (hp + "mlp.down_proj.weight",), ((h, i),), ROW, "down_proj", "mlp_act",
                        None, mlp)]
    return rows


def check_plain_decoder(hf_config: dict[str, Any], bias_ok: bool) -> None:
    """CheckpointError for the variants this family's layers do not run (linear biases, activations other than SiLU)."""
    arch = hf_config["architectures"][0]
    if hf_config.get("mlp_bias") or (not bias_ok and hf_config.get("attention_bias")):
        raise CheckpointError(f"{arch} with mlp_bias/attention_bias is not supported; use a checkpoint without "
                              "linear-layer biases")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act {act!r} is not supported (only silu); use a standard {arch} checkpoint")


class LlamaModel(DecoderModel):
    """The Llama-family forward pass: builder.layers.decoder.DecoderModel as it is."""

    @staticmethod
    def layer_table(cfg: ModelConfig, layer: int) -> list[WeightSpec]:
        """decoder_layer_weights."""
        return decoder_layer_weights(cfg, layer)


class Llama(ArchSpec):
    """Llama, Mistral (Llama layers; no sliding window within the served lengths) and Qwen2 (q/k/v bias)."""

    name = "llama"
    tiny_layout = {
        # architecture: (HF model_type, byte-level BPE, bos, eos, unk, pad, tied embeddings)
        "LlamaForCausalLM": ("llama", True, "<|begin_of_text|>", "<|end_of_text|>", None, "<|end_of_text|>", False),
        "MistralForCausalLM": ("mistral", False, "<s>", "</s>", "<unk>", "</s>", False),
        "Qwen2ForCausalLM": ("qwen2", True, None, "<|endoftext|>", None, "<|endoftext|>", True),
    }

    def model_config(self, hf_config: dict[str, Any], dtype: str) -> ModelConfig:
        """TensorRT-LLM's LLaMA / QWen (qwen_type qwen2) PretrainedConfig."""
        qwen2 = hf_config["architectures"][0] == "Qwen2ForCausalLM"
        check_plain_decoder(hf_config, bias_ok=qwen2)
        return base_model_config(hf_config, dtype, attn_bias=qwen2, mlp_bias=False,
                                 qwen_type="qwen2" if qwen2 else None)

    def layer_weights(self, cfg: ModelConfig, layer: int) -> list[WeightSpec]:
        """RMSNorm, fused q/k/v (+ bias for Qwen2), o_proj, RMSNorm, gate/up/down."""
        return decoder_layer_weights(cfg, layer)

    def model_class(self) -> type:
        """LlamaModel."""
        return LlamaModel


SPEC = Llama()
