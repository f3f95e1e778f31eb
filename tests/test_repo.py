"""Model repository: rendering, validation (and what it catches), the Triton models' pure parts, a server smoke."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from builder.errors import ConfigError, OutputExistsError, RepositoryValidationError, RequestError
from builder.repo.render import ServingOptions, render_repository
from builder.repo.validate import find_problems, parse_config, validate_repository

SETTINGS = dict(dtype="float32", max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=128,
                kv_cache_memory_mb=4)
REQ, OPT = False, True
R, NR = True, False  # reshape: { shape: [ ] } or not
# name: (dtype, dims, optional, reshape) - triton-contract.md section 2.4 and docs/contracts.md
ENGINE_INPUTS = {
    "input_ids": ("TYPE_INT32", [-1], OPT, NR), "input_lengths": ("TYPE_INT32", [1], REQ, R),
    "request_output_len": ("TYPE_INT32", [1], REQ, R), "streaming": ("TYPE_BOOL", [1], OPT, R),
    "end_id": ("TYPE_INT32", [1], OPT, R), "pad_id": ("TYPE_INT32", [1], OPT, R),
    "beam_width": ("TYPE_INT32", [1], OPT, R), "runtime_top_k": ("TYPE_INT32", [1], OPT, R),
    "runtime_top_p": ("TYPE_FP32", [1], OPT, R), "temperature": ("TYPE_FP32", [1], OPT, R),
    "repetition_penalty": ("TYPE_FP32", [1], OPT, R), "presence_penalty": ("TYPE_FP32", [1], OPT, R),
    "frequency_penalty": ("TYPE_FP32", [1], OPT, R), "min_tokens": ("TYPE_INT32", [1], OPT, R),
    "seed": ("TYPE_UINT64", [1], OPT, R), "stop_words_list": ("TYPE_INT32", [2, -1], OPT, NR),
    "bad_words_list": ("TYPE_INT32", [2, -1], OPT, NR), "exclude_input_in_output": ("TYPE_BOOL", [1], OPT, R),
    "stop": ("TYPE_BOOL", [1], OPT, R), "decoder_input_ids": ("TYPE_INT32", [-1], OPT, NR),
    "decoder_input_lengths": ("TYPE_INT32", [1], OPT, R), "len_penalty": ("TYPE_FP32", [1], OPT, R),
    "num_return_sequences": ("TYPE_INT32", [1], OPT, R), "return_log_probs": ("TYPE_BOOL", [1], OPT, R),
    "return_context_logits": ("TYPE_BOOL", [1], OPT, R), "return_generation_logits": ("TYPE_BOOL", [1], OPT, R),
    "return_perf_metrics": ("TYPE_BOOL", [1], OPT, R),
}
RAGGED = {"input_ids", "decoder_input_ids", "stop_words_list", "bad_words_list"}  # allow_ragged_batch
ENGINE_OUTPUTS = {"output_ids": ("TYPE_INT32", [-1, -1]), "sequence_length": ("TYPE_INT32", [-1]),
                  "detok_context_ids": ("TYPE_INT32", [-1]), "is_final": ("TYPE_BOOL", [1])}
ENSEMBLE_INPUTS = {
    # optional to Triton, required by preprocessing (a missing one gets a named error, not an empty success)
    "text_input": ("TYPE_STRING", [1], OPT), "max_tokens": ("TYPE_INT32", [1], OPT),
    "bad_words": ("TYPE_STRING", [-1], OPT), "stop_words": ("TYPE_STRING", [-1], OPT),
    "exclude_input_in_output": ("TYPE_BOOL", [1], OPT), "end_id": ("TYPE_INT32", [1], OPT),
    "pad_id": ("TYPE_INT32", [1], OPT), "top_k": ("TYPE_INT32", [1], OPT), "top_p": ("TYPE_FP32", [1], OPT),
    "temperature": ("TYPE_FP32", [1], OPT), "repetition_penalty": ("TYPE_FP32", [1], OPT),
    "presence_penalty": ("TYPE_FP32", [1], OPT), "frequency_penalty": ("TYPE_FP32", [1], OPT),
    "min_tokens": ("TYPE_INT32", [1], OPT), "seed": ("TYPE_UINT64", [1], OPT),
    "beam_width": ("TYPE_INT32", [1], OPT), "stream": ("TYPE_BOOL", [1], OPT),
    "decoder_text_input": ("TYPE_STRING", [1], OPT), "num_return_sequences": ("TYPE_INT32", [1], OPT),
    "length_penalty": ("TYPE_FP32", [1], OPT), "return_log_probs": ("TYPE_BOOL", [1], OPT),
    "return_context_logits": ("TYPE_BOOL", [1], OPT), "return_generation_logits": ("TYPE_BOOL", [1], OPT),
    "return_perf_metrics": ("TYPE_BOOL", [1], OPT),
}
# upstream's tensorrt_llm_bls reshapes these to scalars (the rest as the ensemble)
BLS_RESHAPED = {"num_return_sequences", "return_log_probs", "return_context_logits", "return_generation_logits",
                "return_perf_metrics"}
# name: (dtype, dims, optional) - TensorRT-LLM's preprocessing (text-only subset); QUERY / REQUEST_OUTPUT_LEN optional
# for Triton, required by its code (docs/decisions.md)
PREPROCESSING_INPUTS = {
    "QUERY": ("TYPE_STRING", [1], OPT), "DECODER_QUERY": ("TYPE_STRING", [1], OPT),
    "REQUEST_OUTPUT_LEN": ("TYPE_INT32", [1], OPT), "BAD_WORDS_DICT": ("TYPE_STRING", [-1], OPT),
    "STOP_WORDS_DICT": ("TYPE_STRING", [-1], OPT), "END_ID": ("TYPE_INT32", [1], OPT),
    "PAD_ID": ("TYPE_INT32", [1], OPT),
}
PREPROCESSING_OUTPUTS = {
    "INPUT_ID": ("TYPE_INT32", [-1]), "REQUEST_INPUT_LEN": ("TYPE_INT32", [1]),
    "DECODER_INPUT_ID": ("TYPE_INT32", [-1]), "REQUEST_DECODER_INPUT_LEN": ("TYPE_INT32", [1]),
    "BAD_WORDS_IDS": ("TYPE_INT32", [2, -1]), "STOP_WORDS_IDS": ("TYPE_INT32", [2, -1]),
    "REQUEST_OUTPUT_LEN": ("TYPE_INT32", [-1]), "OUT_END_ID": ("TYPE_INT32", [1]), "OUT_PAD_ID": ("TYPE_INT32", [1]),
}
POSTPROCESSING_INPUTS = {"TOKENS_BATCH": ("TYPE_INT32", [-1, -1], REQ), "SEQUENCE_LENGTH": ("TYPE_INT32", [-1], REQ),
                         "DETOK_CONTEXT_IDS": ("TYPE_INT32", [-1], OPT), "IS_FINAL": ("TYPE_BOOL", [1], OPT)}
POSTPROCESSING_OUTPUTS = {"OUTPUT": ("TYPE_STRING", [-1]), "OUT_NUM_TOKENS": ("TYPE_INT32", [-1])}
MODELS = ["ensemble", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"]


@pytest.fixture(scope="module")
def engine_parts(tmp_path_factory):
    """(EngineConfig, engine dir, tokenizer dir) of a converted tiny Llama, made once."""
    from builder.checkpoint.convert import convert_checkpoint
    from builder.checkpoint.hf import copy_tokenizer
    from builder.checkpoint.tiny import make_tiny_model
    from builder.config import BuildSettings

    root = tmp_path_factory.mktemp("parts")
    hf = make_tiny_model(root / "hf")
    config = convert_checkpoint(hf, root / "engine", BuildSettings(**SETTINGS))
    copy_tokenizer(hf, root / "tokenizer")
    return config, root / "engine", root / "tokenizer"


@pytest.fixture()
def repo(engine_parts, tmp_path) -> Path:
    """A freshly rendered repository that a test may damage."""
    config, engine, tokenizer = engine_parts
    return render_repository(tmp_path / "repo", config, engine, tokenizer, copy_engine=True)


def _problems(repo: Path) -> str:
    """validate_repository's problems, joined (asserting that it raises)."""
    with pytest.raises(RepositoryValidationError) as info:
        validate_repository(repo)
    return " | ".join(info.value.problems)


