"""Model definitions the runtime can run, by family (builder.models.REGISTRY maps an architecture to its family)."""

from __future__ import annotations

from builder.config import ModelConfig
from builder.models import family
from builder.runtime.models.llama import LlamaModel

MODELS = {"llama": LlamaModel}  # family -> the class that runs it


def model_class(cfg: ModelConfig) -> type[LlamaModel]:
    """The runtime model class of cfg's architecture (UnsupportedArchitectureError for an unknown one)."""
    return MODELS[family(cfg.architecture)]
