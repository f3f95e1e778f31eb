"""The `tensorrt_llm_bls` model: the ensemble's pipeline run by a python model through BLS requests.

It takes the ensemble's inputs and returns its outputs (TensorRT-LLM's tensorrt_llm_bls contract, the subset the
ensemble has), and runs the same wiring, read from 1/pipeline.json (rendered from ensembles/llm.yaml): the steps
before the engine once (preprocessing), the engine step as a decoupled BLS request, and the steps after it
(postprocessing) once per engine response, answering each with one response of its own.

Each request runs on a thread of its own, so execute() returns at once and requests proceed together (the engine
batches them). Parameters: accumulate_tokens (false: streamed text_output chunks are deltas, as the ensemble's;
true: each chunk is the text of every token so far, as upstream's BLS with accumulate_tokens) and
tensorrt_llm_model_name (the engine model the engine step calls). A request's client cancellation is polled on a
watcher thread and carried to the engine model as a stop (builder.triton.stop_channel, as postprocessing does for
the ensemble); errors of the inner models are answered as this model's own, with their message and code.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuilderError, ConfigError, RequestError
from builder.triton.stop_channel import send_stop
from builder.triton.tensors import error_response, parameters, parse_bool, read_inputs, scalar

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend (unit tests use the pure parts)
    pb_utils = None

# engine outputs (TensorRT-LLM's, and builder's runtime's is_final / detok_context_ids) this model reads itself
OUTPUT_IDS, SEQUENCE_LENGTH, CONTEXT_IDS, IS_FINAL = "output_ids", "sequence_length", "detok_context_ids", "is_final"
DEFAULT_PIPELINE = "1/pipeline.json"
DEFAULT_CANCEL_CHECK_MS = 100.0  # TensorRT-LLM's cancellation_check_period_ms default
SHUTDOWN_WAIT_S = 30.0


@dataclass(frozen=True)
class Step:
    """One model call: {model input: pipeline tensor} and {model output: pipeline tensor}."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class Pipeline:
    """The steps of ensembles/<pipeline>.yaml around its engine step."""

    inputs: tuple[str, ...]  # the model's own inputs (the ensemble's)
    outputs: tuple[str, ...]  # the model's own outputs
    before: tuple[Step, ...]  # run once per request
    engine: Step  # a decoupled BLS request
    after: tuple[Step, ...]  # run once per engine response


def load_pipeline(path: Path, engine_model: str) -> Pipeline:
    """The Pipeline of a pipeline.json, its engine step calling engine_model; ConfigError when malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        steps = [(Step(engine_model if s.get("engine") else s["model"], dict(s["inputs"]), dict(s["outputs"])),
                  bool(s.get("engine"))) for s in data["steps"]]
        names = tuple(t["name"] for t in data["inputs"]), tuple(t["name"] for t in data["outputs"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a pipeline file ({exc}); rebuild the repository with `builder build`") \
            from exc
    marks = [i for i, (_, engine) in enumerate(steps) if engine]
    if len(marks) != 1:
        raise ConfigError(f"{path} marks {len(marks)} steps as the engine, not 1; rebuild the repository with "
                          "`builder build`")
    at = marks[0]
    return Pipeline(names[0], names[1], tuple(s for s, _ in steps[:at]), steps[at][0],
                    tuple(s for s, _ in steps[at + 1:]))


def request_tensors(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's request tensors with their batch dimension: inputs reshaped to scalars by the config (upstream's
    reshape: [ ]) arrive as [B] and go on as [B, 1], as the ensemble passes them."""
    return {name: array.reshape(-1, 1) if array.ndim == 1 else array for name, array in inputs.items()}