def _edit(path: Path, old: str, new: str) -> None:
    """Replace old (which must occur) with new in a text file."""
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def test_render_and_validate(repo, engine_parts):
    """The rendered repository validates and has the contract's layout, parameters and files."""
    validate_repository(repo)
    assert sorted(p.name for p in repo.iterdir()) == MODELS
    configs = {name: parse_config(repo / name / "config.pbtxt") for name in MODELS}
    assert configs["ensemble"].platform == "ensemble"
    assert all(c.max_batch_size == SETTINGS["max_batch_size"] for c in configs.values())
    engine = configs["tensorrt_llm"]
    assert engine.backend == "python" and engine.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in engine.parameters.items()}
    assert params["gpt_model_type"] == "inflight_fused_batching" and params["gpt_model_path"] == "1/engine"
    assert params["exclude_input_in_output"] == "false" and params["kv_cache_memory_mb"] == "4"
    assert {"batch_scheduler_policy", "enable_chunked_context", "kv_cache_free_gpu_mem_fraction",
            "device"} <= set(params)
    assert params["max_responses_per_second"] == "2000" and params["response_sender_threads"] == "2"
    assert configs["preprocessing"].parameters["tokenizer_dir"].string_value == "1/tokenizer"
    assert configs["postprocessing"].parameters["skip_special_tokens"].string_value == "true"
    assert configs["preprocessing"].parameters["max_input_len"].string_value == str(SETTINGS["max_input_len"])
    assert int(configs["postprocessing"].parameters["vocab_size"].string_value) == engine_parts[0].model.vocab_size
    bls = configs["tensorrt_llm_bls"]
    assert bls.backend == "python" and bls.model_transaction_policy.decoupled
    assert {k: v.string_value for k, v in bls.parameters.items()} == {
        "accumulate_tokens": "false", "tensorrt_llm_model_name": "tensorrt_llm", "pipeline": "1/pipeline.json"}
    assert (repo / "tensorrt_llm_bls" / "1" / "model.py").is_file()
    for name in ("config.json", "build_config.json", "rank0.safetensors"):
        assert (repo / "tensorrt_llm" / "1" / "engine" / name).is_file()
    for model in ("preprocessing", "postprocessing"):
        assert (repo / model / "1" / "tokenizer" / "tokenizer.json").is_file()
        assert (repo / model / "1" / "model.py").is_file()
    assert engine_parts[1].is_dir()  # copy_engine=True left the source in place
    assert not [p for p in repo.rglob("config.pbtxt") if "${" in p.read_text()]


