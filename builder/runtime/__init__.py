"""Portable PyTorch runtime for engine folders: paged KV cache, in-flight batching, per-request sampling."""

from builder.runtime.engine import EngineStats, LLMEngine, RequestOutput
from builder.runtime.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]
