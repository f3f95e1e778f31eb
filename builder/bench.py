"""`builder bench`: load a running server over gRPC streaming and report TTFT, inter-token latency and throughput.

Load: a closed loop of C concurrent requests (`--concurrency C`: a new request is sent as soon as one finishes),
or an open loop at R requests/s (`--request-rate R`: Poisson arrivals from random.Random(seed + 2); `inf` sends all
at once). Every in-flight request has its own gRPC stream; streams are opened before the clock starts and reused
by the next request once their request is done (one request per stream at a time, so an error response, which
carries no request id, is attributed to the right request). Responses are timestamped in tritonclient's
callback thread as they arrive.

Requests are what genai-perf sends for `--backend tensorrtllm --streaming`: text_input, max_tokens, stream=true,
exclude_input_in_output=true, plus min_tokens=max_tokens so every request produces exactly its output length
(`--no-min-tokens` lets requests stop at the end token). Prompts encode to exactly the input length with the
repository's tokenizer (builder.workload).

Metrics per sweep point (latencies in ms, over the requests that completed without error):
- ttft: first token-bearing response time - send time;
- e2e_latency: final response time - send time;
- itl (per request): (last token time - first token time) / (tokens - 1), i.e. genai-perf's
  (latency - TTFT) / (output tokens - 1), with the token count of the engine;
- chunk_gap: every gap between consecutive token-bearing responses of a request, pooled;
- output_tokens: the ids the streamed responses carry (the ensemble's num_output_tokens per chunk; one per
  chunk for a server without it; exact);
  output_tokens_retokenized: the joined text re-encoded with the tokenizer (genai-perf's count);
- output_tok_s = output_tokens / duration, where duration = last response - first send; request_throughput =
  completed / duration; total_tok_s counts input tokens too;
- client_cpu_s / client_cpu_util: CPU time of this process during the point (util 1.0 = one core busy: the
  client, not the server, may be the bottleneck); send_lag (open loop): actual - scheduled send time.
Each statistic has p50, p90, p99, mean, min, max (numpy linear-interpolated percentiles).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import queue
import random
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.client import ensemble_inputs
from builder.errors import ConfigError, ServerError
from builder.workload import BenchRequest, WorkloadSpec, text_prompts

DEFAULT_REQUEST_TIMEOUT_S = 600.0
MAX_PRESTARTED_STREAMS = 64
MAX_ERROR_MESSAGES = 5
RATE_SEED_OFFSET = 2
STAT_KEYS = ("p50", "p90", "p99", "mean", "min", "max")
_REQUEST_IDS = itertools.count()


@dataclass
class RequestRecord:
    """Timestamps (time.perf_counter seconds) and results of one request; shared with scripts/bench_engine.py."""

    index: int
    input_len: int
    output_len: int  # requested
    send: float | None = None  # None: never sent
    scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per token-bearing response (chunk)
    chunks: list[bytes] = field(default_factory=list)
    tokens: int | None = None  # ids received (a chunk may carry several); None: one per token-bearing response
    end: float | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def num_tokens(self) -> int:
        """Output tokens of this request."""
        return self.tokens if self.tokens is not None else len(self.token_times)

    @property
    def ok(self) -> bool:
        """Finished without error."""
        return self.error is None and self.end is not None

    @property
    def text(self) -> str:
        """The joined streamed text."""
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def stats(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p90/p99/mean/min/max of values (times scale); None when there are none."""
    if not values:
        return {k: None for k in STAT_KEYS}
    a = np.asarray(values, dtype=np.float64) * scale
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def summarize(records: list[RequestRecord], tokenizer: Any = None, **extra: Any) -> dict[str, Any]:
    """The metrics of one sweep point (see the module docstring); extra keys go first."""
    ok = [r for r in records if r.ok]
    sends = [r.send for r in records if r.send is not None]
    ends = [r.end for r in records if r.end is not None]
    duration = (max(ends) - min(sends)) if ends and sends else 0.0
    out_tokens = sum(r.num_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    retok = None
    if tokenizer is not None and ok:
        encoded = tokenizer([r.text for r in ok], add_special_tokens=False)["input_ids"]
        retok = sum(len(ids) for ids in encoded)
    errors = [r.error for r in records if r.error is not None]
    ttft = [r.token_times[0] - r.send for r in ok if r.token_times]
    e2e = [r.end - r.send for r in ok]
    itl = [(r.token_times[-1] - r.token_times[0]) / (r.num_tokens - 1) for r in ok
           if r.token_times and r.num_tokens > 1]
    gaps = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:])]
    lags = [r.send - r.scheduled for r in records if r.scheduled is not None and r.send is not None]
    rate = (lambda n: n / duration if duration > 0 else None)
    point = dict(extra)
    point.update({
        "requests": len(records), "completed": len(ok), "errors": len(errors),
        "error_messages": list(dict.fromkeys(errors))[:MAX_ERROR_MESSAGES],
        "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "output_tokens_retokenized": retok,
        "exact_output_lengths": bool(ok) and all(r.num_tokens == r.output_len for r in ok),
        "output_tok_s": rate(out_tokens), "output_tok_s_retokenized": rate(retok) if retok is not None else None,
        "total_tok_s": rate(in_tokens + out_tokens), "request_throughput": rate(len(ok)),
        "ttft_ms": stats(ttft, 1e3), "itl_ms": stats(itl, 1e3), "chunk_gap_ms": stats(gaps, 1e3),
        "e2e_latency_ms": stats(e2e, 1e3),
    })
    if lags:
        point["send_lag_ms"] = stats(lags, 1e3)
    return point


