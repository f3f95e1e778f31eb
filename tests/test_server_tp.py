"""Tensor parallelism through a real tritonserver: TP=2 (two CPU ranks, gloo) gives TP=1's greedy outputs (fp32)."""

from __future__ import annotations

import pytest
from conftest import build_repo
from triton_helpers import engine_inputs, ensemble_inputs, run_stream

from builder.serve import TritonServer, free_port

pytestmark = pytest.mark.server

PROMPTS = ["Hello", "The server streams tokens from a paged cache", "Café 東京 🚀 and more text to prefill " * 3]
QUANT_MODES = ["none"]


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
    """Same greedy token ids and streamed text from a TP=2 and a TP=1 repository."""
    hf_dir = tiny_checkpoints["LlamaForCausalLM"]
    results = {}
    for tp in (1, 2):
        repo = build_repo(hf_dir, tmp_path / f"tp{tp}", tp_size=tp)
        assert sorted(p.name for p in (repo / "tensorrt_llm" / "1" / "engine").glob("rank*.safetensors")) == \
            [f"rank{r}.safetensors" for r in range(tp)]
        results[tp] = _serve_and_generate(repo, PROMPTS, tmp_path)
    assert results[2] == results[1]
    assert all(results[1][0]), "every prompt produced tokens"
