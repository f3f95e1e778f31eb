"""Bad input is refused early, with an error that names the input (issue #20); good requests keep working.

Unit tests run the python models' parsing directly; the server tests send each bad request to a real
tritonserver (gRPC and HTTP, real tritonclient) and check the server still answers a good request afterwards.
"""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import build_repo

from builder.errors import RequestError
from builder.runtime.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")
DENORMAL = 1.4e-45  # the smallest float32 denormal
MAX_INPUT_LEN = 128  # conftest.build_repo's limits
MAX_SEQ_LEN = 256
BYTES_PER_TOKEN = 17  # tiny-llama's longest token: "<|begin_of_text|>"
TIMEOUT_S = 120.0
NUMPY_TYPES = {"BYTES": object, "INT32": np.int32, "FP32": np.float32, "BOOL": bool, "UINT64": np.uint64}
ENSEMBLE = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "end_id": "INT32", "top_k": "INT32",
            "top_p": "FP32", "temperature": "FP32", "repetition_penalty": "FP32", "presence_penalty": "FP32",
            "frequency_penalty": "FP32", "min_tokens": "INT32", "seed": "UINT64", "beam_width": "INT32",
            "stop_words": "BYTES", "bad_words": "BYTES", "exclude_input_in_output": "BOOL"}
ENGINE = {"input_ids": "INT32", "input_lengths": "INT32", "request_output_len": "INT32", "streaming": "BOOL",
          "end_id": "INT32", "runtime_top_k": "INT32", "runtime_top_p": "FP32", "temperature": "FP32",
          "repetition_penalty": "FP32", "presence_penalty": "FP32", "frequency_penalty": "FP32",
          "min_tokens": "INT32", "beam_width": "INT32", "stop_words_list": "INT32", "bad_words_list": "INT32",
          "seed": "UINT64"}


# ---------------------------------------------------------------------------------------------------------------
# SamplingParams.validate: shared by every frontend


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -1),
    ("temperature", NAN), ("temperature", INF), ("temperature", -INF), ("temperature", -0.5),
    ("top_p", NAN), ("top_p", 1.5), ("top_p", -0.1), ("top_p", INF),
    ("top_k", -1),
    ("repetition_penalty", NAN), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", INF),
    ("presence_penalty", NAN), ("presence_penalty", INF), ("presence_penalty", -INF),
    ("frequency_penalty", NAN), ("frequency_penalty", INF),
    ("min_tokens", -1), ("seed", -1), ("seed", 2**64),
])
def test_sampling_params_refuse_non_finite_and_out_of_range_values(field, value):
    with pytest.raises(RequestError, match=rf"^{field}\b"):
        SamplingParams(**{field: value}).validate()


def test_sampling_params_labels_name_the_frontends_inputs():
    with pytest.raises(RequestError, match=r"^runtime_top_k \(ensemble: top_k\) must be"):
        SamplingParams(top_k=-3).validate({"top_k": "runtime_top_k (ensemble: top_k)"})


@pytest.mark.parametrize("values", [
    dict(temperature=1e-40), dict(temperature=DENORMAL, top_k=5), dict(temperature=1e-30, top_p=0.5),
    dict(temperature=3e38, top_k=2**31 - 1), dict(top_p=1e-40), dict(top_p=1.0), dict(repetition_penalty=1e-40),
    dict(repetition_penalty=3e38), dict(presence_penalty=-3e38, frequency_penalty=3e38), dict(min_tokens=2**31 - 1),
    dict(seed=2**64 - 1), dict(max_tokens=2**31 - 1),
])
def test_sampling_params_accept_extreme_valid_values(values):
    SamplingParams(**values).validate()


def test_tiny_temperature_is_greedy():
    """Below MIN_TEMPERATURE a request decodes greedily (docs/decisions.md: the tiny-temperature rule)."""
    from builder.runtime.sampling_params import MIN_TEMPERATURE

    assert SamplingParams(temperature=MIN_TEMPERATURE / 2, top_k=50).greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE, top_k=50).greedy


# ---------------------------------------------------------------------------------------------------------------
# tensorrt_llm request parsing (builder.triton.tensors)