def _grpc():
    """tritonclient.grpc, imported on first use."""
    import tritonclient.grpc as grpcclient

    return grpcclient


class StreamSlot:
    """One tritonclient client with one open gRPC stream, carrying one request at a time."""

    def __init__(self, url: str, model: str, free: queue.Queue) -> None:
        self.model = model
        self.free = free
        self.client = _grpc().InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response)
        self.record: RequestRecord | None = None
        self.request_id = ""

    def send(self, record: RequestRecord, inputs: list) -> None:
        """Send one request on this stream (the slot must be free)."""
        self.request_id = f"bench-{next(_REQUEST_IDS)}"
        self.record = record
        record.send = time.perf_counter()
        try:
            self.client.async_stream_infer(self.model, inputs, request_id=self.request_id,
                                           enable_empty_final_response=True)
        except Exception as exc:  # noqa: BLE001  tritonclient raises its own and grpc's errors
            self._finish(f"send failed: {exc}", time.perf_counter())

    def _on_response(self, result: Any, error: Any) -> None:
        """tritonclient's callback (its stream thread): timestamp tokens, finish on the final response or error."""
        now = time.perf_counter()
        record = self.record
        if record is None:
            return
        if error is not None:
            self._finish(error.message() if hasattr(error, "message") else str(error), now)
            return
        response = result.get_response()
        if response.id != self.request_id:
            return
        names = {o.name for o in response.outputs}
        if "text_output" in names:
            record.token_times.append(now)
            record.chunks.append(b"".join(bytes(x) for x in result.as_numpy("text_output").reshape(-1)))
            count = int(result.as_numpy("num_output_tokens").reshape(-1)[0]) if "num_output_tokens" in names else 1
            record.tokens = (record.tokens or 0) + count
        params = response.parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            self._finish(None, now)

    def _finish(self, error: str | None, now: float) -> None:
        """Close the record and give the slot back."""
        record, self.record = self.record, None
        if record is None:
            return
        record.error, record.end = error, now
        self.free.put(self)
        record.done.set()

    def close(self) -> None:
        """Stop the stream (cancelling a request still in flight) and close the client."""
        try:
            self.client.stop_stream(cancel_requests=self.record is not None)
        finally:
            self.client.close()


def request_inputs(request: BenchRequest, min_tokens: bool) -> list:
    """The ensemble request tensors for one benchmark request (genai-perf's tensorrtllm payload)."""
    extra = {"min_tokens": request.output_len} if min_tokens else {}
    return ensemble_inputs(request.text, request.output_len, True, exclude_input_in_output=True, **extra)


def check_server(url: str, model: str) -> None:
    """ServerError unless the server is live and the model ready."""
    try:
        client = _grpc().InferenceServerClient(url)
        try:
            ready = client.is_server_live() and client.is_model_ready(model)
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        raise ServerError(f"cannot reach Triton at {url} ({exc}); is `builder serve` running?") from exc
    if not ready:
        raise ServerError(f"model {model!r} is not ready on {url}; check `builder serve`'s log")


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s after start) of n requests at `rate` req/s: Poisson arrivals; all 0 for inf."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed + RATE_SEED_OFFSET)
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))


