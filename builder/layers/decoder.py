"""The shared pre-norm decoder (issue #12): a flat token batch through RMSNorm -> attention -> RMSNorm -> SwiGLU
layers over a paged KV cache, with attention metadata passed in explicitly.

Family files (builder/models/<family>.py) subclass DecoderModel and set what differs as flags (qk_norm: per-head
RMSNorm on q and k before RoPE) or override one step. Layer tensors are picked by the family's weight table: each row
gives the engine name on disk and the runtime name used here (the source model's: qkv_proj, o_proj, gate_proj,
up_proj, down_proj). The same layer code runs the engine and the build's calibration (run_layer with observed
linears, builder.checkpoint.calibration), so there is one forward pass.

Under tensor parallelism (cfg.mapping.tp_size > 1) the weights are this rank's shard: local query/KV heads and MLP
columns; `all_reduce` sums the row-parallel outputs (o_proj, down_proj) across ranks before their biases are added,
and compute_logits returns this rank's slice of the (padded) vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

import plugins
from builder.config import ModelConfig
from builder.errors import ConfigError
from builder.layers.kv_cache import KVCacheSpec
from builder.layers.linear import Linear
from builder.layers.rotary import rope_tables
from builder.quantize.modes import linear_quant_algo

LOGITS_CHUNK_ROWS = 8192  # vocab rows of lm_head upcast to float32 at a time
ROW_STYLE = "row"         # builder.models.spec.ROW: the input dimension is split across ranks
REPLICATED_STYLE = "replicated"
LAYER_PREFIX = re.compile(r"^transformer\.layers\.\d+\.")


@dataclass
class DecoderLayer:
    """One decoder layer's tensors under their runtime names (the family's weight table maps engine names here)."""

    input_layernorm: torch.Tensor
    qkv_proj: Linear
    o_proj: Linear
    post_attention_layernorm: torch.Tensor
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    kv_scale: torch.Tensor | None = None      # attention.kv_cache_scaling_factor fp32 [1] (INT8/FP8 KV cache)
    q_norm: torch.Tensor | None = None        # per-head RMSNorm weights [head_size] (qk_norm families)
    k_norm: torch.Tensor | None = None
    gate_up_proj: Linear | None = None        # [gate; up] in one weight (GPU, unquantized): one GEMM + fused SwiGLU

    @classmethod
    def from_table(cls, weights: dict[str, torch.Tensor], rows: Sequence[Any], cfg: ModelConfig,
                   all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "DecoderLayer":
        """The layer's tensors out of the engine's weight dict, as the table's rows (builder.models.spec.WeightSpec:
        engine, runtime, style, quant_group) name them; linears quantized per cfg.quantization."""
        quant, dtype = cfg.quantization, getattr(torch, cfg.dtype)
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        prefix = LAYER_PREFIX.match(rows[0].engine).group(0)
        for row in rows:
            if row.runtime not in known:
                raise ConfigError(f"{row.engine}: the decoder has no {row.runtime!r}; the family's weight table and "
                                  "builder.layers.decoder disagree (please report this bug)")
            if row.runtime in values:
                continue  # a linear's bias row: loaded with its weight
            if row.style == REPLICATED_STYLE:  # norms
                values[row.runtime] = weights[row.engine]
                continue
            module = row.engine.rsplit(".", 1)[0]
            row_amax = all_reduce_max if row.style == ROW_STYLE else None
            values[row.runtime] = Linear.load(weights, module, linear_quant_algo(quant, module), quant.group_size,
                                              dtype, row_amax)
        kv_name = prefix + "attention.kv_cache_scaling_factor"
        kv_scale = weights.get(kv_name) if quant.kv_cache_quant_algo else None
        if quant.kv_cache_quant_algo and kv_scale is None:
            raise ConfigError(f"{kv_name} is missing for the {quant.kv_cache_quant_algo} KV cache; rebuild the engine")
        layer = cls(**values, kv_scale=None if kv_scale is None else kv_scale.float())
        layer.gate_up_proj = fuse_gate_up(layer.gate_proj, layer.up_proj, dtype)
        return layer


def fuse_gate_up(gate: Linear, up: Linear, dtype: torch.dtype) -> Linear | None:
    """One [gate; up] linear for the GPU kernels (unquantized, no biases), else None.

    gate and up become views of the fused weight, so it costs no memory; on the CPU the reference keeps two GEMMs."""
    plain = isinstance(gate.weight, torch.Tensor) and isinstance(up.weight, torch.Tensor)
    if not plain or gate.bias is not None or up.bias is not None or not plugins.uses_gpu_kernels(gate.weight, dtype):
        return None
    fused = torch.cat([gate.weight, up.weight])
    gate.weight, up.weight = fused[:gate.weight.shape[0]], fused[gate.weight.shape[0]:]
    return Linear(fused)


def gpu_logits(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] @ lm_head^T with a float32 result, without upcasting lm_head (CUDA, fp16/bf16)."""
    try:
        return torch.mm(hidden, lm_head.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # a torch without mm.dtype: logits rounded to the model dtype, as HF's
        return F.linear(hidden, lm_head).float()


class DecoderModel:
    """Forward pass of a pre-norm RMSNorm / GQA + RoPE / SwiGLU decoder; attention metadata and KV cache are passed
    in explicitly. Subclasses (one per family) set `qk_norm` and supply the weight table through `layer_table`."""

    qk_norm = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    kv_observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # sees K (before RoPE) and V: calibration

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Bind the weights and precompute the RoPE tables for positions < max_positions."""
        self._setup(cfg, all_reduce)
        self.embedding = weights["transformer.vocab_embedding.weight"]
        self.final_norm = weights["transformer.ln_f.weight"]
        self.lm_head = weights["lm_head.weight"]
        row_amax = all_reduce_max if cfg.mapping.tp_size > 1 else None
        self.layers = [DecoderLayer.from_table(weights, self.layer_table(cfg, i), cfg, row_amax)
                       for i in range(cfg.num_hidden_layers)]
        self.cos, self.sin = rope_tables(cfg, max_positions, device)

    @classmethod
    def without_weights(cls, cfg: ModelConfig, max_positions: int, device: torch.device) -> "DecoderModel":
        """The model's layer code and RoPE tables alone, to run layers one at a time (run_layer: calibration)."""
        model = cls.__new__(cls)
        model._setup(cfg, None)
        model.layers = []
        model.cos, model.sin = rope_tables(cfg, max_positions, device)
        return model

    def _setup(self, cfg: ModelConfig, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        if cfg.hidden_act != "silu" or cfg.position_embedding_type != "rope_gpt_neox":
            raise ConfigError(f"model uses hidden_act={cfg.hidden_act!r}, position_embedding_type="
                              f"{cfg.position_embedding_type!r}; this runtime runs silu + rope_gpt_neox models only")
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = cfg.local_heads()
        self.all_reduce = all_reduce if all_reduce is not None and cfg.mapping.tp_size > 1 else None
        self.scale = cfg.head_size ** -0.5

    @staticmethod
    def layer_table(cfg: ModelConfig, layer: int) -> Sequence[Any]:
        """The weight-table rows of layer `layer` (the family's ArchSpec.layer_weights)."""
        raise NotImplementedError

    @staticmethod
    def kv_cache_spec(cfg: ModelConfig) -> KVCacheSpec:
        """The cache one rank of this model needs per token: every layer's K and V of its local KV heads."""
        return KVCacheSpec(cfg.num_hidden_layers, cfg.local_heads()[1], cfg.head_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: plugins.AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [T, H] of the flat batch; kv_cache is [layers, 2, blocks, tpb, nkv, d]."""
        hidden, residual = F.embedding(input_ids, self.embedding), None
        for index, layer in enumerate(self.layers):
            hidden, residual = self.run_layer(layer, hidden, residual, positions, kv_cache[index], meta)
        normed, _ = plugins.fused_add_rms_norm(hidden, residual, self.final_norm, self.cfg.norm_epsilon)
        return normed

    def run_layer(self, w: DecoderLayer, hidden: torch.Tensor, residual: torch.Tensor | None,
                  positions: torch.Tensor, layer_cache: torch.Tensor,
                  meta: plugins.AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer: (sublayer output, residual stream) in, the same out (residual None on the first)."""
        eps = self.cfg.norm_epsilon
        if residual is None:
            residual, normed = hidden, plugins.rms_norm(hidden, w.input_layernorm, eps)
        else:
            normed, residual = plugins.fused_add_rms_norm(hidden, residual, w.input_layernorm, eps)
        hidden = self.attention(normed, positions, layer_cache, meta, w)
        normed, residual = plugins.fused_add_rms_norm(hidden, residual, w.post_attention_layernorm, eps)
        return self.mlp(normed, w), residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, lm_head rows] for hidden rows [N, H] (this rank's vocab slice under TP).

        On CUDA in fp16/bf16 one GEMM in the model dtype with float32 accumulation and float32 output (cuBLAS
        `mm.dtype`); elsewhere in float32, lm_head upcast in row chunks."""
        if plugins.uses_gpu_kernels(hidden, hidden.dtype):
            return gpu_logits(hidden, self.lm_head)
        hidden32 = hidden.float()
        if self.lm_head.dtype == torch.float32:
            return F.linear(hidden32, self.lm_head)
        return torch.cat([F.linear(hidden32, self.lm_head[i:i + LOGITS_CHUNK_ROWS].float())
                          for i in range(0, self.lm_head.shape[0], LOGITS_CHUNK_ROWS)], dim=-1)

    def attention(self, x: torch.Tensor, positions: torch.Tensor, layer_cache: torch.Tensor,
                  meta: plugins.AttentionMetadata, w: DecoderLayer) -> torch.Tensor:
        """Fused QKV projection, (q/k norm), RoPE, KV-cache store, paged attention and output projection."""
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.cfg.head_size
        q, k, v = w.qkv_proj(x).split([nq * d, nkv * d, nkv * d], dim=-1)
        q, k = q.view(-1, nq, d), k.view(-1, nkv, d)
        if self.qk_norm:  # per head, before RoPE
            q = plugins.rms_norm(q.reshape(-1, d), w.q_norm, self.cfg.norm_epsilon).view(-1, nq, d)
            k = plugins.rms_norm(k.reshape(-1, d), w.k_norm, self.cfg.norm_epsilon).view(-1, nkv, d)
        v = v.reshape(-1, nkv, d)
        if self.kv_observer is not None:
            self.kv_observer(k, v)
        q, k = plugins.rotary_embedding(q, k, positions, self.cos, self.sin)
        plugins.store_kv_cache(k, v, layer_cache[0], layer_cache[1], meta, w.kv_scale)
        out = plugins.paged_attention(q, layer_cache[0], layer_cache[1], meta, self.scale, w.kv_scale)
        return self._row_parallel(out.reshape(-1, nq * d), w.o_proj)

    def mlp(self, x: torch.Tensor, w: DecoderLayer) -> torch.Tensor:
        """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""
        if w.gate_up_proj is not None:
            act = plugins.silu_and_mul(w.gate_up_proj(x))
        else:
            act = F.silu(w.gate_proj(x)) * w.up_proj(x)
        return self._row_parallel(act, w.down_proj)

    def _row_parallel(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """x @ weight.T summed over ranks, then + bias (kept whole on every rank, added once)."""
        if self.all_reduce is None:
            return linear(x)
        out = self.all_reduce(linear(x, with_bias=False))
        return out if linear.bias is None else out + linear.bias
