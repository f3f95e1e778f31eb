"""The `tensorrt_llm` model: builder.runtime's LLMEngine in Triton's python backend, decoupled.

execute() only parses requests and queues them; one background thread owns the engine (it is not
thread-safe): it admits new requests, aborts cancelled ones, runs engine.step() and hands what each request
produced to the ResponseStreamer, whose sender threads send the responses (builder.triton.streamer), then
mirrors engine.stats into Triton custom metrics. Client cancellation is polled by a CancelWatcher thread
(builder.triton.cancel_watch), so its IPC round trips never hold up a step.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import BuilderError, RequestError
from builder.runtime.engine import LLMEngine
from builder.triton.cancel_watch import CancelWatcher
from builder.triton.stop_channel import StopListener
from builder.triton.streamer import ResponseStreamer, Stream
from builder.triton.tensors import (
    ENGINE_INPUTS, EngineRequest, engine_response, parameters, parse_bool, parse_engine_request, read_inputs, scalar)
from builder.triton.watchdog import StubWatchdog

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend
    pb_utils = None

# TensorRT-LLM inputs declared (with the same names in the ensemble) so that its clients' requests are accepted, with
# the only value this engine honours; any other value is refused by check_unsupported, never ignored
# (num_return_sequences and beam_width other than 1: by parse_engine_request).
DEFAULT_ONLY = {"return_log_probs": False, "return_context_logits": False, "return_generation_logits": False,
                "return_perf_metrics": False}
# what parse() reads: parse_engine_request's inputs (decoder_input_ids / decoder_input_lengths included), stop, and
# the inputs check_unsupported looks at
INPUTS = (*ENGINE_INPUTS, "stop", "len_penalty", *DEFAULT_ONLY)
IDLE_WAIT_S = 0.05  # how long the loop sleeps on an empty queue when no request is running
SHUTDOWN_WAIT_S = 30.0
METRICS_PERIOD_S = 0.05  # metric pushes are IPC calls: at most this often while busy, at once when idle
SHUTTING_DOWN = "the server is shutting down; retry on another server"
DEFAULT_CANCEL_CHECK_MS = 100.0  # TensorRT-LLM's cancellation_check_period_ms default
DEFAULT_SENDER_THREADS = 2
DEFAULT_MAX_RESPONSES_PER_S = 2000.0  # streamed responses, all requests together (0: unbounded)

# (name, counter?, help, value from (EngineStats, number of active requests))
METRICS: tuple[tuple[str, bool, str, Callable[[Any, int], float]], ...] = (
    ("builder_engine_steps_total", True, "Engine iterations run", lambda s, a: s.steps),
    ("builder_engine_multi_seq_steps_total", True, "Iterations that ran more than one sequence",
     lambda s, a: s.multi_seq_steps),
    ("builder_engine_mixed_steps_total", True, "Iterations with prefill and decode together",
     lambda s, a: s.mixed_steps),
    ("builder_engine_max_seqs_in_step", False, "Most sequences run in one iteration",
     lambda s, a: s.max_seqs_in_step),
    ("builder_engine_preemptions_total", True, "Sequences preempted for KV space", lambda s, a: s.preemptions),
    ("builder_engine_requests_finished_total", True, "Requests finished", lambda s, a: s.requests_finished),
    ("builder_engine_requests_aborted_total", True, "Requests aborted (cancelled or stopped)",
     lambda s, a: s.requests_aborted),
    ("builder_engine_prefill_tokens_total", True, "Prompt tokens computed", lambda s, a: s.prefill_tokens),
    ("builder_engine_decode_tokens_total", True, "Tokens decoded", lambda s, a: s.decode_tokens),
    ("builder_kv_cache_blocks_total", False, "KV cache blocks in the pool", lambda s, a: s.kv_blocks_total),
    ("builder_kv_cache_blocks_free", False, "KV cache blocks free now", lambda s, a: s.kv_blocks_free),
    ("builder_requests_active", False, "Requests in the engine now", lambda s, a: a),
)


# TensorRT-LLM backend's gauge families (tensorrtllm_backend's custom metrics), which dashboards, Dynamo and
# Kubernetes routers read by name: (family, help, label key, ((label value, value from (EngineStats, active
# requests, engine limits)), ...)). docs/serving.md lists them.
TRTLLM_METRICS: tuple[tuple[str, str, str, tuple[tuple[str, Callable[[Any, int, Any], float]], ...]], ...] = (
    ("nv_trt_llm_request_metrics", "TRT LLM request metrics", "request_type", (
        ("active", lambda s, a, e: a),
        ("max", lambda s, a, e: e.max_batch_size),
        ("scheduled", lambda s, a, e: s.last_step_seqs),
        ("context", lambda s, a, e: s.last_step_context_seqs),
        ("waiting", lambda s, a, e: s.waiting))),
    ("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics", "kv_cache_block_type", (
        ("max", lambda s, a, e: s.kv_blocks_total),
        ("free", lambda s, a, e: s.kv_blocks_free),
        ("used", lambda s, a, e: s.kv_blocks_total - s.kv_blocks_free),
        ("tokens_per", lambda s, a, e: e.tokens_per_block),
        ("fraction", lambda s, a, e: (s.kv_blocks_total - s.kv_blocks_free) / max(1, s.kv_blocks_total)))),
    ("nv_trt_llm_inflight_batcher_metrics", "TRT LLM inflight_batcher-specific metrics",
     "inflight_batcher_specific_metric", (
        ("micro_batch_id", lambda s, a, e: 0),  # no pipeline parallelism: one micro batch
        ("generation_requests", lambda s, a, e: s.last_step_seqs - s.last_step_context_seqs),
        ("total_context_tokens", lambda s, a, e: s.last_step_context_tokens),
        ("paused_requests", lambda s, a, e: 0))),
    ("nv_trt_llm_general_metrics", "General TRT LLM metrics", "general_type", (
        ("iteration_counter", lambda s, a, e: s.steps),
        ("timestamp", lambda s, a, e: int(time.time())))),
)


@dataclass(frozen=True)
class EngineLimits:
    """The engine's fixed sizes that TensorRT-LLM's metrics report."""

    max_batch_size: int
    tokens_per_block: int


@dataclass
class NewRequest:
    """A parsed request on its way from execute() to the engine thread."""

    triton_id: str
    request: Any
    sender: Any
    parsed: EngineRequest


@dataclass
class StopRequest:
    """A request with stop=true: cancel the in-flight requests that carry the same Triton request id.

    When it also carries input_ids (`tail`), only requests whose sequence contains them are cancelled, so
    two clients that happen to use the same request id do not cancel each other.
    """

    triton_id: str
    sender: Any  # None: the stop came from postprocessing over builder.triton.stop_channel (nobody to answer)
    tail: list[int] = field(default_factory=list)
    client_cancelled: bool = False  # True: the ensemble's client cancelled (from postprocessing), not stop=true

    def matches(self, stream: Stream) -> bool:
        """True when stream's request is one this stop is meant for."""
        act: ActiveRequest = stream.request
        return act.triton_id == self.triton_id and contains(act.parsed.prompt + stream.generated, self.tail)


