"""Per-request generation parameters, with the TensorRT-LLM ensemble's meanings and validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from builder.errors import RequestError


@dataclass
class SamplingParams:
    """How one request is decoded. Greedy when temperature == 0 or top_k == 1, or when neither top_k nor top_p is set.

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
        return self.temperature == 0.0 or self.top_k == 1 or (self.top_k == 0 and self.top_p == 0.0)

    def validate(self) -> None:
        """Raise RequestError for values no decoder can honour."""
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise RequestError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.seed is not None and self.seed < 0:
            raise RequestError(f"seed must be >= 0, got {self.seed}")
        for name, words in (("stop_words", self.stop_words), ("bad_words", self.bad_words)):
            if any(len(w) == 0 for w in words):
                raise RequestError(f"{name} contains an empty sequence")