def test_tensor_contract(repo):
    """Names, dtypes, dims, optional flags and reshapes of tensorrt_llm and the ensemble, as the contract says."""
    from tritonclient.grpc import model_config_pb2 as pb

    engine = parse_config(repo / "tensorrt_llm" / "config.pbtxt")
    got = {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional, t.HasField("reshape"))
           for t in engine.input}
    assert got == {k: (d, dims, o, r) for k, (d, dims, o, r) in ENGINE_INPUTS.items()}
    assert all(list(t.reshape.shape) == [] for t in engine.input if t.HasField("reshape"))
    assert {t.name for t in engine.input if t.allow_ragged_batch} == RAGGED
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in engine.output} == ENGINE_OUTPUTS
    ensemble = parse_config(repo / "ensemble" / "config.pbtxt")
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional) for t in ensemble.input} == \
        ENSEMBLE_INPUTS
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in ensemble.output] == \
        [("text_output", "TYPE_STRING", [-1]), ("num_output_tokens", "TYPE_INT32", [-1])]
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    assert steps["tensorrt_llm"].input_map["streaming"] == "stream"
    assert steps["tensorrt_llm"].input_map["runtime_top_k"] == "top_k"
    assert steps["tensorrt_llm"].input_map["len_penalty"] == "length_penalty"
    assert steps["preprocessing"].input_map["DECODER_QUERY"] == "decoder_text_input"
    assert steps["tensorrt_llm"].input_map["decoder_input_ids"] == steps["preprocessing"].output_map["DECODER_INPUT_ID"]
    assert steps["tensorrt_llm"].input_map["decoder_input_lengths"] == \
        steps["preprocessing"].output_map["REQUEST_DECODER_INPUT_LEN"]
    pre = parse_config(repo / "preprocessing" / "config.pbtxt")
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional) for t in pre.input} == \
        PREPROCESSING_INPUTS
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in pre.output} == PREPROCESSING_OUTPUTS
    post = parse_config(repo / "postprocessing" / "config.pbtxt")
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional) for t in post.input} == \
        POSTPROCESSING_INPUTS
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in post.output} == POSTPROCESSING_OUTPUTS
    bls = parse_config(repo / "tensorrt_llm_bls" / "config.pbtxt")
    assert {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional, t.HasField("reshape"))
            for t in bls.input} == {k: (d, dims, o, k in BLS_RESHAPED) for k, (d, dims, o) in ENSEMBLE_INPUTS.items()}
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in bls.output] == \
        [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in ensemble.output]
    assert steps["postprocessing"].input_map["DETOK_CONTEXT_IDS"] == steps["tensorrt_llm"].output_map[
        "detok_context_ids"]