def engine_request(**changes) -> dict[str, np.ndarray]:
    """A good tensorrt_llm request's tensors with `changes` applied (None removes a tensor)."""
    inputs = {"input_ids": np.array([[5, 6, 7]], np.int32), "input_lengths": np.array([3], np.int32),
              "request_output_len": np.array([4], np.int32)}
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("changes, needle", [
    (dict(request_output_len=None), r"request_output_len .*missing"),
    (dict(input_ids=None), r"input_ids .*missing"),
    (dict(input_ids=np.zeros((1, 1, 3), np.int32)), r"input_ids"),
    (dict(input_ids=np.zeros((2, 3), np.int32)), r"input_ids .*text_input"),
    (dict(input_lengths=np.array([4], np.int32)), r"input_lengths 4"),
    (dict(input_lengths=np.array([-1], np.int32)), r"input_lengths -1"),
    (dict(input_lengths=np.array([0], np.int32)), r"input_lengths 0"),
    (dict(input_lengths=np.array([1, 2], np.int32)), r"input_lengths"),
    (dict(request_output_len=np.array([0], np.int32)), r"request_output_len \(ensemble: max_tokens\)"),
    (dict(request_output_len=np.array([[1, 2]], np.int32)), r"request_output_len"),
    (dict(runtime_top_k=np.array([-1], np.int32)), r"runtime_top_k \(ensemble: top_k\)"),
    (dict(runtime_top_p=np.array([NAN], np.float32)), r"runtime_top_p \(ensemble: top_p\)"),
    (dict(temperature=np.array([NAN], np.float32)), r"^temperature"),
    (dict(repetition_penalty=np.array([0.0], np.float32)), r"^repetition_penalty"),
    (dict(frequency_penalty=np.array([INF], np.float32)), r"^frequency_penalty"),
    (dict(min_tokens=np.array([-2], np.int32)), r"^min_tokens"),
    (dict(beam_width=np.array([2], np.int32)), r"^beam_width 2"),
    (dict(beam_width=np.array([0], np.int32)), r"^beam_width 0"),
    (dict(num_return_sequences=np.array([2], np.int32)), r"^num_return_sequences 2"),
    (dict(stop_words_list=np.array([[[1, 2], [5, -1]]], np.int32)), r"stop_words_list"),
    (dict(bad_words_list=np.array([[[1, 2], [2, 1]]], np.int32)), r"bad_words_list"),
    (dict(stop_words_list=np.array([[[1, 2]], [[1, -1]]], np.int32)), r"stop_words_list"),
    (dict(stop_words_list=np.array([1, 2, 3], np.int32)), r"stop_words_list"),
])
def test_engine_request_errors_name_the_input(changes, needle):
    from builder.triton.tensors import parse_engine_request

    with pytest.raises(RequestError, match=needle):
        parse_engine_request(engine_request(**changes), default_exclude=False)


def test_engine_request_ignores_decoder_inputs():
    """decoder_input_ids / decoder_input_lengths (what the ensemble wires from preprocessing) are ignored for a
    decoder-only engine, as TensorRT-LLM's C++ backend does."""
    from builder.triton.tensors import ENGINE_INPUTS, parse_engine_request

    assert {"decoder_input_ids", "decoder_input_lengths"} <= set(ENGINE_INPUTS)
    parsed = parse_engine_request(engine_request(decoder_input_ids=np.array([[2]], np.int32),
                                                 decoder_input_lengths=np.array([1], np.int32)), False)
    assert parsed.prompt == [5, 6, 7]


def test_engine_refuses_out_of_vocabulary_input_ids(tiny_checkpoints, tmp_path):
    """LLMEngine.add_request names input_ids and the vocabulary range (the check behind tensorrt_llm)."""
    from builder.config import BuildSettings
    from builder.checkpoint.convert import convert_checkpoint
    from builder.runtime.engine import LLMEngine

    engine_dir = tmp_path / "engine"
    convert_checkpoint(tiny_checkpoints["LlamaForCausalLM"], engine_dir,
                       BuildSettings(dtype="float32", max_input_len=16, max_seq_len=32, kv_cache_memory_mb=1))
    engine = LLMEngine(engine_dir)
    for bad in (10**9, -5):
        with pytest.raises(RequestError, match=r"input_ids .*\[0, 768\)"):
            engine.add_request(str(bad), [1, bad], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match=r"bad_words_list .*\[0, 768\)"):
        engine.add_request("w", [1, 2], SamplingParams(max_tokens=2, bad_words=[[10**9]]))