def step_inputs(step: Step, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs of step that the pipeline tensors hold (an absent optional input stays absent, as in an
    ensemble)."""
    return {key: tensors[value] for key, value in step.inputs.items() if value in tensors}


def stored(step: Step, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step's outputs under their pipeline tensor names."""
    return {step.outputs[key]: value for key, value in outputs.items() if key in step.outputs}


@dataclass
class Accumulator:
    """Joins a request's engine responses (accumulate_tokens): every id so far, after the first chunk's context."""

    ids: list[int] = field(default_factory=list)
    context: np.ndarray | None = None

    def add(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The engine outputs of one response, with output_ids / sequence_length covering every id so far."""
        tokens = np.asarray(outputs[OUTPUT_IDS]).reshape(-1)
        length = int(np.asarray(outputs[SEQUENCE_LENGTH]).reshape(-1)[0])
        self.ids.extend(int(t) for t in tokens[:length])
        if self.context is None and CONTEXT_IDS in outputs:
            self.context = np.asarray(outputs[CONTEXT_IDS])
        joined = dict(outputs)
        joined[OUTPUT_IDS] = np.array(self.ids, dtype=np.int32).reshape(1, 1, len(self.ids))
        joined[SEQUENCE_LENGTH] = np.array([[len(self.ids)]], dtype=np.int32)
        if self.context is not None:
            joined[CONTEXT_IDS] = self.context
        return joined


class InnerError(BuilderError):
    """An inner model answered with an error (or the client cancelled): answered to the client with this message and
    Triton error code, never a traceback."""

    def __init__(self, message: str, code: Any) -> None:
        """message and code of the inner model's TritonError."""
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Job:
    """One request in flight. `lock` is held while its sender sends and while the watcher asks Triton whether it was
    cancelled, so nothing is asked of a request after its final response."""

    request: Any
    sender: Any
    engine_id: str  # the request id of its engine request (what a stop names)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False  # its final response went out
    cancelled: bool = False  # its client cancelled it
    engine_started: bool = False  # its engine request was sent


class TritonPythonModel:
    """Triton python-backend model: one thread per request, one watcher thread for client cancellation."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the parameters and the pipeline; start the watcher."""
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.accumulate = parse_bool(params.get("accumulate_tokens"), False)
        self.engine_model = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
        self.pipeline = load_pipeline(Path(args["model_repository"]) / (params.get("pipeline") or DEFAULT_PIPELINE),
                                      self.engine_model)
        period_ms = params.get("cancellation_check_period_ms")
        self.period_s = float(period_ms if period_ms not in (None, "") else DEFAULT_CANCEL_CHECK_MS) / 1000
        self.jobs: set[Job] = set()
        self.jobs_lock = threading.Condition()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="builder-bls-cancel-watch", daemon=True)
        self.watcher.start()

    def execute(self, requests: list) -> None:
        """Start a thread per request; the responses come from those threads."""
        for request in requests:
            job = Job(request, request.get_response_sender(), f"bls-{uuid.uuid4().hex}")
            with self.jobs_lock:
                self.jobs.add(job)
            threading.Thread(target=self.serve, args=(job,), name="builder-bls-request", daemon=True).start()
        return None

    def serve(self, job: Job) -> None:
        """Run one request to its end; whatever fails is answered as an error (never a traceback)."""
        try:
            self.run(job)
        except InnerError as exc:
            self.send(job, pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc),
                                                                                                      exc.code)), True)
        except Exception as exc:  # noqa: BLE001  answered as an error response; the traceback goes to the log
            self.send(job, error_response(pb_utils, exc, "tensorrt_llm_bls"), True)
        finally:
            with self.jobs_lock:
                self.jobs.discard(job)
                self.jobs_lock.notify_all()

    def run(self, job: Job) -> None:
        """Preprocess, run the engine, postprocess and answer each engine response."""
        tensors = request_tensors(read_inputs(job.request, self.pipeline.inputs, pb_utils.get_input_tensor_by_name))
        if scalar(tensors, "stream", False) and not self.decoupled:
            raise RequestError("stream is true but this repository was built with --decoupled-mode false, whose "
                               "models send exactly one response per request; send stream=false, or rebuild with "
                               "--decoupled-mode true and stream over gRPC")
        for step in self.pipeline.before:
            tensors.update(stored(step, self.call(step, tensors)))
        engine = self.pipeline.engine
        request = pb_utils.InferenceRequest(
            model_name=engine.model, requested_output_names=list(engine.outputs), request_id=job.engine_id,
            inputs=[pb_utils.Tensor(k, v) for k, v in step_inputs(engine, tensors).items()])
        job.engine_started = True
        try:
            sent = self.relay(job, request.exec(decoupled=True), tensors)
        except BaseException:  # our side failed (e.g. postprocessing refused a chunk): the engine request must end
            send_stop(self.engine_model, job.engine_id, [])
            raise
        if job.cancelled and not job.closed:
            raise InnerError("request cancelled: the client cancelled it", pb_utils.TritonError.CANCELLED)
        if not job.closed:
            if not sent:  # a unary model must send one response, and a request without any answer is a bug
                raise InnerError(f"{engine.model} ended the request without a response; retry it, and report it if "
                                 "it happens again", pb_utils.TritonError.INTERNAL)
            self.send(job, None, True)  # the engine's last response had no is_final (decoupled only)

    def relay(self, job: Job, responses: Any, tensors: dict[str, np.ndarray]) -> int:
        """Answer each engine response (after the steps that follow the engine); how many answers went out."""
        engine, sent = self.pipeline.engine, 0
        accumulator = Accumulator() if self.accumulate else None
        for response in responses:
            if response.has_error():
                raise InnerError(response.error().message(), response.error().code())
            outputs = {name: tensor.as_numpy() for name in engine.outputs
                       if (tensor := pb_utils.get_output_tensor_by_name(response, name)) is not None}
            if OUTPUT_IDS not in outputs or job.cancelled:  # an empty final response, or no one to answer
                continue
            final = IS_FINAL in outputs and bool(np.asarray(outputs[IS_FINAL]).reshape(-1)[0])
            tensors.update(stored(engine, accumulator.add(outputs) if accumulator else outputs))
            for step in self.pipeline.after:
                tensors.update(stored(step, self.call(step, tensors)))
            answer = [pb_utils.Tensor(name, tensors[name]) for name in self.pipeline.outputs if name in tensors]
            self.send(job, pb_utils.InferenceResponse(output_tensors=answer), final)
            sent += 1
        return sent

    def call(self, step: Step, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One unary BLS request for step; its outputs, or InnerError with the model's own error."""
        request = pb_utils.InferenceRequest(
            model_name=step.model, requested_output_names=list(step.outputs),
            inputs=[pb_utils.Tensor(k, v) for k, v in step_inputs(step, tensors).items()])
        response = request.exec()
        if response.has_error():
            raise InnerError(response.error().message(), response.error().code())
        return {name: tensor.as_numpy() for name in step.outputs
                if (tensor := pb_utils.get_output_tensor_by_name(response, name)) is not None}

    def send(self, job: Job, response: Any, final: bool) -> None:
        """Send one response of job (final: with the FINAL flag; response None: the flag alone), under its lock;
        nothing after its final one. A client that went away is not an error here."""
        with job.lock:
            if job.closed:
                return
            job.closed = final
            try:
                job.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)
            except Exception as exc:  # noqa: BLE001  the client went away, or the server is stopping
                job.closed = True
                pb_utils.Logger.log_warn(f"tensorrt_llm_bls could not answer a request: {exc}")

    def watch(self) -> None:
        """Watcher thread: ask each open request whether its client cancelled it, every period; stop the engine
        request of a cancelled one (again each period until it ends: the stop may arrive before the engine
        request does)."""
        while not self.stopping.wait(self.period_s):
            with self.jobs_lock:
                jobs = list(self.jobs)
            for job in jobs:
                with job.lock:
                    if job.closed:
                        continue
                    if not job.cancelled:
                        try:
                            job.cancelled = bool(job.request.is_cancelled())
                        except Exception:  # noqa: BLE001  a request that cannot answer says nothing
                            continue
                if job.cancelled and job.engine_started:
                    send_stop(self.engine_model, job.engine_id, [])

    def finalize(self) -> None:
        """Stop the watcher; wait (up to SHUTDOWN_WAIT_S) for the requests in flight to end."""
        self.stopping.set()
        deadline = time.monotonic() + SHUTDOWN_WAIT_S
        with self.jobs_lock:
            while self.jobs and time.monotonic() < deadline:
                self.jobs_lock.wait(0.1)
        self.watcher.join(SHUTDOWN_WAIT_S)
