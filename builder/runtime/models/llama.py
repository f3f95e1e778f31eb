"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat token batch with a paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import plugins
from plugins import LinearOp
from builder.config import ModelConfig
from builder.errors import ConfigError
from builder.layers.rotary import rope_tables
from builder.runtime.kv_cache import KVCacheSpec
from builder.quantize.modes import linear_quant_algo
from builder.quantize.weight_only import weight_only_bits, weight_only_quantize
from plugins.formats import unpack_int4

LOGITS_CHUNK_ROWS = 8192  # vocab rows of lm_head upcast to float32 at a time


ROW_PARALLEL = ("attention.dense", "mlp.proj")  # linears whose input dimension is split across ranks


@dataclass
class Linear:
    """One linear layer of this rank: its weight prepared for the GEMM that runs it, and its bias.

    Unquantized layers hold the checkpoint weight (torch's F.linear). Quantized layers hold a plugins.LinearOp:
      W8A16 / W4A16  the float checkpoint weight quantized per output channel with TensorRT-LLM's quantizer
                     (weight_only_quantize: amax/128 or amax/8, scale in the model dtype); under tensor parallelism a
                     row-parallel shard uses the amax of its whole rows (all-reduced), so TP=N runs exactly the TP=1
                     weights (trtllm-build takes each rank's own amax instead: decisions.md);
      W4A16_AWQ      the checkpoint's packed int4 values and group scales (cast to the model dtype as trtllm-build
                     does); the activations are multiplied by prequant_scaling_factor in every forward;
      FP8            the e4m3 weight values; every forward quantizes the activations with the static
                     activation_scaling_factor and rescales by activation * weight scale.
    On CPU (and for float32 engines) the op holds the weight dequantized in the model dtype (int * scale rounded to
    the dtype, as the weight-only kernels dequantize) and runs the torch reference; on CUDA in fp16/bf16 it keeps the
    int8 / int4 / e4m3 weight and runs the GPU kernels (plugins/linear.py).
    """

    weight: torch.Tensor | LinearOp
    bias: torch.Tensor | None = None

    @classmethod
    def load(cls, weights: dict[str, torch.Tensor], module: str, algo: str | None, group_size: int,
             dtype: torch.dtype, row_amax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "Linear":
        """Build module's linear from the rank's checkpoint tensors (`module`.weight, .bias, scales).

        row_amax, for a row-parallel shard under tensor parallelism, turns the shard's per-row amax into the whole
        rows' amax (an all-reduce max over the ranks)."""
        weight, bias = weights[module + ".weight"], weights.get(module + ".bias")
        if algo is None:
            return cls(weight, bias)
        if algo in ("W8A16", "W4A16"):
            amax = None if row_amax is None else row_amax(weight.float().abs().amax(dim=1))
            bits = weight_only_bits(algo)
            q, scale = weight_only_quantize(weight, bits, dtype, amax)
            return cls(plugins.prepare_weight_only(q, scale[:, None], q.shape[1], bits, dtype), bias)
        if algo == "W4A16_AWQ":
            scales = weights[module + ".weights_scaling_factor"]
            q = unpack_int4(weight)
            if scales.shape[1] * group_size != q.shape[1]:
                raise ConfigError(f"{module}: {scales.shape[1]} scale groups for {q.shape[1]} inputs do not match "
                                  f"group_size {group_size}; rebuild the engine")
            return cls(plugins.prepare_weight_only(q, scales.to(dtype), group_size, 4, dtype,
                                                   weights[module + ".prequant_scaling_factor"]), bias)
        if algo == "FP8":
            return cls(plugins.prepare_fp8(weight, weights[module + ".activation_scaling_factor"],
                                           weights[module + ".weights_scaling_factor"], dtype), bias)
        raise ConfigError(f"quant_algo {algo!r} is not supported by this runtime; rebuild with `builder build`")

    def __call__(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x @ weight^T (+ bias unless with_bias is False)."""
        bias = self.bias if with_bias else None
        if isinstance(self.weight, torch.Tensor):
            return F.linear(x, self.weight, bias)
        return self.weight(x, bias)


@dataclass
class LayerWeights:
    """One decoder layer's tensors (TensorRT-LLM names in comments)."""

    input_norm: torch.Tensor        # input_layernorm.weight
    qkv: Linear                     # attention.qkv (.weight, .bias, quantization tensors)
    dense: Linear                   # attention.dense
    post_norm: torch.Tensor         # post_layernorm.weight
    fc: Linear                      # mlp.fc (SiLU branch)
    gate: Linear                    # mlp.gate
    proj: Linear                    # mlp.proj
    kv_scale: torch.Tensor | None   # attention.kv_cache_scaling_factor fp32 [1] (INT8/FP8 KV cache)
    fc_gate: Linear | None = None   # [fc; gate] in one weight (GPU, unquantized): one GEMM + fused SwiGLU

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], layer: int, cfg: ModelConfig,
                     all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "LayerWeights":
        """Pick layer `layer`'s tensors out of the engine's weight dict (quantized per cfg.quantization)."""
        p = f"transformer.layers.{layer}."
        quant, dtype = cfg.quantization, getattr(torch, cfg.dtype)

        def linear(module: str) -> Linear:
            row_amax = all_reduce_max if module in ROW_PARALLEL else None
            return Linear.load(weights, p + module, linear_quant_algo(quant, p + module), quant.group_size, dtype,
                               row_amax)

        kv_scale = weights.get(p + "attention.kv_cache_scaling_factor") if quant.kv_cache_quant_algo else None
        if quant.kv_cache_quant_algo and kv_scale is None:
            raise ConfigError(f"{p}attention.kv_cache_scaling_factor is missing for the {quant.kv_cache_quant_algo} "
                              "KV cache; rebuild the engine")
        fc, gate = linear("mlp.fc"), linear("mlp.gate")
        return cls(weights[p + "input_layernorm.weight"], linear("attention.qkv"), linear("attention.dense"),
                   weights[p + "post_layernorm.weight"], fc, gate, linear("mlp.proj"),
                   None if kv_scale is None else kv_scale.float(), fuse_fc_gate(fc, gate, dtype))


def fuse_fc_gate(fc: Linear, gate: Linear, dtype: torch.dtype) -> Linear | None:
    """One [fc; gate] linear for the GPU kernels (unquantized, no biases), else None.

    fc and gate become views of the fused weight, so it costs no memory; on the CPU the reference keeps two GEMMs."""
    plain = isinstance(fc.weight, torch.Tensor) and isinstance(gate.weight, torch.Tensor)
    if not plain or fc.bias is not None or gate.bias is not None or not plugins.uses_gpu_kernels(fc.weight, dtype):
        return None
    fused = torch.cat([fc.weight, gate.weight])
    fc.weight, gate.weight = fused[:fc.weight.shape[0]], fused[fc.weight.shape[0]:]
    return Linear(fused)


def gpu_logits(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] @ lm_head^T with a float32 result, without upcasting lm_head (CUDA, fp16/bf16)."""
    try:
        return torch.mm(hidden, lm_head.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # a torch without mm.dtype: logits rounded to the model dtype, as HF's
        return F.linear(hidden, lm_head).float()


class LlamaModel:
    """Forward pass of a Llama-family decoder; attention metadata and KV cache are passed in explicitly.

    Under tensor parallelism (cfg.mapping.tp_size > 1) the weights are this rank's shard: local query/KV heads
    and MLP columns; `all_reduce` sums the row-parallel outputs (attention.dense, mlp.proj) across ranks before
    their biases are added, and compute_logits returns this rank's slice of the (padded) vocabulary.
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 all_reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Bind the weights and precompute the RoPE tables for positions < max_positions."""
        if cfg.hidden_act != "silu" or cfg.position_embedding_type != "rope_gpt_neox":
            raise ConfigError(f"model uses hidden_act={cfg.hidden_act!r}, position_embedding_type="
                              f"{cfg.position_embedding_type!r}; this runtime runs silu + rope_gpt_neox models only")
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = cfg.local_heads()
        self.all_reduce = all_reduce if all_reduce is not None and cfg.mapping.tp_size > 1 else None
        self.embedding = weights["transformer.vocab_embedding.weight"]
        self.final_norm = weights["transformer.ln_f.weight"]
        self.lm_head = weights["lm_head.weight"]
        row_amax = all_reduce_max if cfg.mapping.tp_size > 1 else None
        self.layers = [LayerWeights.from_weights(weights, i, cfg, row_amax) for i in range(cfg.num_hidden_layers)]
        self.cos, self.sin = rope_tables(cfg, max_positions, device)
        self.scale = cfg.head_size ** -0.5

    @staticmethod
    def kv_cache_spec(cfg: ModelConfig) -> KVCacheSpec:
        """The cache one rank of this model needs per token: every layer's K and V of its local KV heads."""
        return KVCacheSpec(cfg.num_hidden_layers, cfg.local_heads()[1], cfg.head_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: plugins.AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [T, H] of the flat batch; kv_cache is [layers, 2, blocks, tpb, nkv, d]."""
        hidden = F.embedding(input_ids, self.embedding)
        residual = None
        for layer, weights in enumerate(self.layers):
            if residual is None:
                residual, normed = hidden, plugins.rms_norm(hidden, weights.input_norm, self.cfg.norm_epsilon)
            else:
                normed, residual = plugins.fused_add_rms_norm(hidden, residual, weights.input_norm,
                                                              self.cfg.norm_epsilon)
            hidden = self._attention(normed, positions, kv_cache[layer], meta, weights)
            normed, residual = plugins.fused_add_rms_norm(hidden, residual, weights.post_norm, self.cfg.norm_epsilon)
            hidden = self._mlp(normed, weights)
        normed, _ = plugins.fused_add_rms_norm(hidden, residual, self.final_norm, self.cfg.norm_epsilon)
        return normed

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

    def _attention(self, x: torch.Tensor, positions: torch.Tensor, layer_cache: torch.Tensor,
                   meta: plugins.AttentionMetadata, w: LayerWeights) -> torch.Tensor:
        """Fused QKV projection, RoPE, KV-cache store, paged attention and output projection."""
        nq, nkv, d = self.num_heads, self.num_kv_heads, self.cfg.head_size
        qkv = w.qkv(x)
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        q, k = plugins.rotary_embedding(q.view(-1, nq, d), k.view(-1, nkv, d), positions, self.cos, self.sin)
        v = v.reshape(-1, nkv, d)
        plugins.store_kv_cache(k, v, layer_cache[0], layer_cache[1], meta, w.kv_scale)
        out = plugins.paged_attention(q, layer_cache[0], layer_cache[1], meta, self.scale, w.kv_scale)
        return self._row_parallel(out.reshape(-1, nq * d), w.dense)

    def _mlp(self, x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """SwiGLU: proj(silu(fc(x)) * gate(x))."""
        if w.fc_gate is not None:
            act = plugins.silu_and_mul(w.fc_gate(x))
        else:
            act = F.silu(w.fc(x)) * w.gate(x)
        return self._row_parallel(act, w.proj)

    def _row_parallel(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """x @ weight.T summed over ranks, then + bias (kept whole on every rank, added once)."""
        if self.all_reduce is None:
            return linear(x)
        out = self.all_reduce(linear(x, with_bias=False))
        return out if linear.bias is None else out + linear.bias