def test_broken_config_is_caught(repo):
    """A config.pbtxt that does not parse, or names another model, is reported."""
    (repo / "preprocessing" / "config.pbtxt").write_text('name: "preprocessing"\nmax_batch_size: "eight"\n')
    _edit(repo / "postprocessing" / "config.pbtxt", 'name: "postprocessing"', 'name: "detokenizer"')
    problems = _problems(repo)
    assert "preprocessing/config.pbtxt does not parse" in problems
    assert "differs from its folder" in problems


def test_missing_files_are_caught(repo):
    """Missing engine weights, model.py and tokenizer files are each reported."""
    (repo / "tensorrt_llm" / "1" / "engine" / "rank0.safetensors").unlink()
    (repo / "postprocessing" / "1" / "model.py").unlink()
    shutil.rmtree(repo / "preprocessing" / "1" / "tokenizer")
    problems = _problems(repo)
    assert "lacks rank0.safetensors" in problems
    assert "postprocessing/1/model.py" in problems
    assert "preprocessing: tokenizer_dir" in problems


def test_leftover_placeholder_is_caught(repo):
    """An unfilled ${...} anywhere in a rendered file is reported."""
    _edit(repo / "tensorrt_llm" / "config.pbtxt", 'string_value: "max_utilization"', 'string_value: "${policy}"')
    assert "tensorrt_llm/config.pbtxt still holds an unfilled" in _problems(repo)


def test_mismatched_ensemble_dtype_is_caught(repo):
    """An ensemble tensor whose dtype differs from the step input it feeds is reported."""
    _edit(repo / "ensemble" / "config.pbtxt", '{ name: "top_k" data_type: TYPE_INT32',
          '{ name: "top_k" data_type: TYPE_FP32')
    assert "input 'runtime_top_k' is TYPE_INT32 but ensemble tensor 'top_k' is TYPE_FP32" in _problems(repo)


def test_wiring_problems_are_caught(repo):
    """Unknown step model or tensor, unused ensemble input and unproduced tensors are reported."""
    path = repo / "ensemble" / "config.pbtxt"
    _edit(path, 'input_map { key: "input_lengths" value: "_REQUEST_INPUT_LEN" }',
          'input_map { key: "input_length" value: "_REQUEST_INPUT_LEN" }')
    _edit(path, 'input_map { key: "seed" value: "seed" }', "")
    _edit(path, 'output_map { key: "is_final" value: "_IS_FINAL" }', "")
    problems = _problems(repo)
    assert "'input_length' is not an input of tensorrt_llm" in problems
    assert "required input 'input_lengths' is not mapped" in problems
    assert "input 'seed' is not used by any step" in problems
    assert "reads '_IS_FINAL', which no ensemble input or step produces" in problems
    _edit(path, 'model_name: "postprocessing"', 'model_name: "detokenize"')
    assert "no model folder 'detokenize'" in _problems(repo)


