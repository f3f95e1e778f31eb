"""Issue #20 point 3, TensorRT-LLM's contract over a real tritonserver: --decoupled-mode false (unary ensemble and BLS
over HTTP and gRPC, streaming refused), stop=true ending the stopped request normally, the optional upstream inputs
NVIDIA's clients send, and the tensorrt_llm_bls model (streamed deltas equal the ensemble's, accumulate_tokens,
errors, cancellation). The pure parts (request checks, the BLS's pipeline and accumulator) are tested without one."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from triton_helpers import TIMEOUT_S, engine_inputs, read_metrics, run_stream

from builder.errors import ConfigError, RequestError

SETTINGS = dict(dtype="float32", max_batch_size=64, max_input_len=128, max_seq_len=256, max_num_tokens=256,
                kv_cache_memory_mb=8)
PROMPTS = ["Hello world", "Café ünïcödé: 東京の天気は晴れ 🚀 ok", " leading space and\nnew line"]
MAX_TOKENS = 20
# every optional input the ensemble / BLS declare, with its tritonclient dtype
TYPES = {
    "text_input": "BYTES", "decoder_text_input": "BYTES", "max_tokens": "INT32", "num_return_sequences": "INT32",
    "bad_words": "BYTES", "stop_words": "BYTES", "exclude_input_in_output": "BOOL", "end_id": "INT32",
    "pad_id": "INT32", "top_k": "INT32", "top_p": "FP32", "temperature": "FP32", "length_penalty": "FP32",
    "repetition_penalty": "FP32", "min_tokens": "INT32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
    "seed": "UINT64", "return_log_probs": "BOOL", "return_context_logits": "BOOL", "return_generation_logits": "BOOL",
    "return_perf_metrics": "BOOL", "beam_width": "INT32", "stream": "BOOL",
    # tensorrt_llm's own
    "input_ids": "INT32", "input_lengths": "INT32", "request_output_len": "INT32", "streaming": "BOOL",
    "runtime_top_k": "INT32", "runtime_top_p": "FP32", "len_penalty": "FP32", "stop": "BOOL",
}
NUMPY = {"INT32": np.int32, "FP32": np.float32, "BOOL": bool, "UINT64": np.uint64, "BYTES": object}


def inputs(**values) -> list[grpcclient.InferInput]:
    """[1, n] request tensors from keyword values (lists for [1, n] word lists and ids)."""
    tensors = []
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        if TYPES[name] == "BYTES":
            items = [v.encode() if isinstance(v, str) else v for v in items]
        array = np.array([items], dtype=NUMPY[TYPES[name]])
        tensor = grpcclient.InferInput(name, list(array.shape), TYPES[name])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def greedy(prompt: str, **extra) -> dict:
    """A greedy ensemble/BLS request that does not echo the prompt."""
    return dict(text_input=prompt, max_tokens=MAX_TOKENS, exclude_input_in_output=True, **extra)


def build_and_serve(tmp_path_factory, hf_dir: Path, name: str, **serving):
    """Build a repository with these ServingOptions and start tritonserver on it (ready within 300 s, as conftest's
    servers: a loaded machine takes longer than TritonServer's default); the caller stops it."""
    from builder.build import BuildOptions, build
    from builder.config import BuildSettings
    from builder.repo.render import ServingOptions
    from builder.serve import TritonServer, free_port

    repo = tmp_path_factory.mktemp("contract") / name
    build(BuildOptions(output=repo, model=str(hf_dir), settings=BuildSettings(**SETTINGS),
                       serving=ServingOptions(**serving)))
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          log_path=repo.parent / f"{name}.log")
    server.start()
    try:
        server.wait_ready(timeout=300)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def unary_server(tmp_path_factory, tiny_checkpoints):
    """tiny-llama built with --decoupled-mode false, served."""
    server = build_and_serve(tmp_path_factory, tiny_checkpoints["LlamaForCausalLM"], "unary", decoupled_mode=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def accumulate_server(tmp_path_factory, tiny_checkpoints):
    """tiny-llama built with the BLS's accumulate_tokens on, served."""
    server = build_and_serve(tmp_path_factory, tiny_checkpoints["LlamaForCausalLM"], "accumulate",
                             accumulate_tokens=True)
    yield server
    server.stop()


def unary_grpc(url: str, model: str, request: dict, request_id: str = "") -> tuple[list[str] | None, str | None]:
    """client.infer() over gRPC: (text_output items, None) or (None, error)."""
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, inputs(**request), request_id=request_id, client_timeout=TIMEOUT_S)
        texts = [t.decode() for t in result.as_numpy("text_output").reshape(-1)]
        assert result.as_numpy("text_output").shape == (1,)  # postprocessing's 1-D OUTPUT, as upstream's
        return texts, None
    except grpcclient.InferenceServerException as exc:
        return None, str(exc)
    finally:
        client.close()