# ---------------------------------------------------------------------------------------------------------------
# preprocessing (builder.triton.preprocessing)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_checkpoints):
    from builder.triton.detokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoints["LlamaForCausalLM"])


class CountingTokenizer:
    """Wraps a tokenizer and counts encode() calls (to prove a prompt was refused without tokenizing it)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer.encode(*args, **kwargs)


def query(*texts, max_tokens: int = 4, **extra) -> dict[str, np.ndarray]:
    """Preprocessing request tensors for a batch of texts."""
    items = [[t.encode() if isinstance(t, str) else t] for t in texts]
    inputs = {"QUERY": np.array(items, dtype=object),
              "REQUEST_OUTPUT_LEN": np.full((len(texts), 1), max_tokens, np.int32)}
    inputs.update(extra)
    return inputs


def test_max_bytes_per_token_of_the_tiny_tokenizers(tiny_checkpoints):
    """The byte bound comes from the vocabulary's longest token, times 4 behind a normalizer that can shrink."""
    from builder.triton.detokenizer import load_tokenizer
    from builder.triton.preprocessing import max_bytes_per_token

    got = {arch: max_bytes_per_token(load_tokenizer(path)) for arch, path in tiny_checkpoints.items()}
    assert got == {"LlamaForCausalLM": 17, "MistralForCausalLM": 11, "Qwen2ForCausalLM": 4 * 13,
                   "Qwen3ForCausalLM": 13,  # the same vocabulary as tiny-qwen2's, no normalizer
                   "tiny-llama3.2": 17}  # tiny-llama's tokenizer