def test_unary_repository(engine_parts, tmp_path):
    """--decoupled-mode false: tensorrt_llm and the BLS are not decoupled (so the ensemble is unary); it validates."""
    config, engine, tokenizer = engine_parts
    repo = render_repository(tmp_path / "unary", config, engine, tokenizer, ServingOptions(decoupled_mode=False),
                             copy_engine=True)
    validate_repository(repo)
    for name in ("tensorrt_llm", "tensorrt_llm_bls"):
        assert not parse_config(repo / name / "config.pbtxt").model_transaction_policy.decoupled
    assert not any(parse_config(repo / name / "config.pbtxt").model_transaction_policy.decoupled for name in MODELS)


def test_bls_runs_the_ensembles_wiring(repo):
    """tensorrt_llm_bls/1/pipeline.json holds the ensemble's steps (same models, same maps), the engine marked."""
    import json

    data = json.loads((repo / "tensorrt_llm_bls" / "1" / "pipeline.json").read_text())
    ensemble = parse_config(repo / "ensemble" / "config.pbtxt")
    assert [(s["model"], s["inputs"], s["outputs"]) for s in data["steps"]] == [
        (s.model_name, dict(s.input_map), dict(s.output_map)) for s in ensemble.ensemble_scheduling.step]
    assert [s["model"] for s in data["steps"] if s["engine"]] == ["tensorrt_llm"]
    assert [t["name"] for t in data["inputs"]] == [t.name for t in ensemble.input]


def test_bls_problems_are_caught(repo):
    """A BLS whose pipeline does not parse, reads an input it does not declare, calls a missing engine model, has a
    bad accumulate_tokens, or is decoupled unlike its engine model is reported."""
    path = repo / "tensorrt_llm_bls" / "1" / "pipeline.json"
    good = path.read_text()
    path.write_text("{not json")
    assert "pipeline 1/pipeline.json cannot be read as JSON" in _problems(repo)
    path.write_text(good.replace('"QUERY": "text_input"', '"QUERY": "prompt"'))
    config = repo / "tensorrt_llm_bls" / "config.pbtxt"
    _edit(config, 'string_value: "false"', 'string_value: "maybe"')
    _edit(config, "decoupled: true", "decoupled: false")
    problems = _problems(repo)
    assert "tensorrt_llm_bls step 0 (preprocessing): input 'QUERY' reads 'prompt', which no ensemble input or step " \
           "produces" in problems
    assert "input 'text_input' is not used by any step" in problems
    assert "accumulate_tokens = 'maybe' is not a boolean" in problems
    assert "tensorrt_llm_bls: decoupled is false but its engine model tensorrt_llm has true" in problems
    path.write_text(good)
    _edit(config, 'string_value: "tensorrt_llm"', 'string_value: "no_engine"')
    assert "no model folder 'no_engine'" in _problems(repo)


@pytest.mark.parametrize("decoupled", [True, False])
def test_mixed_decoupled_sources_are_caught(engine_parts, tmp_path, decoupled):
    """A step fed both by a decoupled model and by tensors from outside it (here postprocessing's IS_FINAL from the
    ensemble input `stream`) is refused by Triton, so validation reports it; with no decoupled model it is fine."""
    config, engine, tokenizer = engine_parts
    repo = render_repository(tmp_path / "r", config, engine, tokenizer, ServingOptions(decoupled_mode=decoupled),
                             copy_engine=True)
    _edit(repo / "ensemble" / "config.pbtxt", 'input_map { key: "IS_FINAL" value: "_IS_FINAL" }',
          'input_map { key: "IS_FINAL" value: "stream" }')
    _edit(repo / "ensemble" / "config.pbtxt", 'output_map { key: "is_final" value: "_IS_FINAL" }', "")
    problems = find_problems(repo)
    mixed = [p for p in problems if "different decoupled sources" in p]
    if decoupled:
        assert mixed == ["ensemble step 2 (postprocessing): its inputs come from different decoupled sources "
                         "(outside any decoupled model, tensorrt_llm); Triton refuses such an ensemble, so feed this "
                         "step only from one decoupled model's outputs"]
    else:
        assert mixed == []


