"""The model registry (issue #12): the Hugging Face architectures builder serves, the family each belongs to, and the
built-in tiny models. Data only, no torch: the CLI, the build and the checkpoint reader consult it.

Adding an architecture starts here: one line in REGISTRY naming its family (and, for a built-in tiny model of it, one
entry in TINY_MODELS). The family's code is still spread over checkpoint/, quantize/ and runtime/models/; it moves
into one file per family (builder/models/<family>.py) as issue #12 goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from builder.errors import UnsupportedArchitectureError

# HF `architectures[0]` -> the family that runs it
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",    # Llama 2 / 3 / 3.1 / 3.2 (rope scaling, tied embeddings)
    "MistralForCausalLM": "llama",  # Llama layers; sliding window unset or longer than the sequences
    "Qwen2ForCausalLM": "llama",    # Llama layers with a qkv bias
}


@dataclass(frozen=True)
class TinyModel:
    """A built-in tiny model: random weights in a real architecture and config layout, made offline and
    deterministically (builder.checkpoint.tiny); `config` overrides the architecture's tiny defaults."""

    architecture: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)


# Llama 3.2's rope scaling, with original_max_position_embeddings cut to 32 so that short prompts reach scaled
# positions (the real 1B/3B models use 8192)
LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}

TINY_MODELS: dict[str, TinyModel] = {
    "tiny-llama": TinyModel("LlamaForCausalLM", "Llama 3 layout: byte-level BPE, untied embeddings"),
    "tiny-mistral": TinyModel("MistralForCausalLM", "Mistral layout: SentencePiece-style BPE"),
    "tiny-qwen2": TinyModel("Qwen2ForCausalLM", "Qwen2 layout: qkv bias, tied embeddings"),
    "tiny-llama3.2": TinyModel("LlamaForCausalLM", "Llama 3.2 layout: tied embeddings (no lm_head tensor), llama3 "
                               "rope scaling with factor 32",
                               {"tie_word_embeddings": True, "rope_scaling": LLAMA32_ROPE}),
}

# the tiny model an architecture name stands for, where a caller names an architecture: its first in TINY_MODELS
DEFAULT_TINY = {tiny.architecture: name for name, tiny in reversed(TINY_MODELS.items())}


def family(architecture: str, where: str = "") -> str:
    """The family that runs `architecture`; UnsupportedArchitectureError (one line, the registry's list) otherwise."""
    if architecture not in REGISTRY:
        prefix = f"{where}: " if where else ""
        raise UnsupportedArchitectureError(f"{prefix}architecture {architecture!r} is not supported; supported: "
                                           f"{', '.join(REGISTRY)}")
    return REGISTRY[architecture]


def tiny_model(name: str) -> TinyModel:
    """The built-in tiny model `name` (a TINY_MODELS key, or an architecture name for its default tiny model)."""
    key = DEFAULT_TINY.get(name, name)
    if key not in TINY_MODELS:
        raise UnsupportedArchitectureError(f"no built-in tiny model {name!r}; use one of {', '.join(TINY_MODELS)}")
    return TINY_MODELS[key]