def test_max_bytes_per_token_is_none_when_text_can_vanish():
    """A tokenizer that can drop text (whitespace splitting, stripping normalizers, fused unknowns) has no bound."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from builder.triton.preprocessing import max_bytes_per_token

    def bound(normalizer=None, pre=None, **bpe):
        tok = Tokenizer(models.BPE({"a": 0, "<unk>": 1, "aaaaaaa": 2}, [], **bpe))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre
        return max_bytes_per_token(PreTrainedTokenizerFast(tokenizer_object=tok))

    assert bound(byte_fallback=True) == 7 and bound(pre=pre_tokenizers.ByteLevel()) == 7
    assert bound(normalizers.NFKC(), pre_tokenizers.Metaspace(), byte_fallback=True) == 4 * 7
    assert bound(unk_token="<unk>", fuse_unk=False) == 7
    for normalizer, pre, bpe in ((None, pre_tokenizers.Whitespace(), {"byte_fallback": True}),
                                 (normalizers.Strip(), None, {"byte_fallback": True}),
                                 (normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]), None,
                                  {"byte_fallback": True}),
                                 (None, pre_tokenizers.Split(" ", "removed"), {"byte_fallback": True}),
                                 (None, None, {"unk_token": "<unk>", "fuse_unk": True})):
        assert bound(normalizer, pre, **bpe) is None, (normalizer, pre, bpe)


def test_prompt_over_the_byte_bound_is_refused_without_tokenizing(llama_tokenizer):
    from builder.triton.preprocessing import Preprocessor

    tokenizer = CountingTokenizer(llama_tokenizer)
    pre = Preprocessor(tokenizer, max_input_len=MAX_INPUT_LEN, bytes_per_token=BYTES_PER_TOKEN)
    limit = MAX_INPUT_LEN * BYTES_PER_TOKEN
    with pytest.raises(RequestError, match=rf"text_input .*{limit + 1} bytes.*max_input_len \({MAX_INPUT_LEN}\)"):
        pre.run(query("a" * (limit + 1)))
    start = time.perf_counter()
    with pytest.raises(RequestError, match="text_input"):
        pre.run(query("x" * 16 * 2**20))
    assert time.perf_counter() - start < 1.0 and tokenizer.calls == 0
    with pytest.raises(RequestError, match="stop_words"):
        pre.run(query("Hello", STOP_WORDS_DICT=np.array([[b"a" * (limit + 1)]], dtype=object)))
    assert tokenizer.calls == 0


def test_prompt_over_max_input_len_tokens_is_refused_by_preprocessing(llama_tokenizer):
    from builder.triton.preprocessing import Preprocessor

    pre = Preprocessor(llama_tokenizer, max_input_len=MAX_INPUT_LEN, bytes_per_token=BYTES_PER_TOKEN)
    text = " ".join(["word"] * MAX_INPUT_LEN)  # short in bytes, > MAX_INPUT_LEN tokens
    assert len(text.encode()) <= MAX_INPUT_LEN * BYTES_PER_TOKEN
    with pytest.raises(RequestError, match=rf"text_input .*tokens.*max_input_len \({MAX_INPUT_LEN}\)"):
        pre.run(query(text))
    assert pre.run(query("Hello"))["REQUEST_INPUT_LEN"].tolist() == [[len(llama_tokenizer.encode("Hello"))]]


@pytest.mark.parametrize("changes, needle", [
    (dict(QUERY=None), r"text_input \(QUERY\) is missing"),
    (dict(REQUEST_OUTPUT_LEN=None), r"max_tokens \(REQUEST_OUTPUT_LEN\) is missing"),
    (dict(REQUEST_OUTPUT_LEN=np.array([[4, 5]], np.int32)), r"max_tokens"),
    (dict(QUERY=np.array([[b"a", b"b"]], dtype=object)), r"text_input"),
    (dict(QUERY=np.array([[b"\xff\xfe"]], dtype=object)), r"text_input is not valid UTF-8"),
    (dict(END_ID=np.array([[1, 2]], np.int32)), r"end_id"),
    (dict(STOP_WORDS_DICT=np.array([[b"\xff"]], dtype=object)), r"stop_words is not valid UTF-8"),
])
def test_preprocessing_errors_name_the_input(llama_tokenizer, changes, needle):
    from builder.triton.preprocessing import Preprocessor

    inputs = {k: v for k, v in {**query("Hello"), **changes}.items() if v is not None}
    with pytest.raises(RequestError, match=needle):
        Preprocessor(llama_tokenizer).run(inputs)


def test_preprocessing_outputs_decoder_tensors_as_upstream(llama_tokenizer):
    """DECODER_INPUT_ID is the pad id and REQUEST_DECODER_INPUT_LEN 1 per item without a DECODER_QUERY (TensorRT-LLM's
    preprocessing); with one it is tokenized like QUERY (the engine ignores both for a decoder-only model)."""
    from builder.triton.preprocessing import INPUTS, Preprocessor

    assert "DECODER_QUERY" in INPUTS
    pre = Preprocessor(llama_tokenizer)
    out = pre.run(query("Hello", "Hi there"))
    assert out["DECODER_INPUT_ID"].tolist() == [[pre.pad_id]] * 2 and out["DECODER_INPUT_ID"].dtype == np.int32
    assert out["REQUEST_DECODER_INPUT_LEN"].tolist() == [[1]] * 2
    assert out["REQUEST_DECODER_INPUT_LEN"].dtype == np.int32
    out = pre.run(query("Hello", PAD_ID=np.array([[7]], np.int32)))
    assert out["DECODER_INPUT_ID"].tolist() == [[7]]
    ids = llama_tokenizer.encode("Bonjour")
    out = pre.run(query("Hello", DECODER_QUERY=np.array([[b"Bonjour"]], dtype=object)))
    assert out["DECODER_INPUT_ID"].tolist() == [ids] and out["REQUEST_DECODER_INPUT_LEN"].tolist() == [[len(ids)]]
    out = pre.run(query("Hello", DECODER_QUERY=np.array([[b""]], dtype=object)))
    assert out["DECODER_INPUT_ID"].tolist() == [[pre.pad_id]]


# ---------------------------------------------------------------------------------------------------------------
# postprocessing (builder.triton.postprocessing)


@pytest.fixture(scope="module")
def postprocessor(tiny_checkpoints):
    from builder.triton.detokenizer import load_detokenizer
    from builder.triton.postprocessing import Postprocessor

    return Postprocessor(load_detokenizer(tiny_checkpoints["LlamaForCausalLM"]), vocab_size=768)


@pytest.mark.parametrize("changes, needle", [
    (dict(TOKENS_BATCH=np.array([[[5, 10**9]]], np.int32)), r"TOKENS_BATCH .*1000000000.*\[0, 768\)"),
    (dict(TOKENS_BATCH=np.array([[[5, -5]]], np.int32)), r"TOKENS_BATCH .*-5.*\[0, 768\)"),
    (dict(SEQUENCE_LENGTH=np.array([[3]], np.int32)), r"SEQUENCE_LENGTH"),
    (dict(SEQUENCE_LENGTH=np.array([[-1]], np.int32)), r"SEQUENCE_LENGTH"),
    (dict(SEQUENCE_LENGTH=np.array([[1, 1]], np.int32)), r"SEQUENCE_LENGTH"),
    (dict(TOKENS_BATCH=np.zeros((1, 1, 1, 2), np.int32)), r"TOKENS_BATCH"),
    (dict(TOKENS_BATCH=None), r"TOKENS_BATCH .*missing"),
    (dict(SEQUENCE_LENGTH=None), r"SEQUENCE_LENGTH .*missing"),
    (dict(DETOK_CONTEXT_IDS=np.array([[10**9]], np.int32)), r"DETOK_CONTEXT_IDS .*\[0, 768\)"),
    (dict(DETOK_CONTEXT_IDS=np.array([[1], [2]], np.int32)), r"DETOK_CONTEXT_IDS"),
    (dict(IS_FINAL=np.array([[True], [False]])), r"IS_FINAL"),
])
def test_postprocessing_errors_name_the_input(postprocessor, changes, needle):
    inputs = {"TOKENS_BATCH": np.array([[[5, 6]]], np.int32), "SEQUENCE_LENGTH": np.array([[2]], np.int32)}
    inputs = {k: v for k, v in {**inputs, **changes}.items() if v is not None}
    with pytest.raises(RequestError, match=needle):
        postprocessor.run(inputs)


def test_postprocessing_output_is_one_dimensional(postprocessor):
    """OUTPUT and OUT_NUM_TOKENS are 1-D [batch * beams], as TensorRT-LLM's postprocessing returns OUTPUT."""
    out = postprocessor.run({"TOKENS_BATCH": np.array([[[40, 41, 0]]], np.int32),
                             "SEQUENCE_LENGTH": np.array([[2]], np.int32)})
    assert out["OUTPUT"].shape == (1,) and out["OUTPUT"][0].decode() == postprocessor.detokenizer.decode([40, 41])
    assert out["OUT_NUM_TOKENS"].shape == (1,) and out["OUT_NUM_TOKENS"].tolist() == [2]
    out = postprocessor.run({"TOKENS_BATCH": np.array([[[40, 41], [42, 0]], [[43, 44], [45, 46]]], np.int32),
                             "SEQUENCE_LENGTH": np.array([[2, 1], [2, 0]], np.int32)})
    assert out["OUTPUT"].shape == (4,) and out["OUT_NUM_TOKENS"].tolist() == [2, 1, 2, 0]
    assert out["OUTPUT"][3] == b""