@dataclass(frozen=True)
class Drain:
    """The server is being stopped (builder serve, over builder.triton.stop_channel): end every request now."""


@dataclass(frozen=True)
class ActiveRequest:
    """A request the engine is running (the `request` of its Stream, which sender and watcher threads read)."""

    request_id: str  # the engine's id
    triton_id: str
    request: Any  # the Triton request
    parsed: EngineRequest


class EngineMetrics:
    """Triton custom metrics mirroring EngineStats: builder's own (METRICS) and TensorRT-LLM's gauge families
    (TRTLLM_METRICS). Families are kept referenced, or Triton drops them."""

    def __init__(self, labels: dict[str, str], limits: Any) -> None:
        """Register one family and one labelled metric per METRICS entry, and TensorRT-LLM's families with one
        metric per label value; limits holds max_batch_size and tokens_per_block (the engine's)."""
        self.families = []
        self.metrics = []  # (metric, counter?, value from (stats, active, limits))
        for name, counter, description, value_of in METRICS:
            kind = pb_utils.MetricFamily.COUNTER if counter else pb_utils.MetricFamily.GAUGE
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self.families.append(family)
            self.metrics.append((family.Metric(labels=labels), counter,
                                 lambda s, a, e, value_of=value_of: value_of(s, a)))
        for name, description, key, values in TRTLLM_METRICS:
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.GAUGE)
            self.families.append(family)
            for label, value_of in values:
                self.metrics.append((family.Metric(labels={key: label, **labels}), False, value_of))
        self.limits = limits
        self.last = [None] * len(self.metrics)

    def update(self, stats: Any, active: int) -> None:
        """Push the values that changed since the last update."""
        for i, (metric, counter, value_of) in enumerate(self.metrics):
            value = float(value_of(stats, active, self.limits))
            if value == self.last[i]:
                continue
            if counter:
                metric.increment(value - (self.last[i] or 0.0))
            else:
                metric.set(value)
            self.last[i] = value


