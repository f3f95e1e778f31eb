"""Tensor-level quantization for TensorRT-LLM checkpoints: modes, linear tensors, AWQ, FP8, KV cache, calibration."""

from builder.quantize.awq import AwqScales, awq_search, dequantize_awq, quantize_awq
from builder.quantize.calibrate import (ActivationStats, calibration_batches, collect_activation_stats,
                                        load_calibration_text)
from builder.quantize.fp8 import dequantize_fp8, fp8_linear_reference, fp8_scale, quantize_fp8, tensor_amax
from builder.quantize.kv_cache import kv_cache_scale, rope_safe_amax
from builder.quantize.linear import dequantize_linear, quantize_linear, reference_linear
from builder.quantize.modes import (KV_CACHE_MODES, QUANT_MODES, SUPPORTED_GROUP_SIZES, check_group_divisible,
                                    is_excluded, linear_quant_algo, resolve_quant_config,
                                    validate_group_size)
from builder.quantize.weight_only import pack_int4, weight_only_quantize

__all__ = [
    "ActivationStats", "AwqScales", "KV_CACHE_MODES", "QUANT_MODES", "SUPPORTED_GROUP_SIZES", "awq_search",
    "calibration_batches", "check_group_divisible", "collect_activation_stats", "dequantize_awq", "dequantize_fp8",
    "dequantize_linear", "fp8_linear_reference", "fp8_scale", "is_excluded",
    "kv_cache_scale", "linear_quant_algo", "load_calibration_text", "pack_int4", "quantize_awq", "quantize_fp8",
    "quantize_linear", "reference_linear", "resolve_quant_config", "rope_safe_amax", "tensor_amax",
    "validate_group_size", "weight_only_quantize",
]