def test_pipeline_must_mark_its_engine(tmp_path):
    """A pipeline yaml without exactly one `engine: true` step is refused before anything is rendered."""
    from builder.repo.render import ENSEMBLES_DIR, load_pipeline

    text = (ENSEMBLES_DIR / "llm.yaml").read_text()
    assert "    engine: true\n" in text
    (tmp_path / "bad.yaml").write_text(text.replace("    engine: true\n", ""))
    with pytest.raises(ConfigError, match="exactly one step `engine: true`"):
        load_pipeline("bad", tmp_path)


def test_render_refuses_bad_input(engine_parts, tmp_path):
    """A non-empty target, a template using an unknown value, or bad options are refused with ConfigError."""
    config, engine, tokenizer = engine_parts
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        render_repository(tmp_path / "full", config, engine, tokenizer, copy_engine=True)
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).parents[1] / "model_repo_templates", templates)
    (templates / "ensemble" / "config.pbtxt.j2").write_text("name: {{ no_such_value }}\n")
    with pytest.raises(ConfigError, match="no_such_value"):
        render_repository(tmp_path / "r1", config, engine, tokenizer, copy_engine=True, templates_dir=templates)
    with pytest.raises(ConfigError, match="batch_scheduler_policy"):
        render_repository(tmp_path / "r2", config, engine, tokenizer, ServingOptions(batch_scheduler_policy="x"))
    with pytest.raises(ConfigError, match="max_responses_per_second"):
        render_repository(tmp_path / "r3", config, engine, tokenizer, ServingOptions(max_responses_per_second=-1))
    assert engine.is_dir()


def test_validate_reports_a_missing_repository(tmp_path):
    """A missing folder is one problem, not an exception."""
    assert find_problems(tmp_path / "nope") == [f"repository folder {tmp_path / 'nope'} does not exist"]


def test_preprocessor(engine_parts):
    """Batch tokenization with padding, word lists, default end/pad ids and the empty-text error."""
    from builder.triton.detokenizer import load_tokenizer
    from builder.triton.preprocessing import Preprocessor
    from builder.triton.tensors import from_word_list

    tokenizer = load_tokenizer(engine_parts[2])
    pre = Preprocessor(tokenizer)
    out = pre.run({"QUERY": np.array([[b"Hello world"], [b"Hi"]], dtype=object),
                   "REQUEST_OUTPUT_LEN": np.array([[8], [4]], dtype=np.int32),
                   "STOP_WORDS_DICT": np.array([[b"world", b""], [b"a b", b"c"]], dtype=object)})
    long_ids = tokenizer.encode("Hello world")
    assert out["INPUT_ID"].shape == (2, len(long_ids)) and out["INPUT_ID"][0].tolist() == long_ids
    assert out["REQUEST_INPUT_LEN"].reshape(-1).tolist() == [len(long_ids), len(tokenizer.encode("Hi"))]
    assert out["REQUEST_OUTPUT_LEN"].tolist() == [[8], [4]]
    assert out["OUT_END_ID"].tolist() == [[tokenizer.eos_token_id]] * 2
    assert out["STOP_WORDS_IDS"].shape[:2] == (2, 2)
    assert from_word_list(out["STOP_WORDS_IDS"][1]) == [tokenizer.encode("a b", add_special_tokens=False),
                                                       tokenizer.encode("c", add_special_tokens=False)]
    assert from_word_list(out["BAD_WORDS_IDS"][0]) == []
    with pytest.raises(RequestError, match="text_input is empty"):
        pre.run({"QUERY": np.array([[b""]], dtype=object), "REQUEST_OUTPUT_LEN": np.array([[4]], dtype=np.int32)})


