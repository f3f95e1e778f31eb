"""Test helpers: talk to a real tritonserver with the real tritonclient over gRPC streaming."""

from __future__ import annotations

import queue
import re
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient

TIMEOUT_S = 120.0


@dataclass
class StreamResult:
    """What one streamed request returned: each response's payload, or the error."""

    texts: list[str] = field(default_factory=list)
    token_chunks: list[list[int]] = field(default_factory=list)
    error: str | None = None

    @property
    def text(self) -> str:
        """All text chunks joined."""
        return "".join(self.texts)

    @property
    def tokens(self) -> list[int]:
        """All token chunks joined."""
        return [t for chunk in self.token_chunks for t in chunk]


def _tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    """One [1, ...] request tensor."""
    if dtype == "BYTES":
        items = value if isinstance(value, list) else [value]
        array = np.array([[v.encode() if isinstance(v, str) else v for v in items]], dtype=object)
    else:
        np_dtype = {"INT32": np.int32, "FP32": np.float32, "BOOL": bool, "UINT64": np.uint64}[dtype]
        array = np.array([value if isinstance(value, list) else [value]], dtype=np_dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


ENSEMBLE_TYPES = {
    "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "exclude_input_in_output": "BOOL",
    "end_id": "INT32", "pad_id": "INT32", "top_k": "INT32", "top_p": "FP32", "temperature": "FP32",
    "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32", "min_tokens": "INT32",
    "seed": "UINT64", "stop_words": "BYTES", "bad_words": "BYTES",
}
ENGINE_TYPES = {
    "input_ids": "INT32", "input_lengths": "INT32", "request_output_len": "INT32", "streaming": "BOOL",
    "end_id": "INT32", "runtime_top_k": "INT32", "runtime_top_p": "FP32", "temperature": "FP32", "seed": "UINT64",
    "exclude_input_in_output": "BOOL", "min_tokens": "INT32",
}


def ensemble_inputs(**values) -> list[grpcclient.InferInput]:
    """Ensemble request tensors from keyword values (text_input="...", max_tokens=8, stream=True, ...)."""
    return [_tensor(name, value, ENSEMBLE_TYPES[name]) for name, value in values.items()]


def engine_inputs(**values) -> list[grpcclient.InferInput]:
    """tensorrt_llm request tensors from keyword values (input_ids=[...], request_output_len=8, ...)."""
    return [_tensor(name, value, ENGINE_TYPES[name]) for name, value in values.items()]


def run_stream(url: str, model: str, inputs: list[grpcclient.InferInput], request_id: str = "1",
               cancel_after: int | None = None) -> StreamResult:
    """Send one request on its own gRPC stream and collect every response until the final one."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    result = StreamResult()
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            answer, error = responses.get(timeout=TIMEOUT_S)
            if error is not None:
                result.error = str(error)
                return result
            _collect(answer, result)
            if cancel_after is not None and len(result.token_chunks) + len(result.texts) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return result
            if answer.get_response().parameters["triton_final_response"].bool_param:
                return result
    finally:
        client.stop_stream()
        client.close()


def _collect(answer, result: StreamResult) -> None:
    """Append the text/tokens of one response to result (empty final responses carry nothing)."""
    names = {o.name for o in answer.get_response().outputs}
    if "text_output" in names:
        for item in answer.as_numpy("text_output").reshape(-1):
            result.texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
    if "output_ids" in names:
        ids = answer.as_numpy("output_ids").reshape(-1).tolist()
        length = int(answer.as_numpy("sequence_length").reshape(-1)[0])
        result.token_chunks.append(ids[:length])


def read_metrics(metrics_port: int) -> dict[str, float]:
    """Prometheus metrics of the server as {name{labels}: value}, plus {name: value} for builder_* metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    metrics: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metrics[key] = float(value)
        metrics.setdefault(re.sub(r"\{.*\}", "", key), float(value))
    return metrics