def contains(sequence: list[int], part: list[int]) -> bool:
    """True when part occurs contiguously in sequence (always for an empty part)."""
    n = len(part)
    return n == 0 or any(sequence[i:i + n] == part for i in range(len(sequence) - n + 1))


def check_unsupported(inputs: dict[str, Any], decoupled: bool) -> None:
    """RequestError for a request this model accepts by name but cannot honour: streaming on a model that is not
    decoupled (as TensorRT-LLM's python model refuses it), a non-default value of a DEFAULT_ONLY input, or a
    len_penalty that is not a finite number (it applies to beam search only, as in TensorRT-LLM; beam_width is 1).
    The other inputs' values are checked by parse_engine_request."""
    if scalar(inputs, "streaming", False) and not decoupled:
        raise RequestError("streaming (ensemble: stream) is true but this repository was built with --decoupled-mode "
                           "false, whose models send exactly one response per request; send stream=false, or rebuild "
                           "with --decoupled-mode true and stream over gRPC")
    for name, default in DEFAULT_ONLY.items():
        value = scalar(inputs, name, default)
        if value != default:
            raise RequestError(f"{name} = {value} is not supported: this engine returns no log probabilities, "
                               f"logits or perf metrics; send {str(default).lower()} or leave it out")
    penalty = scalar(inputs, "len_penalty", 1.0)
    if not math.isfinite(penalty):
        raise RequestError(f"len_penalty (ensemble: length_penalty) = {penalty} is not a finite number; send one "
                           "(it applies to beam search only; beam_width is 1 here)")


def send_error(sender: Any, message: str, code: int) -> None:
    """Answer a request with an error and close it; a request that is already gone is ignored."""
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:  # noqa: BLE001  the client may have gone away; nothing is left to answer
        pass


