"""The `postprocessing` model: token ids -> text, each streamed chunk exact thanks to its detokenization context."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.errors import RequestError
from builder.triton.detokenizer import Detokenizer, load_detokenizer
from builder.triton.stop_channel import send_stop
from builder.triton.tensors import error_response, parameters, parse_bool, read_inputs
from builder.triton.watchdog import StubWatchdog

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend (unit tests use Postprocessor directly)
    pb_utils = None

INPUTS = ("TOKENS_BATCH", "SEQUENCE_LENGTH", "DETOK_CONTEXT_IDS", "IS_FINAL")


@dataclass
class Postprocessor:
    """Turns tensorrt_llm outputs into text: the whole text, or a streamed chunk's delta.

    vocab_size: the engine's vocabulary (the `vocab_size` parameter; default: the tokenizer's size). Ids in it
    but beyond the tokenizer (an engine's padded vocabulary) decode to nothing; ids outside it are refused."""

    detokenizer: Detokenizer
    vocab_size: int | None = None

    @property
    def vocab(self) -> int:
        """Token ids in [0, vocab) are valid."""
        return self.vocab_size or len(self.detokenizer.tokenizer)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """TOKENS_BATCH [B, beams, T] + SEQUENCE_LENGTH [B, beams] (+ context, final flag) -> OUTPUT [B * beams]
        and OUT_NUM_TOKENS [B * beams] (the ids each text holds: a streamed chunk may carry several), 1-D as
        TensorRT-LLM's postprocessing returns OUTPUT. RequestError naming the input for a malformed one."""
        tokens = self._tokens(inputs)
        batch, beams, width = tokens.shape
        lengths = self._lengths(inputs, batch, beams, width)
        self._check_ids("TOKENS_BATCH", tokens[np.arange(width) < lengths[..., None]])
        contexts = self._contexts(inputs, batch)
        self._check_ids("DETOK_CONTEXT_IDS", np.array([t for row in contexts for t in row], dtype=np.int64))
        finals = self._finals(inputs, batch)
        texts = np.empty(batch * beams, dtype=object)
        for b in range(batch):
            for beam in range(beams):
                ids = tokens[b, beam, :int(lengths[b, beam])].tolist()
                texts[b * beams + beam] = self.detokenizer.delta(contexts[b], ids, finals[b]).encode("utf-8")
        return {"OUTPUT": texts, "OUT_NUM_TOKENS": lengths.reshape(-1).astype(np.int32)}

    @staticmethod
    def _tokens(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """TOKENS_BATCH as [B, beams, T] (a [B, T] one is one beam each)."""
        if "TOKENS_BATCH" not in inputs:
            raise RequestError("TOKENS_BATCH is missing; send the token ids as [batch, beams, tokens]")
        tokens = np.asarray(inputs["TOKENS_BATCH"])
        tokens = tokens[:, None, :] if tokens.ndim == 2 else tokens
        if tokens.ndim != 3:
            raise RequestError(f"TOKENS_BATCH has shape {list(tokens.shape)}; send [batch, beams, tokens]")
        return tokens

    @staticmethod
    def _lengths(inputs: Mapping[str, np.ndarray], batch: int, beams: int, width: int) -> np.ndarray:
        """SEQUENCE_LENGTH as [B, beams], each within TOKENS_BATCH's length."""
        if "SEQUENCE_LENGTH" not in inputs:
            raise RequestError("SEQUENCE_LENGTH is missing; send the number of valid ids of each beam [batch, beams]")
        lengths = np.asarray(inputs["SEQUENCE_LENGTH"])
        if lengths.size != batch * beams:
            raise RequestError(f"SEQUENCE_LENGTH holds {lengths.size} values for TOKENS_BATCH's {batch} x {beams} "
                               "sequences; send one length per beam")
        lengths = lengths.reshape(batch, beams)
        if ((lengths < 0) | (lengths > width)).any():
            raise RequestError(f"SEQUENCE_LENGTH {lengths.reshape(-1).tolist()} is outside [0, {width}], the "
                               "length of TOKENS_BATCH's sequences")
        return lengths

    def _check_ids(self, name: str, ids: np.ndarray) -> None:
        """RequestError naming `name` and the valid range when an id is outside [0, vocab)."""
        bad = ids[(ids < 0) | (ids >= self.vocab)]
        if bad.size:
            raise RequestError(f"{name} holds token id {int(bad[0])}, outside the vocabulary [0, {self.vocab}); "
                               "send ids the model's tokenizer produced")

    @staticmethod
    def _contexts(inputs: Mapping[str, np.ndarray], batch: int) -> list[list[int]]:
        """Per batch item, the context ids (negative ids are padding); none when the input is absent."""
        if "DETOK_CONTEXT_IDS" not in inputs:
            return [[] for _ in range(batch)]
        rows = np.asarray(inputs["DETOK_CONTEXT_IDS"])
        if rows.ndim > 2 or (rows.ndim == 2 and rows.shape[0] != batch):
            raise RequestError(f"DETOK_CONTEXT_IDS has shape {list(rows.shape)} for a batch of {batch}; send "
                               "[batch, n]")
        return [[int(t) for t in row if t >= 0] for row in rows.reshape(batch, -1)]

    @staticmethod
    def _finals(inputs: Mapping[str, np.ndarray], batch: int) -> list[bool]:
        """Per batch item, whether it is the last chunk (True when the input is absent: decode everything)."""
        if "IS_FINAL" not in inputs:
            return [True] * batch
        finals = np.asarray(inputs["IS_FINAL"])
        if finals.size != batch:
            raise RequestError(f"IS_FINAL holds {finals.size} values for a batch of {batch}; send one per item")
        return [bool(v) for v in finals.reshape(-1)]


def load_postprocessor(model_dir: Path, params: Mapping[str, str]) -> Postprocessor:
    """The Postprocessor for a model folder from its config parameters (vocab_size: the engine's, optional)."""
    detokenizer = load_detokenizer(model_dir / params.get("tokenizer_dir", "1/tokenizer"),
                                   parse_bool(params.get("skip_special_tokens"), True))
    vocab_size = params.get("vocab_size") or None
    return Postprocessor(detokenizer, int(vocab_size) if vocab_size else None)


def stop_tail(inputs: Mapping[str, np.ndarray]) -> list[int]:
    """The ids a cancelled chunk knows of its sequence (context + its tokens): they identify the request."""
    context = Postprocessor._contexts(inputs, 1)[0] if "DETOK_CONTEXT_IDS" in inputs else []
    tokens = np.asarray(inputs.get("TOKENS_BATCH", np.zeros((1, 1, 0), dtype=np.int32)))
    length = int(np.asarray(inputs.get("SEQUENCE_LENGTH", [[tokens.shape[-1]]])).reshape(-1)[0])
    return context + [int(t) for t in tokens.reshape(-1)[:length]]


class TritonPythonModel:
    """Triton python-backend model wrapping Postprocessor.

    It also carries client cancellation to the engine: Triton cancels an ensemble's *next* step requests,
    never the engine request already streaming, so a cancelled chunk arriving here is turned into a stop message
    to tensorrt_llm (same request id, plus the chunk's ids to tell apart clients reusing an id) on the local
    socket of builder.triton.stop_channel, not a BLS request (which corrupted tritonserver 2.51's heap).
    Dynamic batching is off in this model's config so that cancelled requests reach execute().
    """

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer from the model folder (local files only)."""
        config = json.loads(args["model_config"])
        self.watchdog = StubWatchdog(args["model_name"], pb_utils.Logger.log_error)
        params = parameters(config)
        self.postprocessor = load_postprocessor(Path(args["model_repository"]), params)
        self.engine_model = params.get("tensorrt_llm_model_name", "tensorrt_llm")

    def execute(self, requests: list) -> list:
        """One response per request (requests are independent: the context travels with each chunk)."""
        return [self._respond(request) for request in requests]

    def _cancelled(self, request, inputs: Mapping[str, np.ndarray]):
        """Stop the engine request behind a cancelled chunk; answer the chunk as cancelled."""
        if request.request_id() and self.engine_model:
            if not send_stop(self.engine_model, request.request_id(), stop_tail(inputs)):
                pb_utils.Logger.log_verbose(f"no builder engine listens for stops of {self.engine_model!r}; "
                                            f"request {request.request_id()!r} runs to its end")
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED))

    def _respond(self, request):
        """Run one request."""
        inputs = read_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name)
        if request.is_cancelled():
            return self._cancelled(request, inputs)
        try:
            outputs = self.postprocessor.run(inputs)
        except Exception as exc:  # noqa: BLE001  answered as an error response; never a traceback to the client
            return error_response(pb_utils, exc, "postprocessing")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def finalize(self) -> None:
        """Stop the stub watchdog."""
        self.watchdog.close()
