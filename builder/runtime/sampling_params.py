"""Per-request generation parameters, with the TensorRT-LLM ensemble's meanings and validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from builder.errors import RequestError

# Temperatures below this decode greedily (docs/decisions.md): dividing logits by a smaller one overflows float32
# (a denormal temperature turns every positive logit into inf), and the distribution is an argmax anyway.
MIN_TEMPERATURE = 1e-5
SEED_LIMIT = 2**64  # seeds are UINT64 (TensorRT-LLM's `seed`)


@dataclass
class SamplingParams:
    """How one request is decoded. Greedy when temperature < MIN_TEMPERATURE (0 included) or top_k == 1, or when
    neither top_k nor top_p is set.

    top_k 0 and top_p 0 mean "not set" (TensorRT-LLM's convention). Repetition penalty applies to prompt and
    output tokens (multiplicative, as in HF/TensorRT-LLM); presence and frequency penalties apply to output
    tokens (additive, OpenAI semantics). stop_words / bad_words are lists of token-id sequences.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    streaming: bool = False
    exclude_input_in_output: bool = False

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)

    def validate(self, labels: Mapping[str, str] | None = None) -> None:
        """Raise RequestError for values no decoder can honour: non-finite floats, values out of range.

        Each message starts with the field's name, or with labels[field] where given (a frontend's own input
        name, such as tensorrt_llm's runtime_top_k for top_k)."""
        labels = labels or {}

        def fail(name: str, rule: str, value) -> NoReturn:
            raise RequestError(f"{labels.get(name, name)} must be {rule}, got {value}")

        if self.max_tokens <= 0:
            fail("max_tokens", "> 0", self.max_tokens)
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            fail("temperature", "a finite number >= 0 (0: greedy)", self.temperature)
        if self.top_k < 0:
            fail("top_k", ">= 0 (0: not set)", self.top_k)
        if not 0.0 <= self.top_p <= 1.0:  # False for NaN too
            fail("top_p", "in [0, 1] (0: not set)", self.top_p)
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            fail("repetition_penalty", "a finite number > 0 (1: none)", self.repetition_penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                fail(name, "a finite number (0: none)", getattr(self, name))
        if self.min_tokens < 0:
            fail("min_tokens", ">= 0", self.min_tokens)
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            fail("seed", "in [0, 2**64)", self.seed)
        for name, words in (("stop_words", self.stop_words), ("bad_words", self.bad_words)):
            if any(len(w) == 0 for w in words):
                raise RequestError(f"{labels.get(name, name)} contains an empty sequence; leave empty words out")