def unary_http(url: str, model: str, request: dict) -> tuple[list[str] | None, str | None]:
    """POST /v2/models/<model>/infer (KServe v2 JSON): (text_output items, None) or (None, error)."""
    body = {"inputs": [{"name": name, "shape": [1, len(value) if isinstance(value, list) else 1],
                        "datatype": TYPES[name], "data": value if isinstance(value, list) else [value]}
                       for name, value in request.items()]}
    post = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    try:
        answer = json.loads(urllib.request.urlopen(post, timeout=TIMEOUT_S).read())
    except urllib.error.HTTPError as exc:
        return None, exc.read().decode()
    output = next(o for o in answer["outputs"] if o["name"] == "text_output")
    assert output["shape"] == [1]
    return output["data"], None


# ---------------------------------------------------------------------------------------------------------------
# --decoupled-mode false


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_unary_repository_answers_infer_as_the_streamed_text(llama_server, unary_server, model):
    """On a --decoupled-mode false repository client.infer() works over gRPC and HTTP, for the ensemble and the BLS,
    and its text equals the joined streamed chunks of the default (decoupled) repository, byte for byte."""
    for prompt in PROMPTS:
        streamed = run_stream(llama_server.grpc_url, "ensemble", inputs(**greedy(prompt, stream=True)))
        assert streamed.error is None and len(streamed.texts) > 1, streamed.error
        by_grpc, error = unary_grpc(unary_server.grpc_url, model, greedy(prompt))
        assert error is None, error
        by_http, error = unary_http(unary_server.http_url, model, greedy(prompt))
        assert error is None, error
        assert by_grpc[0].encode() == by_http[0].encode() == streamed.text.encode(), prompt


@pytest.mark.server
def test_decoupled_repository_still_refuses_unary_infer(llama_server):
    """The default repository stays decoupled: Triton refuses client.infer() there (streaming is the way)."""
    texts, error = unary_grpc(llama_server.grpc_url, "ensemble", greedy("Hello"))
    assert texts is None and "decoupled" in error


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_unary_repository_refuses_streaming(unary_server, model):
    """stream=true on a unary repository gets an error saying why and what to do, over a stream and unary."""
    result = run_stream(unary_server.grpc_url, model, inputs(**greedy("Hello", stream=True)))
    assert result.error is not None and "--decoupled-mode false" in result.error and "stream=false" in result.error
    texts, error = unary_grpc(unary_server.grpc_url, model, greedy("Hello", stream=True))
    assert texts is None and "--decoupled-mode false" in error
    texts, error = unary_grpc(unary_server.grpc_url, model, greedy("Hello", stream=False))
    assert error is None and texts[0]


@pytest.mark.server
def test_unary_engine_refuses_streaming_and_serves_ids(unary_server):
    """tensorrt_llm itself on a unary repository: streaming=true refused, a plain request answered by infer()."""
    client = grpcclient.InferenceServerClient(unary_server.grpc_url)
    try:
        with pytest.raises(grpcclient.InferenceServerException, match="--decoupled-mode false"):
            client.infer("tensorrt_llm", engine_inputs(input_ids=[5, 6, 7], input_lengths=3, request_output_len=4,
                                                       streaming=True))
        result = client.infer("tensorrt_llm", engine_inputs(input_ids=[5, 6, 7], input_lengths=3,
                                                            request_output_len=4, exclude_input_in_output=True))
        assert result.as_numpy("output_ids").shape == (1, 1, 4)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# stop=true


def stop_inputs() -> list[grpcclient.InferInput]:
    """The stop request NVIDIA's inflight_batcher_llm_client.py sends (an unused id, length 0, stop=true)."""
    return inputs(input_ids=[0], input_lengths=0, request_output_len=0, stop=True)