# ---------------------------------------------------------------------------------------------------------------
# A real tritonserver


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """tiny-llama served with gRPC and HTTP (conftest's limits)."""
    from builder.serve import TritonServer, free_port

    repo = build_repo(tiny_checkpoints["LlamaForCausalLM"], tmp_path_factory.mktemp("bad-input") / "repo")
    process = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                           log_path=tmp_path_factory.mktemp("logs") / "bad-input.log")
    process.start()
    try:
        process.wait_ready(timeout=300)
        yield process
    finally:
        process.stop()


def tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    """One request tensor: arrays as they are, scalars and lists as one [1, n] row."""
    array = value if isinstance(value, np.ndarray) else np.array(
        [value if isinstance(value, list) else [value]], dtype=NUMPY_TYPES[dtype])
    if dtype == "BYTES":
        array = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(array)
    item = grpcclient.InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return item


def request(types: dict[str, str], values: dict) -> list[grpcclient.InferInput]:
    """Request tensors from values; a value given as (value, dtype) overrides the input's dtype."""
    out = []
    for name, value in values.items():
        value, dtype = value if isinstance(value, tuple) else (value, types.get(name, "INT32"))
        out.append(tensor(name, value, dtype))
    return out


def stream(url: str, model: str, inputs: list) -> tuple[list, str | None]:
    """Send one request on its own gRPC stream: (each response's InferResult, the error text or None)."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = []
    try:
        client.async_stream_infer(model, inputs, request_id="1", enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=TIMEOUT_S)
            if error is not None:
                return results, str(error)
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


def texts(results: list) -> list[str]:
    """The text_output items of the responses that carry one."""
    return [item.decode() for r in results if any(o.name == "text_output" for o in r.get_response().outputs)
            for item in r.as_numpy("text_output").reshape(-1)]


GOOD = {"text_input": "Hello", "max_tokens": 4}
LONG_BYTES = "a" * (MAX_INPUT_LEN * BYTES_PER_TOKEN + 1)
ENSEMBLE_CASES = [
    ("no max_tokens", {"text_input": "Hello", "stream": False}, r"max_tokens"),
    ("no text_input", {"max_tokens": 4, "stream": False}, r"text_input"),
    # with text_input / max_tokens optional Triton answers an empty request itself, before any model code runs
    ("no inputs at all", {}, r"text_input|request has 0 inputs"),
    ("no text_input, sampling set", {"max_tokens": 4, "top_k": 3, "temperature": 0.5}, r"text_input"),
    ("text_input with 2 items", {**GOOD, "text_input": np.array([["a", "b"]], dtype=object)}, r"text_input"),
    ("text_input batch of 2", {"text_input": np.array([["a"], ["b"]], dtype=object),
                               "max_tokens": np.array([[4], [4]], np.int32)}, r"text_input"),
    ("text_input not UTF-8", {**GOOD, "text_input": b"\xff\xfe"}, r"text_input"),
    ("text_input empty", {**GOOD, "text_input": ""}, r"text_input"),
    ("text_input over the byte bound", {**GOOD, "text_input": LONG_BYTES}, r"text_input .*max_input_len"),
    ("text_input over max_input_len", {**GOOD, "text_input": " ".join(["word"] * MAX_INPUT_LEN)},
     r"text_input .*max_input_len"),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, r"max_tokens"),
    ("max_tokens -1", {**GOOD, "max_tokens": -1}, r"max_tokens"),
    ("max_tokens 2^31-1", {**GOOD, "max_tokens": 2**31 - 1}, r"max_tokens"),
    ("max_tokens as STRING", {**GOOD, "max_tokens": ("8", "BYTES")}, r"max_tokens"),
    ("max_tokens with 2 items", {**GOOD, "max_tokens": [4, 5]}, r"max_tokens"),
    ("temperature as INT32", {**GOOD, "temperature": (1, "INT32")}, r"temperature"),
    ("unknown input", {**GOOD, "no_such_input": 1}, r"no_such_input"),
    ("stop_words not UTF-8", {**GOOD, "stop_words": [b"\xff"]}, r"stop_words"),
    ("stop_words over the byte bound", {**GOOD, "stop_words": [LONG_BYTES]}, r"stop_words"),
    *[(f"{name} {value}", {**GOOD, name: value}, rf"\b{name}\b") for name, value in [
        ("temperature", NAN), ("temperature", INF), ("temperature", -1.0),
        ("top_p", NAN), ("top_p", 1.5), ("top_p", -0.1), ("top_k", -1),
        ("repetition_penalty", NAN), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("repetition_penalty", INF), ("presence_penalty", NAN), ("presence_penalty", INF),
        ("frequency_penalty", NAN), ("frequency_penalty", -INF), ("min_tokens", -1),
        ("beam_width", 2), ("beam_width", 0), ("beam_width", -1)]],
]
IDS = [5, 6, 7]
ENGINE_GOOD = {"input_ids": IDS, "input_lengths": 3, "request_output_len": 4}
ENGINE_CASES = [
    ("no request_output_len", {"input_ids": IDS, "input_lengths": 3, "streaming": False}, r"request_output_len"),
    ("no input_ids", {"input_lengths": 3, "request_output_len": 4, "streaming": False}, r"input_ids"),
    ("input_ids 3-D", {**ENGINE_GOOD, "input_ids": np.array([[[5, 6, 7]]], np.int32)}, r"input_ids"),
    ("input_ids batch of 2", {**ENGINE_GOOD, "input_ids": np.array([IDS, IDS], np.int32),
                              "input_lengths": np.array([[3], [3]], np.int32),
                              "request_output_len": np.array([[4], [4]], np.int32)}, r"input_ids"),
    ("input_ids 10**9", {**ENGINE_GOOD, "input_ids": [5, 10**9, 7]}, r"input_ids .*\[0, 768\)"),
    ("input_ids -5", {**ENGINE_GOOD, "input_ids": [5, -5, 7]}, r"input_ids .*\[0, 768\)"),
    ("input_ids as FP32", {**ENGINE_GOOD, "input_ids": ([5.0, 6.0], "FP32")}, r"input_ids"),
    ("input_lengths 4", {**ENGINE_GOOD, "input_lengths": 4}, r"input_lengths"),
    ("input_lengths -1", {**ENGINE_GOOD, "input_lengths": -1}, r"input_lengths"),
    ("input_lengths 0", {**ENGINE_GOOD, "input_lengths": 0}, r"input_lengths"),
    ("request_output_len 0", {**ENGINE_GOOD, "request_output_len": 0}, r"request_output_len"),
    ("request_output_len 2^31-1", {**ENGINE_GOOD, "request_output_len": 2**31 - 1}, r"max_seq_len"),
    ("streaming as INT32", {**ENGINE_GOOD, "streaming": (1, "INT32")}, r"streaming"),
    ("stop_words_list bad offsets", {**ENGINE_GOOD, "stop_words_list": np.array([[[1, 2], [5, -1]]], np.int32)},
     r"stop_words_list"),
    ("stop_words_list 3 rows", {**ENGINE_GOOD, "stop_words_list": np.zeros((1, 3, 2), np.int32)},
     r"stop_words_list"),
    ("bad_words_list 10**9", {**ENGINE_GOOD, "bad_words_list": np.array([[[10**9], [1]]], np.int32)},
     r"bad_words.*\[0, 768\)"),
    *[(f"{name} {value}", {**ENGINE_GOOD, name: value}, rf"\b{name}\b") for name, value in [
        ("runtime_top_k", -1), ("runtime_top_p", NAN), ("runtime_top_p", 2.0), ("temperature", NAN),
        ("temperature", -INF), ("repetition_penalty", 0.0), ("presence_penalty", INF), ("min_tokens", -1),
        ("beam_width", 3)]],
]


def assert_still_serves(url: str) -> None:
    """A good ensemble and engine request both succeed."""
    results, error = stream(url, "ensemble", request(ENSEMBLE, {**GOOD, "stream": True}))
    assert error is None and "".join(texts(results)), error
    results, error = stream(url, "tensorrt_llm", request(ENGINE, ENGINE_GOOD))
    assert error is None, error


@pytest.mark.server
@pytest.mark.parametrize("model, types, cases", [("ensemble", ENSEMBLE, ENSEMBLE_CASES),
                                                 ("tensorrt_llm", ENGINE, ENGINE_CASES)])
def test_bad_requests_get_named_errors_and_the_server_keeps_serving(server, model, types, cases):
    """Every bad request gets one error response naming the input (no traceback, no hang, no empty success)."""
    failures = []
    for label, values, needle in cases:
        results, error = stream(server.grpc_url, model, request(types, values))
        if error is None:
            failures.append(f"{label}: no error, {len(results)} response(s) {texts(results)}")
        elif not re.search(needle, error) or "Traceback" in error or "At:\n" in error:
            failures.append(f"{label}: {error!r} does not match {needle!r}")
    assert not failures, "\n".join(failures)
    assert_still_serves(server.grpc_url)


@pytest.mark.server
def test_prompt_of_16_mib_is_refused_at_once(server):
    """A 16 MiB prompt is refused by its byte length, before tokenization (it used to take 17 s)."""
    start = time.perf_counter()
    _, error = stream(server.grpc_url, "ensemble", request(ENSEMBLE, {**GOOD, "text_input": "x" * 16 * 2**20}))
    assert error is not None and re.search(rf"text_input .*{MAX_INPUT_LEN * BYTES_PER_TOKEN}", error), error
    assert time.perf_counter() - start < 5.0
    assert_still_serves(server.grpc_url)


@pytest.mark.server
@pytest.mark.parametrize("temperature", [1e-40, 1e-30, DENORMAL])
def test_tiny_temperature_decodes_greedily_through_the_server(server, temperature):
    greedy, error = stream(server.grpc_url, "ensemble", request(ENSEMBLE, {**GOOD, "max_tokens": 8}))
    assert error is None, error
    for extra in ({}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 50, "top_p": 0.5, "seed": 3}):
        results, error = stream(server.grpc_url, "ensemble", request(ENSEMBLE, {
            **GOOD, "max_tokens": 8, "temperature": temperature, **extra}))
        assert error is None, (extra, error)
        assert texts(results) == texts(greedy), extra


@pytest.mark.server
@pytest.mark.parametrize("streaming", [False, True])
def test_text_output_is_one_dimensional(server, streaming):
    """Each response's text_output has shape (1,) and NVIDIA's clients' `text_output[0].decode()` works."""
    results, error = stream(server.grpc_url, "ensemble", request(ENSEMBLE, {**GOOD, "stream": streaming}))
    assert error is None, error
    carrying = [r for r in results if any(o.name == "text_output" for o in r.get_response().outputs)]
    assert carrying and (len(carrying) > 1) == streaming
    for result in carrying:
        assert result.as_numpy("text_output").shape == (1,)
        assert result.as_numpy("num_output_tokens").shape == (1,)
        assert isinstance(result.as_numpy("text_output")[0].decode(), str)