class TritonPythonModel:
    """Triton python-backend model running LLMEngine on a background thread."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the engine named by gpt_model_path and start the engine thread."""
        config = json.loads(args["model_config"])
        # not decoupled (--decoupled-mode false): still answered from the sender threads, exactly one response per
        # request (Triton's python backend lets a non-decoupled model send one response, FINAL flag, after execute
        # returned None); streaming requests are refused (check_unsupported)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        params = parameters(config)
        self.default_exclude = parse_bool(params.get("exclude_input_in_output"), False)
        self.engine = self.load_engine(Path(args["model_repository"]) / params.get("gpt_model_path", "1/engine"),
                                       params)
        self.metrics = EngineMetrics({"model": args["model_name"], "version": args["model_version"]},
                                     EngineLimits(self.engine.max_batch_size,
                                                  self.engine.config.build.tokens_per_block))
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict[str, Stream] = {}  # engine request id -> its stream (engine thread only)
        self.ids = itertools.count()
        self.last_metrics = 0.0
        # (stream, cancelled): the client cancelled it, or (False) its response could not be sent; engine thread aborts
        self.dropped: queue.Queue = queue.Queue()
        self.streamer = ResponseStreamer(
            self.deliver, self.deliver_error, lambda stream: self.dropped.put((stream, False)),
            threads=int(params.get("response_sender_threads") or DEFAULT_SENDER_THREADS),
            max_responses_per_s=float(params.get("max_responses_per_second", DEFAULT_MAX_RESPONSES_PER_S)))
        cancel_check_ms = params.get("cancellation_check_period_ms")
        self.watcher = CancelWatcher(
            self.streamer, lambda stream: stream.request.request.is_cancelled(),
            lambda stream: self.dropped.put((stream, True)),
            period_s=float(cancel_check_ms if cancel_check_ms not in (None, "") else DEFAULT_CANCEL_CHECK_MS) / 1000)
        self.watchdog = StubWatchdog(args["model_name"], pb_utils.Logger.log_error)
        self.draining = False  # builder serve is stopping the server: every request is answered UNAVAILABLE
        self.stops = StopListener(args["model_name"], lambda triton_id, tail: self.inbox.put(
            StopRequest(triton_id, None, tail, client_cancelled=True)), lambda: self.inbox.put(Drain()))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run_loop, name="builder-engine", daemon=True)
        self.thread.start()

    def load_engine(self, engine_dir: Path, params: dict[str, str]) -> Any:
        """The runtime engine for engine_dir: device and KV pool from the parameters (kv_cache_memory_mb on CPU,
        kv_cache_free_gpu_mem_fraction on CUDA, as in TensorRT-LLM's backend)."""
        device = params.get("device") or "cpu"
        kv_mb, fraction = params.get("kv_cache_memory_mb"), params.get("kv_cache_free_gpu_mem_fraction")
        if device.startswith("cuda"):
            return LLMEngine(engine_dir, device=device,
                             kv_cache_free_gpu_mem_fraction=float(fraction) if fraction else None)
        return LLMEngine(engine_dir, device=device, kv_cache_memory_mb=float(kv_mb) if kv_mb else None)

    def execute(self, requests: list) -> None:
        """Queue each request for the engine thread; answer malformed ones with an error right away."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.inbox.put(self.parse(request, sender))
            except BuilderError as exc:
                send_error(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
        return None

    def parse(self, request: Any, sender: Any) -> NewRequest | StopRequest:
        """Read a request's tensors into a NewRequest or StopRequest; RequestError when invalid."""
        inputs = read_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name)
        if scalar(inputs, "stop", False):
            if not request.request_id():
                raise RequestError("stop=true needs the request id of the request to cancel; send it as the "
                                   "Triton request id")
            tail = [int(t) for t in inputs["input_ids"].reshape(-1)] if "input_ids" in inputs else []
            return StopRequest(request.request_id(), sender, tail[:scalar(inputs, "input_lengths", len(tail))])
        check_unsupported(inputs, self.decoupled)
        return NewRequest(request.request_id(), request, sender,
                          parse_engine_request(inputs, self.default_exclude))

    def run_loop(self) -> None:
        """The engine thread: admit, drop cancelled, step, respond, update metrics; until finalize."""
        while not self.stopping.is_set():
            try:
                self.admit(wait=not self.engine.has_unfinished())
                self.drop_streams()
                if self.engine.has_unfinished():
                    self.step()
                self.update_metrics()
            except Exception as exc:  # noqa: BLE001  an engine bug must not kill the loop
                pb_utils.Logger.log_error(f"tensorrt_llm engine step failed: {exc!r}")
                self.fail_all(f"the engine failed ({exc}); the request was dropped, retry it",
                              pb_utils.TritonError.INTERNAL)
        self.fail_all(SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)

    def admit(self, wait: bool) -> None:
        """Move queued requests into the engine (waiting briefly for one when idle)."""
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self.handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def handle(self, item: NewRequest | StopRequest | Drain) -> None:
        """Add a new request to the engine, carry out a stop request, or drain (the server is stopping)."""
        if isinstance(item, StopRequest):
            if item.client_cancelled:  # a cancellation: the stopped request ends with a CANCELLED error
                self.cancel(item.matches, "the client cancelled it")
            else:  # stop=true (TensorRT-LLM's): the stopped request ends normally, with what it generated so far
                self.finish(item.matches)
            if item.sender is not None:  # the stop request itself: one empty final response (unary models need one)
                try:
                    item.sender.send(pb_utils.InferenceResponse(output_tensors=[]),
                                     flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:  # noqa: BLE001  its client went away; nothing is left to answer
                    pass
            return
        if isinstance(item, Drain):
            self.draining = True
            self.fail_all(SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)
            return
        if self.draining:
            send_error(item.sender, SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)
            return
        request_id = str(next(self.ids))
        try:
            self.engine.add_request(request_id, item.parsed.prompt, item.parsed.params)
        except RequestError as exc:
            send_error(item.sender, str(exc), pb_utils.TritonError.INVALID_ARG)
            return
        act = ActiveRequest(request_id, item.triton_id, item.request, item.parsed)
        self.active[request_id] = self.streamer.open(item.sender, item.parsed.streaming, act)

    def cancel(self, match: Callable[[Stream], bool], reason: str) -> None:
        """Abort every active request whose stream matches (frees its KV blocks) and close it as cancelled."""
        for request_id, stream in list(self.active.items()):
            if match(stream):
                self.engine.abort(request_id)
                del self.active[request_id]
                self.streamer.fail(stream, f"request cancelled: {reason}", pb_utils.TritonError.CANCELLED)

    def finish(self, match: Callable[[Stream], bool]) -> None:
        """End every active request whose stream matches as if it had finished now: abort it in the engine (frees its
        KV blocks) and send its final response, carrying what it generated so far (FINAL flag), as TensorRT-LLM
        answers a request stopped by stop=true (finish reason cancelled, not an error)."""
        for request_id, stream in list(self.active.items()):
            if match(stream):
                self.engine.abort(request_id)
                del self.active[request_id]
                self.streamer.post(stream, [], True)

    def drop_streams(self) -> None:
        """Abort the requests the watcher found cancelled by their client (closed stream, timeout,
        stop_stream(cancel_requests)) and those whose response could not be sent (the client went away)."""
        while True:
            try:
                stream, cancelled = self.dropped.get_nowait()
            except queue.Empty:
                return
            act: ActiveRequest = stream.request
            if self.active.get(act.request_id) is not stream:  # finished or dropped meanwhile
                continue
            self.engine.abort(act.request_id)
            del self.active[act.request_id]
            if cancelled:
                self.streamer.fail(stream, "request cancelled: the client cancelled it", pb_utils.TritonError.CANCELLED)
            else:  # its stream is closed already
                pb_utils.Logger.log_warn(f"tensorrt_llm could not send a response for request {act.triton_id!r}; "
                                         "cancelled it")

    def update_metrics(self) -> None:
        """Mirror engine.stats into the metrics: throttled while requests run, at once when idle."""
        now = time.monotonic()
        if self.engine.has_unfinished() and now - self.last_metrics < METRICS_PERIOD_S:
            return
        self.last_metrics = now
        self.metrics.update(self.engine.stats, len(self.active))

    def step(self) -> None:
        """One engine iteration; hand what each request produced to the streamer."""
        for out in self.engine.step():
            stream = self.active.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self.active[out.request_id]
            self.streamer.post(stream, out.new_token_ids, out.finished)

    def deliver(self, stream: Stream, upto: int, final: bool) -> None:
        """Send stream.generated[stream.sent:upto] as one response (sender thread; FINAL flag with the last)."""
        parsed: EngineRequest = stream.request.parsed
        tensors = engine_response(parsed.prompt, stream.generated[:upto], upto - stream.sent, parsed, final)
        response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])
        stream.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def deliver_error(self, stream: Stream, message: str, code: int) -> None:
        """Close stream's request with an error (sender thread)."""
        send_error(stream.sender, message, code)

    def fail_all(self, message: str, code: int) -> None:
        """Abort every active and queued request with an error."""
        for request_id, stream in list(self.active.items()):
            self.engine.abort(request_id)
            self.streamer.fail(stream, message, code)
        self.active.clear()
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            send_error(item.sender, message, code)

    def finalize(self) -> None:
        """Stop the engine thread (requests still running get an error), then the engine (TP workers too)."""
        self.stopping.set()
        self.watchdog.close()
        self.stops.close()
        self.thread.join(timeout=SHUTDOWN_WAIT_S)
        self.watcher.close(timeout=SHUTDOWN_WAIT_S)
        self.streamer.close(timeout=SHUTDOWN_WAIT_S)
        self.engine.close()