@pytest.mark.server
def test_stop_request_ends_the_stopped_stream_normally(llama_server):
    """A stop=true request with a streaming request's id ends that request with a normal final response (FINAL
    flag, no error) after what it generated so far; the stop request itself gets one empty final response."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(llama_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tensorrt_llm", inputs(input_ids=[9, 10, 11], input_lengths=3, request_output_len=230,
                                                         streaming=True, min_tokens=230),
                                  request_id="victim", enable_empty_final_response=True)
        tokens, stop = [], None
        while True:
            result, error = responses.get(timeout=TIMEOUT_S)
            assert error is None, error  # NVIDIA's client raises on an error here
            if "output_ids" in {o.name for o in result.get_response().outputs}:
                tokens += result.as_numpy("output_ids").reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            if len(tokens) >= 3 and stop is None:  # on a stream of its own, with the victim's request id
                stop = run_stream(llama_server.grpc_url, "tensorrt_llm", stop_inputs(), request_id="victim")
        assert 3 <= len(tokens) < 230, len(tokens)
        assert stop is not None and stop.error is None and not stop.token_chunks and not stop.texts
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.server
def test_stop_request_on_a_unary_repository(unary_server):
    """NVIDIA's inflight_batcher_llm_client.py without streaming: async_infer() of a long request, then async_infer()
    of the stop request with its id; both answer, the stopped one with the ids generated so far (no error)."""
    client = grpcclient.InferenceServerClient(unary_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    try:
        client.async_infer("tensorrt_llm", inputs(input_ids=[9, 10, 11], input_lengths=3, request_output_len=230,
                                                  min_tokens=230, exclude_input_in_output=True),
                           callback=lambda result, error: answers.put(("victim", result, error)), request_id="victim")
        time.sleep(0.3)
        client.async_infer("tensorrt_llm", stop_inputs(), request_id="victim",
                           callback=lambda result, error: answers.put(("stop", result, error)))
        got = dict((name, (result, error)) for name, result, error in (answers.get(timeout=TIMEOUT_S)
                                                                        for _ in range(2)))
        assert got["stop"][1] is None and got["victim"][1] is None, (got["stop"][1], got["victim"][1])
        ids = got["victim"][0].as_numpy("output_ids").reshape(-1)
        assert 0 < len(ids) < 230 and got["victim"][0].as_numpy("is_final").reshape(-1)[0]
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------------------
# optional upstream inputs


NVIDIA_DEFAULTS = dict(stream=False, beam_width=1, temperature=1.0, num_return_sequences=1, length_penalty=1.0,
                       return_log_probs=False, return_context_logits=False, return_generation_logits=False,
                       return_perf_metrics=False, decoder_text_input="")


@pytest.mark.server
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_upstream_optional_inputs_at_their_defaults_are_accepted(llama_server, model):
    """What NVIDIA's end_to_end_grpc_client.py sends by default (stream, beam_width, temperature, exclude_input_in_
    output; num_return_sequences with -n) and the other upstream inputs at their defaults change nothing; greedy
    (top_k 1) text equals the plain request's."""
    plain = run_stream(llama_server.grpc_url, model, inputs(**greedy("Hello world", top_k=1)))
    full = run_stream(llama_server.grpc_url, model, inputs(**greedy("Hello world", top_k=1, **NVIDIA_DEFAULTS)))
    assert plain.error is None and full.error is None, (plain.error, full.error)
    assert full.text == plain.text and full.text


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("name, value", [("num_return_sequences", 2), ("return_log_probs", True),
                                         ("return_context_logits", True), ("return_generation_logits", True),
                                         ("return_perf_metrics", True), ("length_penalty", float("nan"))])
@pytest.mark.server
def test_unsupported_values_are_refused_not_ignored(llama_server, model, name, value):
    """A value of an upstream input this engine cannot honour gets an error naming the input."""
    result = run_stream(llama_server.grpc_url, model, inputs(**greedy("Hello", **{name: value})))
    wanted = "len_penalty" if name == "length_penalty" else name
    assert result.error is not None and wanted in result.error, result.error