def http_post(url: str, body: dict) -> tuple[int, dict]:
    """POST JSON; (status, decoded JSON body)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.server
@pytest.mark.parametrize("ids, needle", [([5, 10**9], r"TOKENS_BATCH .*1000000000.*\[0, 768\)"),
                                         ([5, -5], r"TOKENS_BATCH .*-5.*\[0, 768\)")])
def test_out_of_vocabulary_ids_to_postprocessing_are_bad_requests(server, ids, needle):
    """Straight to postprocessing: gRPC INVALID_ARGUMENT and HTTP 400, naming TOKENS_BATCH and the range."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = [tensor("TOKENS_BATCH", np.array([[ids]], np.int32), "INT32"),
              tensor("SEQUENCE_LENGTH", np.array([[len(ids)]], np.int32), "INT32")]
    with pytest.raises(Exception) as caught:
        client.infer("postprocessing", inputs)
    assert "INVALID_ARGUMENT" in str(caught.value) and re.search(needle, str(caught.value)), caught.value
    status, body = http_post(f"{server.http_url}/v2/models/postprocessing/infer", {"inputs": [
        {"name": "TOKENS_BATCH", "shape": [1, 1, len(ids)], "datatype": "INT32", "data": ids},
        {"name": "SEQUENCE_LENGTH", "shape": [1, 1], "datatype": "INT32", "data": [len(ids)]}]})
    assert status == 400 and re.search(needle, body["error"]) and "At:" not in body["error"], (status, body)
    good = client.infer("postprocessing", [tensor("TOKENS_BATCH", np.array([[[5, 6]]], np.int32), "INT32"),
                                           tensor("SEQUENCE_LENGTH", np.array([[2]], np.int32), "INT32")])
    assert good.as_numpy("OUTPUT").shape == (1,)


@pytest.mark.server
def test_http_int32_overflow_wraps_before_the_model_sees_it(server):
    """Not fixable in the models (issue #20, finding 3): Triton's HTTP frontend casts a JSON integer to INT32 by
    truncation, so max_tokens 2**32 + 1 arrives as 1 and the request runs with max_tokens 1; 2**31 arrives as
    -2**31 (refused). The HTTP infer endpoint refuses the ensemble (decoupled); /generate is the HTTP way in."""
    url = f"{server.http_url}/v2/models/ensemble/generate"
    one = http_post(url, {"text_input": "Hello", "max_tokens": 1, "exclude_input_in_output": True})
    wrapped = http_post(url, {"text_input": "Hello", "max_tokens": 2**32 + 1, "exclude_input_in_output": True})
    assert one[0] == wrapped[0] == 200 and wrapped[1]["num_output_tokens"] == one[1]["num_output_tokens"] == 1
    status, body = http_post(url, {"text_input": "Hello", "max_tokens": 2**31})
    assert status == 400 and "max_tokens" in body["error"] and str(-2**31) in body["error"], (status, body)