def test_engine_request_parsing_and_responses():
    """tensorrt_llm tensors -> SamplingParams (errors readable); response tensors for stream / non-stream."""
    from builder.triton.tensors import engine_response, parse_engine_request, to_word_list

    inputs = {"input_ids": np.array([[5, 6, 7, 0]], np.int32), "input_lengths": np.array([3], np.int32),
              "request_output_len": np.array([4], np.int32), "runtime_top_k": np.array([5], np.int32),
              "seed": np.array([7], np.uint64), "streaming": np.array([True]),
              "stop_words_list": to_word_list([[1, 2], [3]])[None]}
    parsed = parse_engine_request(inputs, default_exclude=False)
    assert parsed.prompt == [5, 6, 7] and parsed.params.top_k == 5 and parsed.params.seed == 7
    assert parsed.params.stop_words == [[1, 2], [3]] and parsed.streaming
    for change, needle in [({"input_ids": np.zeros((2, 3), np.int32)}, "batch of 2"),
                           ({"beam_width": np.array([2], np.int32)}, "beam_width 2"),
                           ({"request_output_len": np.array([0], np.int32)}, "max_tokens"),
                           ({"runtime_top_p": np.array([-0.5], np.float32)}, "top_p")]:
        with pytest.raises(RequestError, match=needle):
            parse_engine_request({**inputs, **change}, default_exclude=False)
    chunk = engine_response([1, 2, 3], [4, 5], 1, parsed, final=False)
    assert chunk["output_ids"].tolist() == [[[5]]] and chunk["detok_context_ids"].tolist() == [[1, 2, 3, 4]]
    whole = engine_response([1, 2, 3], [4, 5], 1, parse_engine_request({**inputs, "streaming": np.array([False])},
                                                                          default_exclude=False), final=True)
    assert whole["output_ids"].shape == (1, 1, 5) and whole["detok_context_ids"].shape == (1, 0)
    assert whole["sequence_length"].tolist() == [[5]] and whole["is_final"].tolist() == [[True]]


def test_postprocessor(engine_parts):
    """Chunks decoded with their context join to the whole text; without context it decodes everything."""
    from builder.triton.detokenizer import load_detokenizer
    from builder.triton.postprocessing import Postprocessor

    post = Postprocessor(load_detokenizer(engine_parts[2]))
    ids = post.detokenizer.tokenizer.encode("Streaming keeps every space and é 東京")
    prompt, out = ids[:3], ids[3:]
    texts = []
    for i, token in enumerate(out):
        result = post.run({"TOKENS_BATCH": np.array([[[token]]], np.int32),
                           "SEQUENCE_LENGTH": np.array([[1]], np.int32),
                           "DETOK_CONTEXT_IDS": np.array([(prompt + out[:i])[-8:]], np.int32),
                           "IS_FINAL": np.array([[i == len(out) - 1]])})
        texts.append(result["OUTPUT"][0].decode())
    whole = post.run({"TOKENS_BATCH": np.array([[ids]], np.int32), "SEQUENCE_LENGTH": np.array([[len(ids)]], np.int32)})
    assert whole["OUTPUT"][0].decode().endswith("".join(texts))
    assert "".join(texts).endswith("é 東京")


@pytest.mark.server
def test_server_smoke(repo):
    """A real tritonserver on the rendered repository streams text; errors come back readable."""
    from builder.client import generate_ids, stream_text
    from builder.serve import TritonServer, free_port

    with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                      log_path=repo.parent / "triton.log") as server:
        chunks = list(stream_text(server.grpc_url, "Hello world", max_tokens=8))
        whole = list(stream_text(server.grpc_url, "Hello world", max_tokens=8, stream=False,
                                 exclude_input_in_output=True))
        assert len(chunks) > 1 and "".join(chunks) == "".join(whole)
        assert len(generate_ids(server.grpc_url, [1, 2, 3], 4, exclude_input_in_output=True)) == 4
        with pytest.raises(RequestError, match="max_tokens"):
            list(stream_text(server.grpc_url, "Hello", max_tokens=0))
