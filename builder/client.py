"""Talk to a served repository over gRPC streaming: text deltas from the ensemble, token ids from tensorrt_llm."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from builder.errors import RequestError, ServerError
from builder.triton.tensors import to_word_list

DEFAULT_TIMEOUT_S = 120.0
# ensemble input -> Triton dtype (text_input, max_tokens, stream are set by the functions themselves)
ENSEMBLE_INPUTS = {
    "exclude_input_in_output": "BOOL", "end_id": "INT32", "pad_id": "INT32", "top_k": "INT32", "top_p": "FP32",
    "temperature": "FP32", "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
    "min_tokens": "INT32", "seed": "UINT64", "beam_width": "INT32", "stop_words": "BYTES", "bad_words": "BYTES",
}
# keyword -> (tensorrt_llm input, Triton dtype); stop_words / bad_words are lists of token-id lists here
ENGINE_INPUTS = {
    "exclude_input_in_output": ("exclude_input_in_output", "BOOL"), "end_id": ("end_id", "INT32"),
    "pad_id": ("pad_id", "INT32"), "top_k": ("runtime_top_k", "INT32"), "top_p": ("runtime_top_p", "FP32"),
    "temperature": ("temperature", "FP32"), "repetition_penalty": ("repetition_penalty", "FP32"),
    "presence_penalty": ("presence_penalty", "FP32"), "frequency_penalty": ("frequency_penalty", "FP32"),
    "min_tokens": ("min_tokens", "INT32"), "seed": ("seed", "UINT64"), "beam_width": ("beam_width", "INT32"),
    "stop_words": ("stop_words_list", "INT32"), "bad_words": ("bad_words_list", "INT32"),
}
SERVER_FAILURE_MARKERS = ("the engine failed", "shutting down", "request cancelled", "failed to load",
                          "is not ready", "unavailable", "Unavailable", "no loaded version")
NUMPY_TYPES = {"BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BYTES": np.object_}


def _grpc():
    """tritonclient.grpc, imported on first use."""
    import tritonclient.grpc as grpcclient

    return grpcclient


def make_input(name: str, array: np.ndarray, dtype: str) -> Any:
    """A tritonclient InferInput holding array."""
    tensor = _grpc().InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _row(value: Any, dtype: str) -> np.ndarray:
    """A [1, n] array (n = 1 for scalars) of the Triton dtype; strings are UTF-8 encoded."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if dtype == "BYTES":
        items = [v.encode("utf-8") if isinstance(v, str) else v for v in items]
    return np.array([items], dtype=NUMPY_TYPES[dtype])


def _unknown(names: set[str], known: dict) -> None:
    """RequestError for sampling keywords this client does not know."""
    if names:
        raise RequestError(f"unknown sampling option(s) {', '.join(sorted(names))}; use {', '.join(sorted(known))}")


def ensemble_inputs(prompt: str, max_tokens: int, stream: bool, **sampling: Any) -> list:
    """Request tensors for the ensemble (text_input, max_tokens, stream + ensemble sampling inputs)."""
    _unknown(set(sampling) - set(ENSEMBLE_INPUTS), ENSEMBLE_INPUTS)
    inputs = [make_input("text_input", _row(prompt, "BYTES"), "BYTES"),
              make_input("max_tokens", _row(max_tokens, "INT32"), "INT32"),
              make_input("stream", _row(stream, "BOOL"), "BOOL")]
    for name, value in sampling.items():
        if value is not None:
            inputs.append(make_input(name, _row(value, ENSEMBLE_INPUTS[name]), ENSEMBLE_INPUTS[name]))
    return inputs


def engine_inputs(input_ids: Sequence[int], max_tokens: int, stream: bool, **sampling: Any) -> list:
    """Request tensors for tensorrt_llm (ids in; ensemble-style keyword names are mapped to its names)."""
    _unknown(set(sampling) - set(ENGINE_INPUTS), ENGINE_INPUTS)
    ids = np.array([list(input_ids)], dtype=np.int32)
    inputs = [make_input("input_ids", ids, "INT32"),
              make_input("input_lengths", _row(len(input_ids), "INT32"), "INT32"),
              make_input("request_output_len", _row(max_tokens, "INT32"), "INT32"),
              make_input("streaming", _row(stream, "BOOL"), "BOOL")]
    for key, value in sampling.items():
        if value is None:
            continue
        name, dtype = ENGINE_INPUTS[key]
        array = to_word_list(value)[None] if key in ("stop_words", "bad_words") else _row(value, dtype)
        inputs.append(make_input(name, array, dtype))
    return inputs


