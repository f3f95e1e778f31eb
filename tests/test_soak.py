"""Soak through a real tritonserver: 1,000 streams at 64 concurrent with 20% cancelled by their clients, then 1,000
with none. Before builder.triton.stop_channel this killed tritonserver 2.51 (heap corruption, signal 6) within a few
hundred cancellations (docs/decisions.md); then the cancelled soak again through tensorrt_llm_bls.
scripts/soak.py runs the same soak at GPU sizes (--model tensorrt_llm_bls for the BLS)."""

from __future__ import annotations

import pytest
from triton_helpers import read_metrics

from builder.soak import SoakOptions, run_soak

pytestmark = pytest.mark.server


@pytest.mark.parametrize("cancel_fraction", [0.2, 0.0])
def test_soak_streams_with_cancellations(llama_server, cancel_fraction):
    """Every non-cancelled request completes, a sample equals its solo run, the engine frees every KV block, and the
    server is still alive and ready."""
    metrics_url = f"http://127.0.0.1:{llama_server.metrics_port}/metrics"
    report = run_soak(llama_server.grpc_url, metrics_url,
                      SoakOptions(requests=1000, concurrency=64, cancel_fraction=cancel_fraction,
                                  seed=int(cancel_fraction * 100)))
    assert not report.problems, report.summary()
    assert report.completed + report.cancelled == 1000
    if cancel_fraction:
        assert report.cancelled > 100
        assert read_metrics(llama_server.metrics_port)["builder_engine_requests_aborted_total"] > 0
    assert report.kv_blocks_total and report.kv_blocks_free == report.kv_blocks_total
    assert llama_server.alive_and_ready()


@pytest.mark.upstream_bug("Triton 2.51's python backend crashes under concurrent BLS load (boost lock_exception, "
                          "SIGSEGV, or a dead BLS stub; triton-inference-server/server#8882, open, still in 2.69): "
                          "about 1 in 3 runs here, with this session's code and with 9e0f548's (docs/serving.md)")
def test_soak_through_the_bls_with_cancellations(llama_server):
    """The same soak through tensorrt_llm_bls (its requests run on threads of their own and client cancellations
    reach the engine over the stop channel): no failure, the sample equals its solo run, the KV pool is full again."""
    metrics_url = f"http://127.0.0.1:{llama_server.metrics_port}/metrics"
    aborted = read_metrics(llama_server.metrics_port)["builder_engine_requests_aborted_total"]
    report = run_soak(llama_server.grpc_url, metrics_url,
                      SoakOptions(requests=1000, concurrency=64, cancel_fraction=0.2, seed=3,
                                  model="tensorrt_llm_bls"))
    assert not report.problems, report.summary()
    assert report.completed + report.cancelled == 1000 and report.cancelled > 100
    assert read_metrics(llama_server.metrics_port)["builder_engine_requests_aborted_total"] > aborted
    assert llama_server.alive_and_ready()


def test_solo_rerun_reads_to_the_end(monkeypatch):
    """The harness itself: a request planned for cancellation that completed under load (its chunks came merged, so
    fewer than cancel_after arrived) is re-run alone to the end, not cut at cancel_after chunks. Seen in CI: request
    291 of seed 3 streamed ' word adqu�ding mat' in 3 merged chunks under load, and the solo re-run stopped after 4
    of its 5 chunks (' word adqu�ding'), a false mismatch. The stream is replaced here: what is tested is the
    comparison, not the server."""
    import builder.soak as soak

    chunks = [" word", " ad", "qu", "\ufffdding", " mat"]
    loaded = {}

    def fake_run_one(url, request, options):
        if request.index not in loaded:  # under load: the chunks arrive merged in two, so no cancel point is reached
            loaded[request.index] = True
            return "".join(chunks), False
        if request.cancel_after is not None:  # alone: one chunk per token, cut at cancel_after
            return "".join(chunks[:request.cancel_after]), True
        return "".join(chunks), False

    monkeypatch.setattr(soak, "run_one", fake_run_one)
    report = soak.run_soak("unused", None, SoakOptions(requests=8, concurrency=1, cancel_fraction=1.0, sample=8,
                                                       cancel_after=(4, 4)))
    assert report.completed == 8 and not report.problems, report.summary()
