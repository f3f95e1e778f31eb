"""Tensor parallelism through a real tritonserver: TP=2 (two CPU ranks, gloo) gives TP=1's greedy outputs (fp32),
unquantized and for every quantization mode and quantized KV-cache dtype."""

from __future__ import annotations

import pytest
from conftest import build_repo
from triton_helpers import engine_inputs, ensemble_inputs, run_stream

from builder.build import BuildOptions, build
from builder.checkpoint.reference import reference_model_dir
from builder.config import BuildSettings, QuantOptions
from builder.accuracy import EvalOptions
from builder.serve import TritonServer, free_port

pytestmark = pytest.mark.server

PROMPTS = ["Hello", "The server streams tokens from a paged cache", "Café 東京 🚀 and more text to prefill " * 3]
QUANT_MODES = ["none", "int8_wo", "int4_wo", "int4_awq", "fp8"]
KV_CACHE_DTYPES = ["int8", "fp8"]


def _build_quantized(output, tp: int, quant: str = "none", kv: str = "auto"):
    """A repository of the trained reference model (hidden 256: int4_awq group 128 fits at tp 1 and 2)."""
    settings = BuildSettings(dtype="float32", max_batch_size=64, max_input_len=128, max_seq_len=256,
                             max_num_tokens=256, kv_cache_memory_mb=8)
    options = QuantOptions(quant=quant, kv_cache_dtype=kv, group_size=128 if quant == "int4_awq" else None,
                           calib_size=4, calib_seq_len=128)
    build(BuildOptions(output=output, model=str(reference_model_dir()), settings=settings, tp_size=tp, quant=options,
                       evaluation=EvalOptions(mode="off")))  # the accuracy report is tested elsewhere
    return output


def _serve_and_generate(repo, prompts: list[str], tmp_path) -> tuple[list[list[int]], list[str]]:
    """Greedy ids from tensorrt_llm and texts from the ensemble, for each prompt, on a fresh server."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo / "preprocessing" / "1" / "tokenizer")
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with TritonServer(repo, log_path=tmp_path / f"{repo.name}.log", **ports) as server:
        url = f"127.0.0.1:{ports['grpc_port']}"
        ids, texts = [], []
        for prompt in prompts:
            prompt_ids = tokenizer(prompt).input_ids
            engine = run_stream(url, "tensorrt_llm", engine_inputs(
                input_ids=prompt_ids, input_lengths=len(prompt_ids), request_output_len=20,
                end_id=tokenizer.eos_token_id, exclude_input_in_output=True))
            text = run_stream(url, "ensemble", ensemble_inputs(text_input=prompt, max_tokens=20, stream=True))
            assert engine.error is None and text.error is None, (engine.error, text.error)
            ids.append(engine.tokens)
            texts.append(text.text)
        assert server.is_ready()
    return ids, texts


@pytest.mark.parametrize("quant", QUANT_MODES)
def test_tp2_equals_tp1_through_server(tiny_checkpoints, tmp_path, quant):
    """Same greedy token ids and streamed text from a TP=2 and a TP=1 repository (quantized: the reference model)."""
    hf_dir = tiny_checkpoints["LlamaForCausalLM"]
    results = {}
    for tp in (1, 2):
        if quant == "none":
            repo = build_repo(hf_dir, tmp_path / f"tp{tp}", tp_size=tp)
        else:
            repo = _build_quantized(tmp_path / f"tp{tp}", tp, quant)
        assert sorted(p.name for p in (repo / "tensorrt_llm" / "1" / "engine").glob("rank*.safetensors")) == \
            [f"rank{r}.safetensors" for r in range(tp)]
        results[tp] = _serve_and_generate(repo, PROMPTS, tmp_path)
    assert results[2] == results[1]
    assert all(results[1][0]), "every prompt produced tokens"


@pytest.mark.parametrize("kv", KV_CACHE_DTYPES)
def test_tp2_equals_tp1_quantized_kv_cache_through_server(tmp_path, kv):
    """An INT8 / FP8 KV cache through the real server: TP=2 gives TP=1's greedy tokens and text."""
    results = {tp: _serve_and_generate(_build_quantized(tmp_path / f"tp{tp}", tp, kv=kv), PROMPTS, tmp_path)
               for tp in (1, 2)}
    assert results[2] == results[1]
    assert all(results[1][0]), "every prompt produced tokens"
