"""Soak a running server: many concurrent streams, random lengths, random client cancellations, then check.

What it checks after the load (SoakReport.problems lists what failed):
  - every request that was not cancelled completed without an error;
  - a sample of them, sent again one at a time afterwards, gives the same text (greedy, top_k 1);
  - the engine let go of everything: no request active and every KV block free again (Triton metrics).
The caller checks that the server process is still alive (tests/test_soak.py, scripts/soak.py).
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from builder.client import stream_text
from builder.errors import BuilderError

PROMPTS = (
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog",
    "A GPU reads every weight once per decoded token, so",
    "Café ünïcödé: 東京の天気は晴れ 🚀",
    "In-flight batching admits new requests between steps",
    " leading space and\nnew line",
)
GREEDY = {"top_k": 1}  # deterministic text, so a request can be compared with its solo run
SETTLE_S = 30.0  # how long the engine may take to release cancelled requests after the load


@dataclass(frozen=True)
class SoakOptions:
    """The load: how many requests, how many at once, which share the client cancels."""

    requests: int = 1000
    concurrency: int = 64
    cancel_fraction: float = 0.2
    max_tokens: tuple[int, int] = (1, 48)  # each request's max_tokens, uniform in this range
    cancel_after: tuple[int, int] = (1, 4)  # a cancelled request is cancelled after this many streamed chunks
    sample: int = 16  # non-cancelled requests re-run one at a time and compared
    seed: int = 0
    model: str = "ensemble"
    timeout_s: float = 120.0  # per response


@dataclass(frozen=True)
class SoakRequest:
    """One request of the load."""

    index: int
    prompt: str
    max_tokens: int
    cancel_after: int | None  # None: read to the end


@dataclass
class SoakReport:
    """What the soak saw."""

    completed: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    kv_blocks_free: float | None = None
    kv_blocks_total: float | None = None
    requests_active: float | None = None
    seconds: float = 0.0

    @property
    def problems(self) -> list[str]:
        """Every failed check, one line each (empty: the soak passed)."""
        out = [f"{len(self.errors)} request(s) failed, first: {self.errors[0]}"] if self.errors else []
        out += [f"solo run differs: {m}" for m in self.mismatches]
        if self.requests_active:
            out.append(f"{self.requests_active:g} request(s) still active in the engine after the load")
        if self.kv_blocks_free is not None and self.kv_blocks_free != self.kv_blocks_total:
            out.append(f"KV pool not full again: {self.kv_blocks_free:g} of {self.kv_blocks_total:g} blocks free")
        return out

    def summary(self) -> str:
        """One line for logs."""
        state = "ok" if not self.problems else "FAILED: " + "; ".join(self.problems)
        return (f"{self.completed} completed, {self.cancelled} cancelled, {len(self.errors)} errors in "
                f"{self.seconds:.1f}s; KV {self.kv_blocks_free} / {self.kv_blocks_total} free; {state}")


def plan(options: SoakOptions) -> list[SoakRequest]:
    """The requests of a soak, drawn from options.seed."""
    rng = random.Random(options.seed)
    return [SoakRequest(i, f"{rng.choice(PROMPTS)} #{i}", rng.randint(*options.max_tokens),
                        rng.randint(*options.cancel_after) if rng.random() < options.cancel_fraction else None)
            for i in range(options.requests)]


def run_one(url: str, request: SoakRequest, options: SoakOptions) -> tuple[str, bool]:
    """Stream one request: (text received, cancelled?). Closing the stream early cancels it (gRPC cancel)."""
    chunks = []
    stream = stream_text(url, request.prompt, request.max_tokens, stream=True, model=options.model,
                         timeout=options.timeout_s, **GREEDY)
    try:
        for text in stream:
            chunks.append(text)
            if request.cancel_after is not None and len(chunks) >= request.cancel_after:
                return "".join(chunks), True
    finally:
        stream.close()  # cancels the request when it is not finished
    return "".join(chunks), False


def engine_metrics(metrics_url: str) -> dict[str, float]:
    """The builder_* gauges of the engine model (summed over its label sets)."""
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("builder_"):
            key, _, value = line.rpartition(" ")
            name = key.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def settle(report: SoakReport, metrics_url: str, timeout_s: float = SETTLE_S) -> None:
    """Wait until the engine has no active request (up to timeout_s), then record the KV pool state."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = engine_metrics(metrics_url)
        report.requests_active = values.get("builder_requests_active")
        report.kv_blocks_free = values.get("builder_kv_cache_blocks_free")
        report.kv_blocks_total = values.get("builder_kv_cache_blocks_total")
        done = not report.requests_active and report.kv_blocks_free == report.kv_blocks_total
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def run_soak(url: str, metrics_url: str | None, options: SoakOptions) -> SoakReport:
    """Run the load on the gRPC endpoint url, then the checks (metrics_url None: skip the KV check)."""
    requests = plan(options)
    report = SoakReport()
    texts: dict[int, str] = {}
    lock = threading.Lock()

    def work(request: SoakRequest) -> None:
        try:
            text, cancelled = run_one(url, request, options)
        except BuilderError as exc:
            with lock:
                report.errors.append(f"request {request.index}: {exc}")
            return
        with lock:
            if cancelled:
                report.cancelled += 1
            else:
                report.completed += 1
                texts[request.index] = text

    started = time.monotonic()
    with ThreadPoolExecutor(options.concurrency) as pool:
        list(pool.map(work, requests))
    report.seconds = time.monotonic() - started
    if metrics_url is not None:
        settle(report, metrics_url)
    finished = [r for r in requests if r.index in texts]
    for request in random.Random(options.seed + 1).sample(finished, min(options.sample, len(finished))):
        # read to the end: a request planned for cancellation that finished first under load (its chunks came
        # merged, fewer than cancel_after) is compared whole, not cut at cancel_after chunks
        solo, _ = run_one(url, replace(request, cancel_after=None), options)
        loaded = texts[request.index]
        if solo != loaded:
            same = len(os.path.commonprefix([solo, loaded]))
            report.mismatches.append(f"request {request.index} ({request.max_tokens} tokens, same for the first "
                                     f"{same} of {len(loaded)} characters): {loaded!r} under load, {solo!r} alone")
    return report
