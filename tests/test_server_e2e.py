"""Whole stack through a real tritonserver: ensemble and engine over gRPC, against HF transformers."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import ARCHITECTURES, VARIANTS
from triton_helpers import engine_inputs, ensemble_inputs, read_metrics, run_stream

pytestmark = pytest.mark.server

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog while the server streams tokens",
    "Café ünïcödé: 東京の天気は晴れ 🚀 ok",
    " leading space and\nnew line",
    "A GPU reads every weight once per decoded token, so batch size decides how much work each read buys. " * 3,
]
MAX_TOKENS = 24


def hf_reference(hf_dir, prompt: str, max_tokens: int):
    """(prompt ids, new ids, full decoded text) from transformers generate, greedy, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    prompt_ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    new_ids = out[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    return prompt_ids, new_ids, tokenizer.decode(out[0].tolist(), skip_special_tokens=True), tokenizer


def expected_text(hf_dir, hf_text: str, ids: list[int]) -> str:
    """transformers' text, except where it decodes an invalid byte-fallback run: there HF's ByteFallback turns the
    whole run (valid bytes included) into U+FFFD, while ours replaces only the invalid bytes (docs/decisions.md)."""
    if "\ufffd" not in hf_text:
        return hf_text
    from builder.triton.detokenizer import load_detokenizer

    return load_detokenizer(hf_dir).decode(ids)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, *VARIANTS])
def test_greedy_ids_and_text_match_transformers(server_factory, arch):
    """Greedy ids through tensorrt_llm and text through the ensemble equal transformers generate (fp32); the prompts
    cross a KV block, and tiny-llama3.2 (tied embeddings, llama3 rope factor 32 from position 32) decodes far past
    its original_max_position_embeddings."""
    server = server_factory(arch)
    lengths = []
    for prompt in PROMPTS:
        prompt_ids, hf_new, hf_text, tokenizer = hf_reference(server.hf_dir, prompt, MAX_TOKENS)
        lengths.append(len(prompt_ids))
        engine = run_stream(server.grpc_url, "tensorrt_llm", engine_inputs(
            input_ids=prompt_ids, input_lengths=len(prompt_ids), request_output_len=MAX_TOKENS,
            end_id=tokenizer.eos_token_id, streaming=False, exclude_input_in_output=True))
        assert engine.error is None, engine.error
        assert engine.tokens == hf_new, f"{arch} {prompt!r}"
        text = run_stream(server.grpc_url, "ensemble", ensemble_inputs(
            text_input=prompt, max_tokens=MAX_TOKENS, stream=False))
        assert text.error is None, text.error
        assert text.text == expected_text(server.hf_dir, hf_text, prompt_ids + hf_new), f"{arch} {prompt!r}"
    assert max(lengths) > 2 * 32  # crosses KV blocks (tokens_per_block 32) and tiny-llama3.2's original 32 positions


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM"])
def test_streamed_text_equals_non_streamed(server_factory, arch):
    """Joined streamed deltas equal the non-streamed text byte for byte; the prompt is never echoed."""
    server = server_factory(arch)
    for prompt in PROMPTS:
        for seed in (0, 1):
            sampling = dict(temperature=1.0, top_k=50, seed=seed)
            whole = run_stream(server.grpc_url, "ensemble", ensemble_inputs(
                text_input=prompt, max_tokens=MAX_TOKENS, stream=False, exclude_input_in_output=True, **sampling))
            streamed = run_stream(server.grpc_url, "ensemble", ensemble_inputs(
                text_input=prompt, max_tokens=MAX_TOKENS, stream=True, **sampling))
            assert whole.error is None and streamed.error is None, (whole.error, streamed.error)
            assert len(streamed.texts) > 1
            assert streamed.text.encode() == whole.text.encode(), f"{arch} {prompt!r} seed {seed}"
            echoed = run_stream(server.grpc_url, "ensemble", ensemble_inputs(
                text_input=prompt, max_tokens=MAX_TOKENS, stream=False, exclude_input_in_output=False, **sampling))
            assert echoed.text.endswith(whole.text) and len(echoed.text) > len(whole.text)


