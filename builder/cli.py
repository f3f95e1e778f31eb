"""The `builder` command line: build, serve, generate, tiny. Each subcommand calls one function."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from builder.config import DTYPES, BuildSettings
from builder.errors import BuilderError


def _add_build(sub: argparse._SubParsersAction) -> None:
    """Options of `builder build`."""
    p = sub.add_parser("build", help="HF checkpoint -> engine -> Triton model repository")
    p.add_argument("--model", default="tiny-llama",
                   help="HF checkpoint folder, or a built-in model: tiny-llama (default), tiny-mistral, tiny-qwen2")
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
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


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
    p = sub.add_parser("tiny", help="write a built-in tiny HF checkpoint folder (for tests and demos)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--architecture", default="LlamaForCausalLM",
                   choices=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="builder", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_build, _add_serve, _add_generate, _add_tiny):
        add(sub)
    return parser.parse_args(argv)


def cmd_build(args: argparse.Namespace) -> int:
    """Run `builder build`."""
    from builder.build import BuildOptions, build

    settings = BuildSettings(dtype=args.dtype, max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                             max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                             tokens_per_block=args.tokens_per_block, kv_cache_memory_mb=args.kv_cache_memory_mb,
                             kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction, device=args.device)
    config = build(BuildOptions(output=args.output, model=args.model, force=args.force, settings=settings,
                                tp_size=args.tp))
    print(f"built {config.model.architecture} ({config.build.dtype}, max_seq_len {config.build.max_seq_len}) "
          f"-> {args.output}")
    print(f"serve it with: builder serve {args.output}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run `builder serve` until Ctrl-C."""
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

    path = make_tiny_model(args.output, architecture=args.architecture)
    print(f"wrote {args.architecture} checkpoint -> {path}")
    return 0


COMMANDS = {"build": cmd_build, "serve": cmd_serve, "generate": cmd_generate, "tiny": cmd_tiny}


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
