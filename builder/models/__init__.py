"""The model registry (issue #12): the Hugging Face architectures builder serves, the family file that runs each,
and the built-in tiny models. Data only, no torch: the CLI, the build and the checkpoint reader consult it; a family
file (builder/models/<family>.py: config translation, weight table, forward pass) is imported only when asked for
(arch_spec), so `builder --help` and `builder serve` start without torch.

Adding an architecture: its family file, one line in REGISTRY (and one entry in TINY_MODELS for a built-in tiny model
of it); docs/adding-a-model.md walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from builder.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from builder.models.spec import ArchSpec

# HF `architectures[0]` -> the family that runs it
REGISTRY: dict[str, str] = {
    "LlamaForCausalLM": "llama",    # Llama 2 / 3 / 3.1 / 3.2 (rope scaling, tied embeddings)
    "MistralForCausalLM": "llama",  # Llama layers; sliding window unset or longer than the sequences
    "Qwen2ForCausalLM": "llama",    # Llama layers with a qkv bias
    "Qwen3ForCausalLM": "qwen3",    # Llama layers with per-head q/k RMSNorm, no qkv bias
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
    "tiny-qwen3": TinyModel("Qwen3ForCausalLM", "Qwen3 layout: per-head q/k RMSNorm, head_dim 32 != hidden/heads, "
                            "tied embeddings", {"head_dim": 32}),
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


def arch_spec(architecture: str, where: str = "") -> "ArchSpec":
    """The family file's ArchSpec for `architecture` (builder.models.<family>.SPEC, imported on first use)."""
    return importlib.import_module(f"{__name__}.{family(architecture, where)}").SPEC