def _error(error: Any) -> Exception:
    """An error response as RequestError (the request was refused) or ServerError (the server failed).

    Errors that arrive on a gRPC stream carry no status code, so server-side failures are told apart by the
    wording of the models' messages (see builder.triton.engine_model).
    """
    message = error.message() if hasattr(error, "message") else str(error)
    status = error.status() if hasattr(error, "status") else None
    if status and "INVALID_ARG" not in str(status).upper():
        return ServerError(message)
    if any(marker in message for marker in SERVER_FAILURE_MARKERS):
        return ServerError(message)
    return RequestError(message)


@dataclass
class _Stream:
    """One gRPC stream carrying one request; responses land in a queue."""

    url: str
    timeout: float
    responses: queue.Queue = field(default_factory=queue.Queue)

    def run(self, model: str, inputs: list) -> Iterator[Any]:
        """Send the request and yield each response until the final one (raising on an error response)."""
        try:
            client = _grpc().InferenceServerClient(self.url)
        except Exception as exc:  # noqa: BLE001  tritonclient raises its own and grpc's errors
            raise ServerError(f"cannot connect to Triton at {self.url} ({exc}); is `builder serve` running?") from exc
        finished = False
        try:
            client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
            try:
                client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex,
                                          enable_empty_final_response=True)
            except Exception as exc:  # noqa: BLE001  the stream broke before the request went out
                finished = True
                raise ServerError(f"the gRPC stream to {self.url} failed before the request was sent: "
                                  f"{self._stream_error(exc)}") from exc
            while not finished:
                result, error = self._next()
                if error is not None:
                    finished = True
                    raise _error(error)
                finished = result.get_response().parameters["triton_final_response"].bool_param
                yield result
        finally:
            client.stop_stream(cancel_requests=not finished)
            client.close()

    def _stream_error(self, exc: Exception) -> str:
        """The stream's own error (tritonclient reports it through the callback), else exc's message."""
        try:
            _, error = self.responses.get(timeout=1.0)
        except queue.Empty:
            error = None
        return str(error.message() if hasattr(error, "message") else error) if error is not None else str(exc)

    def _next(self) -> tuple[Any, Any]:
        """The next (result, error) pair; ServerError on timeout."""
        try:
            return self.responses.get(timeout=self.timeout)
        except queue.Empty:
            raise ServerError(f"no response from Triton at {self.url} within {self.timeout:.0f}s") from None


def _texts(result: Any) -> list[str]:
    """The text_output items of a response (none for an empty final response)."""
    if not any(o.name == "text_output" for o in result.get_response().outputs):
        return []
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item)
            for item in result.as_numpy("text_output").reshape(-1)]


def stream_text(url: str, prompt: str, max_tokens: int = 64, stream: bool = True, model: str = "ensemble",
                timeout: float = DEFAULT_TIMEOUT_S, **sampling: Any) -> Iterator[str]:
    """Yield the text deltas of one request to the ensemble over gRPC streaming (one item if stream=False).

    sampling: the ensemble's optional inputs (temperature, top_k, top_p, seed, stop_words=[...], ...).
    Raises RequestError / ServerError with the server's message on an error response.
    """
    inputs = ensemble_inputs(prompt, max_tokens, stream, **sampling)
    for result in _Stream(url, timeout).run(model, inputs):
        for text in _texts(result):
            if text:
                yield text


def generate_text(url: str, prompt: str, max_tokens: int = 64, **kwargs: Any) -> str:
    """The whole generated text (streamed deltas joined)."""
    return "".join(stream_text(url, prompt, max_tokens, **kwargs))


def stream_ids(url: str, input_ids: Sequence[int], max_tokens: int = 64, stream: bool = True,
               model: str = "tensorrt_llm", timeout: float = DEFAULT_TIMEOUT_S, **sampling: Any) -> Iterator[list[int]]:
    """Yield the token ids of each response of tensorrt_llm for a prompt given as ids."""
    inputs = engine_inputs(input_ids, max_tokens, stream, **sampling)
    for result in _Stream(url, timeout).run(model, inputs):
        if any(o.name == "output_ids" for o in result.get_response().outputs):
            ids = result.as_numpy("output_ids").reshape(-1).tolist()
            length = int(result.as_numpy("sequence_length").reshape(-1)[0])
            yield ids[:length]


def generate_ids(url: str, input_ids: Sequence[int], max_tokens: int = 64, **kwargs: Any) -> list[int]:
    """All token ids tensorrt_llm returns for one prompt (prompt included unless exclude_input_in_output)."""
    return [t for chunk in stream_ids(url, input_ids, max_tokens, **kwargs) for t in chunk]
