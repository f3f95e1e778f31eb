"""The `postprocessing` model: token ids -> text, each streamed chunk exact thanks to its detokenization context."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.errors import BuilderError
from builder.triton.detokenizer import Detokenizer, load_detokenizer
from builder.triton.tensors import parameters, parse_bool, read_inputs

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend (unit tests use Postprocessor directly)
    pb_utils = None

INPUTS = ("TOKENS_BATCH", "SEQUENCE_LENGTH", "DETOK_CONTEXT_IDS", "IS_FINAL")


@dataclass
class Postprocessor:
    """Turns tensorrt_llm outputs into text: the whole text, or a streamed chunk's delta."""

    detokenizer: Detokenizer

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """TOKENS_BATCH [B, beams, T] + SEQUENCE_LENGTH [B, beams] (+ context, final flag) -> OUTPUT [B, beams]
        and OUT_NUM_TOKENS [B, beams] (the ids each text holds: a streamed chunk may carry several)."""
        tokens = np.asarray(inputs["TOKENS_BATCH"])
        tokens = tokens[:, None, :] if tokens.ndim == 2 else tokens
        batch, beams = tokens.shape[0], tokens.shape[1]
        lengths = np.asarray(inputs["SEQUENCE_LENGTH"]).reshape(batch, beams)
        contexts = self._contexts(inputs, batch)
        finals = self._finals(inputs, batch)
        texts = np.empty((batch, beams), dtype=object)
        for b in range(batch):
            for beam in range(beams):
                ids = tokens[b, beam, :int(lengths[b, beam])].tolist()
                texts[b, beam] = self.detokenizer.delta(contexts[b], ids, finals[b]).encode("utf-8")
        return {"OUTPUT": texts, "OUT_NUM_TOKENS": lengths.astype(np.int32)}

    @staticmethod
    def _contexts(inputs: Mapping[str, np.ndarray], batch: int) -> list[list[int]]:
        """Per batch item, the context ids (negative ids are padding); none when the input is absent."""
        if "DETOK_CONTEXT_IDS" not in inputs:
            return [[] for _ in range(batch)]
        rows = np.asarray(inputs["DETOK_CONTEXT_IDS"]).reshape(batch, -1)
        return [[int(t) for t in row if t >= 0] for row in rows]

    @staticmethod
    def _finals(inputs: Mapping[str, np.ndarray], batch: int) -> list[bool]:
        """Per batch item, whether it is the last chunk (True when the input is absent: decode everything)."""
        if "IS_FINAL" not in inputs:
            return [True] * batch
        return [bool(v) for v in np.asarray(inputs["IS_FINAL"]).reshape(batch, -1)[:, 0]]


def load_postprocessor(model_dir: Path, params: Mapping[str, str]) -> Postprocessor:
    """The Postprocessor for a model folder from its config parameters."""
    detokenizer = load_detokenizer(model_dir / params.get("tokenizer_dir", "1/tokenizer"),
                                   parse_bool(params.get("skip_special_tokens"), True))
    return Postprocessor(detokenizer)


def stop_tail(inputs: Mapping[str, np.ndarray]) -> list[int]:
    """The ids a cancelled chunk knows of its sequence (context + its tokens): they identify the request."""
    context = Postprocessor._contexts(inputs, 1)[0] if "DETOK_CONTEXT_IDS" in inputs else []
    tokens = np.asarray(inputs.get("TOKENS_BATCH", np.zeros((1, 1, 0), dtype=np.int32)))
    length = int(np.asarray(inputs.get("SEQUENCE_LENGTH", [[tokens.shape[-1]]])).reshape(-1)[0])
    return context + [int(t) for t in tokens.reshape(-1)[:length]]


def stop_engine_request(model_name: str, request_id: str, tail: list[int]) -> None:
    """Send TensorRT-LLM's stop=true for request_id to the engine model (BLS) and wait for its answer."""
    ids = np.array([tail], dtype=np.int32).reshape(1, len(tail))
    inputs = [pb_utils.Tensor("input_ids", ids),
              pb_utils.Tensor("input_lengths", np.array([[len(tail)]], dtype=np.int32)),
              pb_utils.Tensor("request_output_len", np.array([[1]], dtype=np.int32)),
              pb_utils.Tensor("stop", np.array([[True]], dtype=bool))]
    request = pb_utils.InferenceRequest(model_name=model_name, inputs=inputs, requested_output_names=[],
                                        request_id=request_id)
    for response in request.exec(decoupled=True):
        if response.has_error():
            pb_utils.Logger.log_warn(f"stopping request {request_id!r} failed: {response.error().message()}")


class TritonPythonModel:
    """Triton python-backend model wrapping Postprocessor.

    It also carries client cancellation to the engine: Triton cancels an ensemble's *next* step requests,
    never the engine request already streaming, so a cancelled chunk arriving here is turned into a stop=true
    request to tensorrt_llm (same request id, plus the chunk's ids to tell apart clients reusing an id).
    Dynamic batching is off in this model's config so that cancelled requests reach execute().
    """

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer from the model folder (local files only)."""
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.postprocessor = load_postprocessor(Path(args["model_repository"]), params)
        self.engine_model = params.get("tensorrt_llm_model_name", "tensorrt_llm")

    def execute(self, requests: list) -> list:
        """One response per request (requests are independent: the context travels with each chunk)."""
        return [self._respond(request) for request in requests]

    def _cancelled(self, request, inputs: Mapping[str, np.ndarray]):
        """Stop the engine request behind a cancelled chunk; answer the chunk as cancelled."""
        if request.request_id() and self.engine_model:
            try:
                stop_engine_request(self.engine_model, request.request_id(), stop_tail(inputs))
            except Exception as exc:  # noqa: BLE001  best effort: the engine request then runs to its end
                pb_utils.Logger.log_warn(f"could not stop request {request.request_id()!r}: {exc}")
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED))

    def _respond(self, request):
        """Run one request."""
        inputs = read_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name)
        if request.is_cancelled():
            return self._cancelled(request, inputs)
        try:
            outputs = self.postprocessor.run(inputs)
        except (BuilderError, ValueError) as exc:
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def finalize(self) -> None:
        """Nothing to release."""
