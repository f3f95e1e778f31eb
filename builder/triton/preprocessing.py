"""The `preprocessing` model: text -> token ids (+ stop/bad word lists, end/pad ids) with the HF tokenizer."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuilderError, RequestError
from builder.triton.detokenizer import load_tokenizer
from builder.triton.tensors import batch_word_lists, decode_strings, parameters, parse_bool, read_inputs

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend (unit tests use Preprocessor directly)
    pb_utils = None

INPUTS = ("QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT", "END_ID", "PAD_ID")


@dataclass
class Preprocessor:
    """Tokenizes a batch of requests into the tensors tensorrt_llm takes."""

    tokenizer: Any
    add_special_tokens: bool = True

    @property
    def end_id(self) -> int:
        """The tokenizer's eos id (-1, never matched, when it has none)."""
        eos = self.tokenizer.eos_token_id
        return -1 if eos is None else int(eos)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its eos id."""
        pad = self.tokenizer.pad_token_id
        return self.end_id if pad is None else int(pad)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt; RequestError when it is empty."""
        if not text:
            raise RequestError("text_input is empty; send at least one character")
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def word_ids(self, words: list[str]) -> list[list[int]]:
        """Token ids of each stop/bad word (empty words are skipped)."""
        return [ids for ids in (self.tokenizer.encode(w, add_special_tokens=False) for w in words if w) if ids]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request tensors (batch B) -> output tensors, prompts right-padded with the pad id."""
        texts = decode_strings(inputs["QUERY"], "text_input")
        batch = len(texts)
        prompts = [self.encode(text) for text in texts]
        width = max(len(p) for p in prompts)
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int32)
        for i, prompt in enumerate(prompts):
            input_ids[i, :len(prompt)] = prompt
        return {
            "INPUT_ID": input_ids,
            "REQUEST_INPUT_LEN": np.array([[len(p)] for p in prompts], dtype=np.int32),
            "REQUEST_OUTPUT_LEN": np.asarray(inputs["REQUEST_OUTPUT_LEN"], dtype=np.int32).reshape(batch, -1),
            "STOP_WORDS_IDS": self._words(inputs, "STOP_WORDS_DICT", batch),
            "BAD_WORDS_IDS": self._words(inputs, "BAD_WORDS_DICT", batch),
            "OUT_END_ID": self._id(inputs, "END_ID", self.end_id, batch),
            "OUT_PAD_ID": self._id(inputs, "PAD_ID", self.pad_id, batch),
        }

    def _words(self, inputs: Mapping[str, np.ndarray], name: str, batch: int) -> np.ndarray:
        """A STRING [B, n] word input as a [B, 2, L] id word list."""
        if name not in inputs:
            return batch_word_lists([[] for _ in range(batch)])
        rows = np.asarray(inputs[name], dtype=object).reshape(batch, -1)
        return batch_word_lists([self.word_ids(decode_strings(row, name.lower())) for row in rows])

    @staticmethod
    def _id(inputs: Mapping[str, np.ndarray], name: str, default: int, batch: int) -> np.ndarray:
        """END_ID / PAD_ID as [B, 1], the tokenizer's value where the request has none."""
        if name in inputs:
            return np.asarray(inputs[name], dtype=np.int32).reshape(batch, 1)
        return np.full((batch, 1), default, dtype=np.int32)


def load_preprocessor(model_dir: Path, params: Mapping[str, str]) -> Preprocessor:
    """The Preprocessor for a model folder from its config parameters."""
    tokenizer = load_tokenizer(model_dir / params.get("tokenizer_dir", "1/tokenizer"))
    return Preprocessor(tokenizer, parse_bool(params.get("add_special_tokens"), True))


class TritonPythonModel:
    """Triton python-backend model wrapping Preprocessor."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer from the model folder (local files only)."""
        config = json.loads(args["model_config"])
        self.preprocessor = load_preprocessor(Path(args["model_repository"]), parameters(config))

    def execute(self, requests: list) -> list:
        """One response per request; a bad request gets an error response, the others are unaffected."""
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        """Run one request."""
        inputs = read_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name)
        try:
            outputs = self.preprocessor.run(inputs)
        except BuilderError as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def finalize(self) -> None:
        """Nothing to release."""