def run_point(url: str, model: str, requests: list[BenchRequest], concurrency: int | None = None,
              rate: float | None = None, seed: int = 0, min_tokens: bool = True,
              timeout: float = DEFAULT_REQUEST_TIMEOUT_S) -> tuple[list[RequestRecord], float]:
    """Run one sweep point; (records, client CPU seconds). Exactly one of concurrency / rate."""
    if (concurrency is None) == (rate is None):
        raise ConfigError("give exactly one of concurrency and request rate")
    records = [RequestRecord(r.index, r.input_len, r.output_len) for r in requests]
    inputs = [request_inputs(r, min_tokens) for r in requests]
    free: queue.Queue = queue.Queue()
    slots = [StreamSlot(url, model, free) for _ in range(concurrency or min(len(requests), MAX_PRESTARTED_STREAMS))]
    for slot in slots:
        free.put(slot)
    offsets = arrival_offsets(len(requests), rate, seed) if rate is not None else None
    cpu0 = time.process_time()
    start = time.perf_counter()
    try:
        for i, record in enumerate(records):
            if offsets is not None:
                record.scheduled = start + offsets[i]
                delay = record.scheduled - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            try:
                slot = free.get_nowait()
            except queue.Empty:
                if concurrency is None:  # open loop: never wait for a stream, open another
                    slot = StreamSlot(url, model, free)
                    slots.append(slot)
                else:
                    try:
                        slot = free.get(timeout=timeout)
                    except queue.Empty:
                        break
            slot.send(record, inputs[i])
        for record in records:
            if record.send is None:
                record.error = f"not sent: no stream became free within {timeout:.0f}s"
            elif not record.done.wait(max(0.0, record.send + timeout - time.perf_counter())):
                record.error = f"no final response within {timeout:.0f}s"
    finally:
        cpu = time.process_time() - cpu0
        for slot in slots:
            slot.close()
    return records, cpu


def run_bench(url: str, model: str, spec: WorkloadSpec, tokenizer: Any, concurrencies: list[int] | None = None,
              rates: list[float] | None = None, num_requests: int | None = None, warmup: int = 1,
              min_tokens: bool = True, timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
              log=print) -> list[dict[str, Any]]:
    """Run a sweep (concurrencies or rates) and return one summary per point."""
    check_server(url, model)
    points = [("concurrency", c) for c in concurrencies or []] + [("request_rate", r) for r in rates or []]
    if not points:
        raise ConfigError("give --concurrency or --request-rate values")
    counts = [num_requests or default_num_requests(kind, value) for kind, value in points]
    requests = text_prompts(spec, max(counts + [warmup]), tokenizer)
    if warmup:
        run_point(url, model, requests[:warmup], concurrency=1, min_tokens=min_tokens, timeout=timeout)
    results = []
    for (kind, value), n in zip(points, counts):
        log(f"bench: {kind} {_label(value)}, {n} requests ...")
        records, cpu = run_point(url, model, requests[:n], concurrency=value if kind == "concurrency" else None,
                                 rate=value if kind == "request_rate" else None, seed=spec.seed,
                                 min_tokens=min_tokens, timeout=timeout)
        labels = {"concurrency": value if kind == "concurrency" else None,
                  "request_rate": _label(value) if kind == "request_rate" else None}
        point = summarize(records, tokenizer, **labels)
        point["client_cpu_s"] = cpu
        point["client_cpu_util"] = cpu / point["duration_s"] if point["duration_s"] else None
        results.append(point)
    return results


def default_num_requests(kind: str, value: float) -> int:
    """Requests per point when --num-requests is not given: 4 per concurrent slot (>= 16), or 100 for a rate."""
    return max(16, 4 * int(value)) if kind == "concurrency" else 100


