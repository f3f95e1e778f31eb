"""Triton GPU kernels for the plugin ops (CUDA tensors; also runnable on CPU tensors under TRITON_INTERPRET=1).

Each function mirrors the op of the same name in plugins.reference (same arguments, same results up to rounding
where noted) or, for the quantized GEMMs, takes the weight in a layout prepared once at load:

  op                         function                                   module
  RMSNorm                    rms_norm(x, weight, eps)                   rms_norm
  residual add + RMSNorm     fused_add_rms_norm(x, residual, weight, eps)
  rotary embedding           rotary_embedding(q, k, positions, cos, sin) rotary
  SwiGLU (fused fc|gate)     silu_and_mul(y)                            activation
  KV-cache store (+INT8/FP8) store_kv_cache(k, v, k_cache, v_cache, meta, kv_scale)   kv_store
  paged attention            paged_attention(q, k_cache, v_cache, meta, scale, kv_scale)  paged_attention
    decode (GQA, split-KV)   paged_decode_attention(...)                paged_attention
    prefill / chunked        paged_prefill_attention(...)               prefill_attention
  W4A16 (AWQ / per-channel)  int4_linear(x, repack_awq(...), bias, pre_quant_scale)    int4_gemm
  W8A16 per-channel          int8_linear(x, q, per_channel_scale, bias)  int8_gemm
  FP8 W8A8 per-tensor        fp8_linear(x, w_fp8, input_scale, weight_scale, bias)    fp8_gemm

plugins/__init__.py dispatches fp16/bf16 CUDA tensors here; plugins/linear.py prepares the quantized GEMMs
(plugins.gpu.linear picks the kernel by M). Measured speeds against torch
built-ins: docs/kernels-h100.md (scripts/bench_kernels.py); correctness: tests/test_plugins_gpu.py.
"""

from plugins.gpu.activation import silu_and_mul
from plugins.gpu.fp8_gemm import fp8_linear, quantize_fp8
from plugins.gpu.int4_gemm import Int4Weight, int4_linear, repack_awq, repack_int4_per_channel
from plugins.gpu.int8_gemm import int8_linear
from plugins.gpu.kv_store import store_kv_cache
from plugins.gpu.paged_attention import paged_attention, paged_decode_attention
from plugins.gpu.prefill_attention import paged_prefill_attention
from plugins.gpu.rms_norm import fused_add_rms_norm, rms_norm
from plugins.gpu.rotary import rotary_embedding

__all__ = ["Int4Weight", "fp8_linear", "fused_add_rms_norm", "int4_linear", "int8_linear", "paged_attention",
           "paged_decode_attention", "paged_prefill_attention", "quantize_fp8", "repack_awq",
           "repack_int4_per_channel", "rms_norm", "rotary_embedding", "silu_and_mul", "store_kv_cache"]
