"""The `builder` command line: build, serve, generate, bench, tiny. Each subcommand calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from builder.config import DTYPES, ENGINE_BACKENDS, BuildSettings
from builder.models import DEFAULT_TINY, TINY_MODELS
from builder.errors import BuilderError


def _add_build(sub: argparse._SubParsersAction) -> None:
    """Options of `builder build`."""
    p = sub.add_parser("build", help="HF checkpoint -> engine -> Triton model repository")
    p.add_argument("--model", default="tiny-llama",
                   help="HF checkpoint folder, or a built-in model: " + ", ".join(TINY_MODELS) + " (default tiny-llama)")
    p.add_argument("--output", required=True, type=Path, help="model repository folder to create")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                   help="weights/activations dtype; auto keeps the checkpoint's own")
    p.add_argument("--max-batch-size", type=int, default=64, help="most sequences in one engine step")
    p.add_argument("--max-input-len", type=int, default=0, help="longest prompt in tokens (0: max-seq-len)")
    p.add_argument("--max-seq-len", type=int, default=0,
                   help="longest prompt+output in tokens (0: the model's max_position_embeddings)")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="token budget of one engine step")
    p.add_argument("--tokens-per-block", type=int, default=32, help="paged KV cache block size in tokens")
    p.add_argument("--kv-cache-memory-mb", type=int, default=256, help="KV cache pool size on CPU (MiB)")
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float, default=0.9,
                   help="share of free GPU memory for the KV cache on GPU")
    p.add_argument("--device", default="cpu", help="device the engine runs on when served (cpu, cuda)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size: one weight shard and one process (GPU) per rank when served")
    p.add_argument("--backend", default="portable", choices=ENGINE_BACKENDS,
                   help="engine: portable (builder's runtime in Triton's python backend), tensorrtllm (TensorRT-LLM "
                        "1.2.x checkpoint + trtllm-build script, C++ tensorrtllm backend), trtllm-pytorch (HF-format "
                        "checkpoint for TensorRT-LLM's PyTorch backend, llmapi model); docs/deploy-tensorrt-llm.md")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    q = p.add_argument_group("quantization")
    q.add_argument("--quant", default="none", choices=("none", "int8_wo", "int4_wo", "int4_awq", "fp8"),
                   help="weight quantization: int8_wo/int4_wo = W8A16/W4A16 (per channel, quantized by trtllm-build "
                        "from the float weights), int4_awq = W4A16_AWQ (calibrated, group-wise), fp8 = FP8 "
                        "weights and activations (calibrated, per tensor)")
    q.add_argument("--group-size", type=int, default=None,
                   help="int4_awq group size: 64 or 128 (default 128); must divide every rank's input width")
    q.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8", "fp8"),
                   help="KV cache storage: auto = model dtype; int8/fp8 with calibrated per-layer scales")
    q.add_argument("--exclude-modules", nargs="+", default=None, metavar="PATTERN",
                   help="TensorRT-LLM module names (fnmatch) to keep unquantized (default: lm_head)")
    q.add_argument("--calib-data", type=Path, default=None,
                   help="UTF-8 text file to calibrate on (int4_awq, fp8, int8/fp8 KV); default: bundled corpus")
    q.add_argument("--calib-size", type=int, default=16, help="calibration sequences")
    q.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    t = p.add_argument_group("serving (Triton side, docs/serving.md)")
    t.add_argument("--preprocessing-instances", type=int, default=1,
                   help="instances of the tokenizing preprocessing model (TensorRT-LLM's preprocessing_instance_count)")
    t.add_argument("--max-responses-per-second", type=float, default=2000.0,
                   help="bound on the engine model's streamed responses, all requests together (0: unbounded)")
    t.add_argument("--decoupled-mode", default="true", choices=("true", "false"),
                   help="TensorRT-LLM's decoupled_mode: true (default) makes tensorrt_llm and tensorrt_llm_bls decoupled "
                        "(streaming over gRPC); false makes them, and so the ensemble, unary: one response per request, "
                        "HTTP /infer works, stream=true is refused")
    e = p.add_argument_group("accuracy (docs/performance.md)")
    e.add_argument("--eval", default="auto", choices=("auto", "on", "off"),
                   help="measure perplexity and KL divergence against the unquantized model (converted to a temp "
                        "folder, tp 1) and write tensorrt_llm/1/engine/accuracy.json; auto: when quantizing")
    e.add_argument("--eval-data", type=Path, default=None,
                   help="UTF-8 held-out text to evaluate on (default: the bundled held-out documentation text)")
    e.add_argument("--eval-tokens", type=int, default=8192, help="tokens to score (0: the whole text)")
    e.add_argument("--max-ppl-increase", type=float, default=None, metavar="PCT",
                   help="fail the build when perplexity rises more than PCT percent over the unquantized model")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """Options of `builder serve`."""
    p = sub.add_parser("serve", help="start tritonserver on a model repository")
    p.add_argument("repository", type=Path)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the models to be ready")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """Options of `builder generate`."""
    p = sub.add_parser("generate", help="send a prompt to a running server and print the text")
    p.add_argument("prompt")
    p.add_argument("--url", default="localhost:8001", help="gRPC HOST:PORT of the server")
    p.add_argument("--model-name", default="ensemble")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--exclude-input", action="store_true", help="do not echo the prompt (non-streaming)")


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    """Options of `builder tiny`."""
    p = sub.add_parser("tiny", help="write a built-in tiny HF checkpoint folder (for tests and demos)",
                       description="built-in models: " + "; ".join(f"{name} ({tiny.description})"
                                                                   for name, tiny in TINY_MODELS.items()))
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--model", default="tiny-llama", choices=[*TINY_MODELS, *DEFAULT_TINY],
                   help="a built-in model, or an architecture for its default tiny model (default tiny-llama)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """Options of `builder bench` (defined in builder.bench)."""
    from builder.bench import add_arguments

    add_arguments(sub.add_parser("bench", help="load a running server over gRPC streaming: TTFT, inter-token "
                                 "latency, throughput (JSON + PNG)"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="builder", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_serve, _add_generate, _add_tiny, _add_bench):
        add(sub)
    return parser.parse_args(argv)


def cmd_build(args: argparse.Namespace) -> int:
    """Run `builder build`."""
    from builder.build import BuildOptions, build
    from builder.config import QuantOptions
    from builder.accuracy import EvalOptions, read_report
    from builder.repo.render import ServingOptions

    settings = BuildSettings(dtype=args.dtype, max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                             max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                             tokens_per_block=args.tokens_per_block, kv_cache_memory_mb=args.kv_cache_memory_mb,
                             kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction, device=args.device)
    config = build(BuildOptions(output=args.output, model=args.model, force=args.force, settings=settings,
                                tp_size=args.tp, quant=QuantOptions(
                                    quant=args.quant, kv_cache_dtype=args.kv_cache_dtype, group_size=args.group_size,
                                    exclude_modules=args.exclude_modules, calib_data=args.calib_data,
                                    calib_size=args.calib_size, calib_seq_len=args.calib_seq_len),
                                backend=args.backend, serving=ServingOptions(
                                    preprocessing_instances=args.preprocessing_instances,
                                    max_responses_per_second=args.max_responses_per_second,
                                    decoupled_mode=args.decoupled_mode == "true"),
                                evaluation=EvalOptions(
                                    mode=args.eval, max_ppl_increase=args.max_ppl_increase, eval_data=args.eval_data,
                                    max_tokens=args.eval_tokens)))
    report = read_report(args.output.expanduser())
    if report is not None:
        print(report.summary())
    print(f"built {config.model.architecture} ({config.build.dtype}, max_seq_len {config.build.max_seq_len}) "
          f"-> {args.output}")
    if args.backend != "portable":  # TensorRT-LLM targets: the engine is built here only if trtllm-build is on PATH
        from builder.trtllm_build import finish

        result = finish(args.output.expanduser().resolve(), args.backend)
        print(result.line)
        return result.exit_code  # 0, or 3 when trtllm-build ran and failed (builder.trtllm_build)
    print(f"serve it with: builder serve {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run `builder serve` until Ctrl-C (0); ServerError (non-zero exit) when tritonserver ends by itself."""
    from builder.serve import serve_forever

    serve_forever(args.repository, grpc_port=args.grpc_port, http_port=args.http_port,
                  metrics_port=args.metrics_port, ready_timeout=args.timeout)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Run `builder generate`, printing text as it arrives."""
    from builder.client import stream_text

    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    for chunk in stream_text(args.url, args.prompt, max_tokens=args.max_tokens, stream=args.stream,
                             model=args.model_name, exclude_input_in_output=args.exclude_input, **sampling):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    """Run `builder tiny`."""
    from builder.checkpoint.tiny import make_tiny_model

    path = make_tiny_model(args.output, args.model)
    print(f"wrote {args.model} checkpoint -> {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run `builder bench`."""
    from builder.bench import run_cli

    return run_cli(args)


COMMANDS = {"build": cmd_build, "serve": cmd_serve, "generate": cmd_generate, "tiny": cmd_tiny, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 2."""
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BuilderError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug or os.environ.get("BUILDER_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