def _label(value: float) -> Any:
    """A rate or concurrency as JSON: ints stay ints, inf becomes the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return int(value) if float(value).is_integer() else value


def markdown_table(points: list[dict[str, Any]], x_key: str | None = None) -> str:
    """A markdown table of the main metrics, one row per point."""
    x_key = x_key or ("concurrency" if points and points[0].get("concurrency") is not None else "request_rate")

    def f(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    head = [x_key, "reqs", "errors", "duration s", "out tok/s", "out tok/s (retok)", "req/s", "TTFT p50",
            "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        row = [str(p.get(x_key)), str(p["requests"]), str(p["errors"]), f(p["duration_s"], 2), f(p["output_tok_s"]),
               f(p.get("output_tok_s_retokenized")), f(p["request_throughput"], 2), f(p["ttft_ms"]["p50"]),
               f(p["ttft_ms"]["p99"]), f(p["itl_ms"]["p50"], 2), f(p["itl_ms"]["p99"], 2),
               f(p["e2e_latency_ms"]["p50"]), f(p["e2e_latency_ms"]["p99"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n(latencies in ms)"


def plot(points: list[dict[str, Any]], path: Path, x_key: str, title: str = "") -> Path:
    """A PNG: output tok/s, TTFT p50/p99, ITL p50/p99 and E2E p50/p99 against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(points)))
    labels = [str(p.get(x_key)) for p in points]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [(axes[0][0], "output tok/s", [("output_tok_s", None, "output tok/s")]),
              (axes[0][1], "TTFT (ms)", [("ttft_ms", "p50", "p50"), ("ttft_ms", "p99", "p99")]),
              (axes[1][0], "inter-token latency (ms)", [("itl_ms", "p50", "p50"), ("itl_ms", "p99", "p99")]),
              (axes[1][1], "end-to-end latency (ms)", [("e2e_latency_ms", "p50", "p50"),
                                                        ("e2e_latency_ms", "p99", "p99")])]
    for ax, ylabel, series in panels:
        for key, sub, name in series:
            ys = [(p[key][sub] if sub else p[key]) for p in points]
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=name)
        ax.set_xticks(xs, labels)
        ax.set_xlabel(x_key.replace("_", " ") + (" (req/s)" if x_key == "request_rate" else ""))
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(out_dir: Path, metadata: dict[str, Any], points: list[dict[str, Any]], x_key: str,
                  make_plot: bool = True, name: str = "bench") -> dict[str, Path]:
    """DIR/<name>.json (metadata + results) and DIR/<name>.png; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json"}
    paths["json"].write_text(json.dumps({"metadata": metadata, "results": points}, indent=2) + "\n")
    if make_plot:
        try:
            paths["png"] = plot(points, out_dir / f"{name}.png", x_key, title=metadata.get("title", ""))
        except ImportError:
            print("bench: matplotlib is not installed, no PNG written (pip install 'builder[bench]' or "
                  "matplotlib)", file=sys.stderr)
    return paths


# ---- command line -------------------------------------------------------------------------------------------

def parse_list(text: str, allow_inf: bool = False) -> list[float]:
    """'1,16,64' -> [1, 16, 64]; 'inf' allowed for rates."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"{item!r} must be a positive number{' or inf' if allow_inf else ''}")
        values.append(value)
    return values