@pytest.mark.server
def test_tools_utils_engine_inputs_are_accepted(llama_server):
    """tensorrt_llm takes the inputs TensorRT-LLM's tools/utils send at their defaults (len_penalty 1, min_tokens 1,
    seed 0, beam_width 1) plus decoder_input_ids / decoder_input_lengths, which a decoder-only engine ignores."""
    base = dict(input_ids=[5, 6, 7], input_lengths=3, request_output_len=6, exclude_input_in_output=True,
                runtime_top_k=1, streaming=False)
    plain = run_stream(llama_server.grpc_url, "tensorrt_llm", inputs(**base))
    extra = run_stream(llama_server.grpc_url, "tensorrt_llm", inputs(**base, len_penalty=1.0, min_tokens=1,
                                                                    beam_width=1, temperature=1.0))
    assert plain.error is None and extra.error is None, (plain.error, extra.error)
    assert extra.tokens == plain.tokens and len(plain.tokens) == 6
    decoder = run_stream(llama_server.grpc_url, "tensorrt_llm", inputs(**base) + [
        _array("decoder_input_ids", np.array([[0]], np.int32)), _array("decoder_input_lengths", np.array([[1]],
                                                                                                       np.int32))])
    assert decoder.error is None and decoder.tokens == plain.tokens


def _array(name: str, array: np.ndarray) -> grpcclient.InferInput:
    """One request tensor from an array."""
    tensor = grpcclient.InferInput(name, list(array.shape), {np.int32: "INT32"}[array.dtype.type])
    tensor.set_data_from_numpy(array)
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# tensorrt_llm_bls


@pytest.mark.server
def test_bls_streams_the_ensembles_deltas(llama_server):
    """BLS streamed chunks joined equal the ensemble's, byte for byte (greedy and seeded sampling), and the
    non-streamed BLS text too."""
    for prompt in PROMPTS:
        for sampling in ({}, dict(temperature=1.0, top_k=50, seed=3)):
            request = greedy(prompt, **sampling)
            ensemble = run_stream(llama_server.grpc_url, "ensemble", inputs(**request, stream=True))
            bls = run_stream(llama_server.grpc_url, "tensorrt_llm_bls", inputs(**request, stream=True))
            whole = run_stream(llama_server.grpc_url, "tensorrt_llm_bls", inputs(**request, stream=False))
            assert ensemble.error is None and bls.error is None and whole.error is None
            assert len(bls.texts) > 1 and len(whole.texts) == 1
            assert bls.text.encode() == ensemble.text.encode() == whole.text.encode(), (prompt, sampling)


@pytest.mark.server
def test_bls_accumulate_tokens_streams_cumulative_text(accumulate_server):
    """With accumulate_tokens=true every streamed chunk is the whole text so far; the last equals the ensemble's
    joined deltas."""
    for prompt in PROMPTS:
        ensemble = run_stream(accumulate_server.grpc_url, "ensemble", inputs(**greedy(prompt, stream=True)))
        bls = run_stream(accumulate_server.grpc_url, "tensorrt_llm_bls", inputs(**greedy(prompt, stream=True)))
        assert ensemble.error is None and bls.error is None and len(bls.texts) > 1
        assert all(later.startswith(earlier) for earlier, later in zip(bls.texts, bls.texts[1:]))
        assert bls.texts[-1].encode() == ensemble.text.encode(), prompt


@pytest.mark.server
def test_bls_answers_inner_errors_as_its_own(llama_server):
    """Errors of preprocessing (empty prompt), tensorrt_llm (too long) and the BLS itself come back as the BLS's
    error response, with the inner model's message; the server keeps serving."""
    url = llama_server.grpc_url
    cases = [(dict(text_input="", max_tokens=8), "text_input is empty"),
             (dict(text_input="hi", max_tokens=0), "max_tokens"),
             (dict(text_input="hi " * 20, max_tokens=llama_server.max_seq_len), "max_seq_len"),
             (dict(text_input="hi", max_tokens=8, top_p=-0.5), "top_p")]
    for request, needle in cases:
        for stream in (False, True):
            result = run_stream(url, "tensorrt_llm_bls", inputs(**request, stream=stream))
            assert result.error is not None and needle in result.error, (request, result.error)
    good = run_stream(url, "tensorrt_llm_bls", inputs(**greedy("still serving", stream=True)))
    assert good.error is None and good.text