def _concurrent(url: str, requests: list[dict]) -> list:
    """Run every request on its own stream at the same time; results in request order."""
    results = [None] * len(requests)

    def worker(i: int) -> None:
        results[i] = run_stream(url, "ensemble", ensemble_inputs(**requests[i]), request_id=str(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_32_concurrent_streams_equal_alone_and_share_batches(llama_server):
    """32 concurrent streaming requests return what they return alone, and the engine batched them."""
    words = "the server streams tokens from a paged cache while new prompts join the running batch".split()
    requests = []
    for i in range(32):
        prompt = " ".join(words[: 2 + (i * 7) % len(words)]) + f" request {i}"
        sampling = dict(temperature=0.8, top_p=0.9, seed=100 + i) if i % 2 else {}
        requests.append(dict(text_input=prompt, max_tokens=4 + (i * 5) % 40, stream=True, **sampling))
    alone = [run_stream(llama_server.grpc_url, "ensemble", ensemble_inputs(**r)) for r in requests]
    before = read_metrics(llama_server.metrics_port)
    together = _concurrent(llama_server.grpc_url, requests)
    after = read_metrics(llama_server.metrics_port)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a.error is None and t is not None and t.error is None, (i, a.error, t and t.error)
        assert t.text == a.text, f"request {i}"
    assert after["builder_engine_multi_seq_steps_total"] > before["builder_engine_multi_seq_steps_total"]
    assert after["builder_engine_max_seqs_in_step"] >= 8
    assert after["builder_engine_mixed_steps_total"] > before["builder_engine_mixed_steps_total"]
    _wait_kv_free(llama_server.metrics_port)


def _wait_kv_free(metrics_port: int, timeout: float = 30.0) -> None:
    """Wait until every KV block is back in the pool."""
    deadline = time.time() + timeout
    while True:
        m = read_metrics(metrics_port)
        if m["builder_kv_cache_blocks_free"] == m["builder_kv_cache_blocks_total"] and m["builder_requests_active"] == 0:
            return
        assert time.time() < deadline, f"KV blocks not freed: {m['builder_kv_cache_blocks_free']} of " \
                                       f"{m['builder_kv_cache_blocks_total']}"
        time.sleep(0.2)


def test_cancelled_streams_free_the_kv_pool(llama_server):
    """Clients that close their stream mid-way get their sequences aborted and their KV blocks returned.

    A cancel reaches the engine through the stream's next chunk in postprocessing, so it waits behind the chunks
    queued there; 24 non-streamed requests (one postprocessing call each) share the engine's steps meanwhile, so
    the engine cannot finish the cancelled sequences before the cancel arrives (alone, the tiny model's engine
    can outrun postprocessing on a loaded CPU)."""
    threads = []
    for i in range(24):
        inputs = ensemble_inputs(text_input=f"keep the engine busy {i}", max_tokens=200, min_tokens=200, stream=False)
        threads.append(threading.Thread(target=run_stream, args=(llama_server.grpc_url, "ensemble", inputs),
                                        kwargs=dict(request_id=f"busy{i}")))
    for i in range(6):
        inputs = ensemble_inputs(text_input=f"cancel me {i} " * 5, max_tokens=200, min_tokens=200, stream=True)
        threads.append(threading.Thread(target=run_stream, args=(llama_server.grpc_url, "ensemble", inputs),
                                        kwargs=dict(request_id=f"c{i}", cancel_after=3)))
    assert _aborted_while(llama_server, threads) >= 6


def _aborted_while(server, threads: list[threading.Thread]) -> float:
    """Run threads to their end and wait until every KV block is free again; how many requests the engine aborted
    meanwhile."""
    before = read_metrics(server.metrics_port)["builder_engine_requests_aborted_total"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    _wait_kv_free(server.metrics_port)
    return read_metrics(server.metrics_port)["builder_engine_requests_aborted_total"] - before


def test_cancelled_engine_streams_are_aborted(llama_server):
    """Streams straight to tensorrt_llm (no ensemble) that the client closes are found by the engine model's
    cancellation watcher and aborted, while non-streamed requests keep the engine busy and finish."""
    busy_results, threads = [], []

    def engine_request(prompt_ids: list[int], streaming: bool, request_id: str, cancel_after: int | None) -> None:
        inputs = engine_inputs(input_ids=prompt_ids, input_lengths=len(prompt_ids), request_output_len=200,
                               min_tokens=200, streaming=streaming, exclude_input_in_output=True)
        result = run_stream(llama_server.grpc_url, "tensorrt_llm", inputs, request_id=request_id,
                            cancel_after=cancel_after)
        if cancel_after is None:
            busy_results.append(result)

    for i in range(16):
        threads.append(threading.Thread(target=engine_request, args=([5 + i, 6, 7, 8], False, f"busy{i}", None)))
    for i in range(4):
        threads.append(threading.Thread(target=engine_request, args=([9, 10 + i, 11], True, f"c{i}", 3)))
    assert _aborted_while(llama_server, threads) >= 4
    assert len(busy_results) == 16 and all(r.error is None and len(r.tokens) == 200 for r in busy_results)


def test_bad_requests_get_errors_and_server_keeps_serving(llama_server):
    """Invalid inputs are answered with a readable error; the next good request still works."""
    url = llama_server.grpc_url
    cases = [
        (dict(text_input="", max_tokens=8), "empty"),
        (dict(text_input="hi", max_tokens=0), "max_tokens"),
        (dict(text_input="hi", max_tokens=-3), "max_tokens"),
        (dict(text_input="hi", max_tokens=8, top_p=-0.5), "top_p"),
        (dict(text_input="hi " * 20, max_tokens=llama_server.max_seq_len), "max_seq_len"),
    ]
    for request, needle in cases:
        for stream in (False, True):
            result = run_stream(url, "ensemble", ensemble_inputs(stream=stream, **request))
            assert result.error is not None and needle in result.error, (request, result.error)
    good = run_stream(url, "ensemble", ensemble_inputs(text_input="still serving", max_tokens=8, stream=True))
    assert good.error is None and good.text
    _wait_kv_free(llama_server.metrics_port)


TRTLLM_FAMILIES = {
    "nv_trt_llm_request_metrics": ("request_type", ("active", "max", "scheduled", "context", "waiting")),
    "nv_trt_llm_kv_cache_block_metrics": ("kv_cache_block_type", ("max", "free", "used", "tokens_per", "fraction")),
    "nv_trt_llm_inflight_batcher_metrics": ("inflight_batcher_specific_metric",
                                            ("micro_batch_id", "generation_requests", "total_context_tokens",
                                             "paused_requests")),
    "nv_trt_llm_general_metrics": ("general_type", ("iteration_counter", "timestamp")),
}


def _trtllm(metrics: dict[str, float]) -> dict[tuple[str, str], float]:
    """{(family, label value): value} of the tensorrt_llm model's TensorRT-LLM gauge families."""
    out = {}
    for family, (key, values) in TRTLLM_FAMILIES.items():
        for value in values:
            found = [v for k, v in metrics.items() if k.startswith(family + "{") and f'{key}="{value}"' in k
                     and 'model="tensorrt_llm"' in k]
            assert len(found) == 1, f"{family}{{{key}={value}}}: {len(found)} series"
            out[family, value] = found[0]
    return out


def test_tensorrt_llm_metric_families_under_load(llama_server):
    """TensorRT-LLM's gauge families (the names dashboards, Dynamo and Kubernetes routers read) are on the metrics
    port with sensible values: during a 32-stream load requests are active and scheduled, KV blocks are used (the
    fraction in (0, 1]), iterations count up; afterwards nothing is active and every block is free."""
    before = _trtllm(read_metrics(llama_server.metrics_port))
    assert before["nv_trt_llm_request_metrics", "max"] == 64  # build_repo's max_batch_size
    assert before["nv_trt_llm_kv_cache_block_metrics", "tokens_per"] == 32
    requests = [dict(text_input=f"the server streams tokens from a paged cache, request {i}", max_tokens=48,
                     stream=True) for i in range(32)]
    load = threading.Thread(target=_concurrent, args=(llama_server.grpc_url, requests))
    load.start()
    seen = []
    while load.is_alive():
        seen.append(_trtllm(read_metrics(llama_server.metrics_port)))
        time.sleep(0.05)
    load.join()
    assert max(m["nv_trt_llm_request_metrics", "active"] for m in seen) >= 8
    assert max(m["nv_trt_llm_request_metrics", "scheduled"] for m in seen) >= 2
    fractions = [m["nv_trt_llm_kv_cache_block_metrics", "fraction"] for m in seen]
    assert all(0.0 <= f <= 1.0 for f in fractions) and max(fractions) > 0
    for m in seen:
        used, free, total = (m["nv_trt_llm_kv_cache_block_metrics", k] for k in ("used", "free", "max"))
        assert used + free == total
    _wait_kv_free(llama_server.metrics_port)
    after = _trtllm(read_metrics(llama_server.metrics_port))
    assert after["nv_trt_llm_general_metrics", "iteration_counter"] > before["nv_trt_llm_general_metrics",
                                                                               "iteration_counter"]
    assert after["nv_trt_llm_request_metrics", "active"] == 0
    assert after["nv_trt_llm_kv_cache_block_metrics", "used"] == 0
    assert after["nv_trt_llm_general_metrics", "timestamp"] > 1.7e9