def parse_concurrency(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]."""
    values = parse_list(text)
    if any(not v.is_integer() for v in values):
        raise argparse.ArgumentTypeError("concurrency values must be whole numbers")
    return [int(v) for v in values]


def parse_range(text: str) -> tuple[int, int]:
    """'32-1024' or '32,1024' -> (32, 1024)."""
    parts = text.replace(",", "-").split("-")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a LOW-HIGH range of integers") from None
    return lo, hi


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload options shared by `builder bench` and scripts/bench_engine.py."""
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", default=None, choices=("fixed", "mixed", "file"),
                   help="fixed lengths (default), mixed (lengths drawn from the ranges with random.Random(seed)), "
                        "or prompts from --prompts-file")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens (fixed workload; BOS included)")
    w.add_argument("--output-len", type=int, default=128, help="output tokens (fixed workload)")
    w.add_argument("--input-range", type=parse_range, default=(32, 1024), help="mixed: prompt tokens LOW-HIGH")
    w.add_argument("--output-range", type=parse_range, default=(16, 512), help="mixed: output tokens LOW-HIGH")
    w.add_argument("--prompts-file", type=Path, default=None,
                   help="prompts, one per line or JSON lines with text_input and optional max_tokens")
    w.add_argument("--num-requests", type=int, default=None,
                   help="requests per sweep point (default: 4 x concurrency, at least 16; 100 per rate)")
    w.add_argument("--seed", type=int, default=0, help="seed of lengths, prompts and arrivals")


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The WorkloadSpec of parsed workload options."""
    kind = args.workload or ("file" if args.prompts_file else "fixed")
    spec = WorkloadSpec(kind=kind, input_len=args.input_len, output_len=args.output_len,
                        input_range=tuple(args.input_range), output_range=tuple(args.output_range), seed=args.seed,
                        prompts_file=args.prompts_file)
    spec.validate()
    if args.num_requests is not None and args.num_requests < 1:
        raise ConfigError(f"--num-requests must be >= 1, got {args.num_requests}")
    return spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `builder bench`."""
    p.add_argument("--url", default="localhost:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("--model", default="ensemble", help="model to send requests to (the ensemble's contract)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=parse_concurrency, default=None,
                      help="closed-loop sweep: concurrent requests per point, e.g. 1,16,64 (default 1)")
    load.add_argument("--request-rate", type=lambda s: parse_list(s, allow_inf=True), default=None,
                      help="open-loop sweep: requests/s per point (Poisson arrivals), e.g. 2,8,inf")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (the server's)")
    tok.add_argument("--repo", type=Path, default=None,
                     help="the served model repository: its preprocessing/1/tokenizer is used")
    add_workload_arguments(p)
    p.add_argument("--no-min-tokens", action="store_true",
                   help="do not send min_tokens=max_tokens (requests may stop early at the end token)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (one at a time) before measuring")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds a request may take before it counts as an error")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.png")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def tokenizer_dir(args: argparse.Namespace) -> Path:
    """--tokenizer, or REPO/preprocessing/1/tokenizer; ConfigError when neither is given."""
    if args.tokenizer is not None:
        return args.tokenizer
    if args.repo is not None:
        return args.repo / "preprocessing" / "1" / "tokenizer"
    raise ConfigError("bench needs the server's tokenizer to make prompts of exact lengths and count tokens; pass "
                      "--repo REPO (the repository being served) or --tokenizer DIR")


def command_line() -> str:
    """The command as typed (best effort)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("builder", "__main__.py", "cli.py"):
        argv[0] = "builder"
    return shlex.join(argv)


def run_cli(args: argparse.Namespace) -> int:
    """Run `builder bench` from parsed options: sweep, print the table, write JSON and PNG."""
    from builder.triton.detokenizer import load_tokenizer

    spec = workload_spec(args)
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    tok_dir = tokenizer_dir(args)
    tokenizer = load_tokenizer(tok_dir)
    concurrencies = args.concurrency if args.concurrency or args.request_rate else [1]
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = datetime.datetime.now(datetime.timezone.utc)
    points = run_bench(args.url, args.model, spec, tokenizer, concurrencies=concurrencies if not args.request_rate
                       else None, rates=args.request_rate, num_requests=args.num_requests, warmup=args.warmup,
                       min_tokens=not args.no_min_tokens, timeout=args.request_timeout, log=log)
    x_key = "request_rate" if args.request_rate else "concurrency"
    print(markdown_table(points, x_key))
    if args.out is not None:
        metadata = {
            "tool": "builder bench", "command": command_line(), "time": started.isoformat(timespec="seconds"),
            "url": args.url, "model": args.model, "sweep": x_key, "workload": spec.describe(),
            "num_requests": args.num_requests, "tokenizer": str(tok_dir), "min_tokens": not args.no_min_tokens,
            "warmup": args.warmup, "client_host": platform.node(), "python": platform.python_version(),
            "title": f"builder bench {args.model} @ {args.url}: {_workload_title(spec)}",
        }
        paths = write_results(args.out, metadata, points, x_key, make_plot=not args.no_plot)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if any(p["errors"] for p in points) else 0


def _workload_title(spec: WorkloadSpec) -> str:
    """A short description of the workload for plot titles."""
    if spec.kind == "fixed":
        return f"{spec.input_len} in / {spec.output_len} out tokens"
    if spec.kind == "mixed":
        (a, b), (c, d) = spec.input_range, spec.output_range
        return f"mixed {a}-{b} in / {c}-{d} out"
    return f"prompts from {spec.prompts_file}"
