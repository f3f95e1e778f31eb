"""Qwen3 (dense): Qwen3ForCausalLM, Llama layers with a per-head RMSNorm on q and k before RoPE and no q/k/v bias;
head_dim is its own config field (0.6B: hidden 1024, 16 heads, head_dim 128); small sizes tie the embeddings.

TensorRT-LLM checkpoint: architecture Qwen3ForCausalLM, QWen family with qwen_type "qwen3", the norms as
attention.q_layernorm.weight / attention.k_layernorm.weight [head_dim].
"""

from __future__ import annotations

from typing import Any

from builder.config import ModelConfig
from builder.layers.decoder import DecoderModel
from builder.models.llama import check_plain_decoder, decoder_layer_weights
from builder.models.spec import ArchSpec, WeightSpec, base_model_config


class Qwen3Model(DecoderModel):
    """The shared decoder with q/k norm."""

    qk_norm = True

    @staticmethod
    def layer_table(cfg: ModelConfig, layer: int) -> list[WeightSpec]:
        """The Llama layer table plus the q/k norms."""
        return decoder_layer_weights(cfg, layer, qk_norm=True)


class Qwen3(ArchSpec):
    """Qwen3ForCausalLM."""

    name = "qwen3"
    tiny_layout = {"Qwen3ForCausalLM": ("qwen3", True, None, "<|endoftext|>", None, "<|endoftext|>", True)}

    def model_config(self, hf_config: dict[str, Any], dtype: str) -> ModelConfig:
        """TensorRT-LLM's QWen PretrainedConfig with qwen_type qwen3."""
        check_plain_decoder(hf_config, bias_ok=False)
        return base_model_config(hf_config, dtype, attn_bias=False, mlp_bias=False, qwen_type="qwen3")

    def layer_weights(self, cfg: ModelConfig, layer: int) -> list[WeightSpec]:
        """Qwen3Model.layer_table."""
        return Qwen3Model.layer_table(cfg, layer)

    def model_class(self) -> type:
        """Qwen3Model."""
        return Qwen3Model


SPEC = Qwen3()