@pytest.mark.server
def test_bls_cancellation_stops_the_engine_request(llama_server):
    """A client that closes its BLS stream gets its engine request stopped (aborted, KV blocks returned), while
    non-streamed BLS requests keep the engine busy and finish."""
    done, threads = [], []

    def request(i: int, cancel: bool) -> None:
        text = f"cancel me {i} " * 5 if cancel else f"keep busy {i}"
        result = run_stream(llama_server.grpc_url, "tensorrt_llm_bls",
                            inputs(text_input=text, max_tokens=200, min_tokens=200, stream=cancel),
                            request_id=f"{'c' if cancel else 'b'}{i}", cancel_after=3 if cancel else None)
        if not cancel:
            done.append(result)

    threads = [threading.Thread(target=request, args=(i, False)) for i in range(16)]
    threads += [threading.Thread(target=request, args=(i, True)) for i in range(4)]
    before = read_metrics(llama_server.metrics_port)["builder_engine_requests_aborted_total"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    deadline = time.time() + 60
    while True:
        metrics = read_metrics(llama_server.metrics_port)
        if metrics["builder_requests_active"] == 0 and \
                metrics["builder_kv_cache_blocks_free"] == metrics["builder_kv_cache_blocks_total"]:
            break
        assert time.time() < deadline, "the engine requests did not end"
        time.sleep(0.2)
    assert metrics["builder_engine_requests_aborted_total"] - before >= 4
    assert len(done) == 16 and all(r.error is None and r.text for r in done)


# ---------------------------------------------------------------------------------------------------------------
# pure parts


def test_check_unsupported_names_the_input():
    """Streaming on a unary model, non-default return_* flags and a non-finite len_penalty are refused by name;
    INPUTS reads the decoder, len_penalty, num_return_sequences and stop inputs."""
    from builder.triton.engine_model import check_unsupported

    from builder.triton.engine_model import INPUTS

    assert {"decoder_input_ids", "decoder_input_lengths", "len_penalty", "num_return_sequences", "stop"} <= set(INPUTS)
    check_unsupported({"streaming": np.array([True]), "return_log_probs": np.array([False]),
                       "len_penalty": np.array([1.7], np.float32)}, True)
    for inputs_, needle in [({"streaming": np.array([True])}, "--decoupled-mode false"),
                            ({"return_log_probs": np.array([True])}, r"return_log_probs = True"),
                            ({"return_perf_metrics": np.array([True])}, "return_perf_metrics"),
                            ({"len_penalty": np.array([np.inf], np.float32)}, "len_penalty")]:
        with pytest.raises(RequestError, match=needle):
            check_unsupported(inputs_, False)


def test_bls_pipeline_and_accumulator(tmp_path):
    """pipeline.json splits around the engine step (named by tensorrt_llm_model_name); the accumulator joins the
    ids of a request's responses after the first context; scalar-reshaped inputs get their batch dimension back."""
    from builder.repo.render import load_pipeline as load_yaml
    from builder.triton.bls import Accumulator, load_pipeline, request_tensors

    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(load_yaml("llm")))
    pipeline = load_pipeline(path, "my_engine")
    assert [s.model for s in pipeline.before] == ["preprocessing"] and pipeline.engine.model == "my_engine"
    assert [s.model for s in pipeline.after] == ["postprocessing"] and "text_input" in pipeline.inputs
    path.write_text(json.dumps({"inputs": [], "outputs": [], "steps": []}))
    with pytest.raises(ConfigError, match="marks 0 steps"):
        load_pipeline(path, "x")
    acc = Accumulator()
    first = acc.add({"output_ids": np.array([[[4, 5]]], np.int32), "sequence_length": np.array([[2]], np.int32),
                     "detok_context_ids": np.array([[1, 2]], np.int32), "is_final": np.array([[False]])})
    second = acc.add({"output_ids": np.array([[[6, 0]]], np.int32), "sequence_length": np.array([[1]], np.int32),
                      "detok_context_ids": np.array([[4, 5]], np.int32), "is_final": np.array([[True]])})
    assert first["output_ids"].tolist() == [[[4, 5]]] and second["output_ids"].tolist() == [[[4, 5, 6]]]
    assert second["sequence_length"].tolist() == [[3]] and second["detok_context_ids"].tolist() == [[1, 2]]
    assert second["is_final"].tolist() == [[True]]
    shaped = request_tensors({"return_log_probs": np.array([False]), "text_input": np.array([[b"x"]], object)})
    assert shaped["return_log_probs"].shape == (1, 1) and shaped["text_input"].shape == (1, 1)
