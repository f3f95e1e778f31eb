"""TensorRT-LLM targets after the repository is written: the trtllm-build command, the launch lines, and running them.

`builder build --backend tensorrtllm` leaves a TensorRT-LLM checkpoint in REPO/tensorrt_llm/1/checkpoint and two
scripts at the repository root (plain files there are not models; checked with tritonserver 2.51):
  build_engine.sh   trtllm-build --checkpoint_dir tensorrt_llm/1/checkpoint --output_dir tensorrt_llm/1/engine ...
  launch_triton.sh  tritonserver on REPO (world size 1) or `mpirun` with one tritonserver per rank (world size > 1)
`--backend trtllm-pytorch` needs no engine build and gets launch_triton.sh only. The flags come from the checkpoint's
config.json and build_config.json (trtllm-checkpoint.md section 4, TensorRT-LLM 1.2.x names); quantization (weight-
only, AWQ, FP8, KV cache) is read by trtllm-build from the checkpoint itself and needs no flag.

Exit codes of `builder build` for these targets (docs/deploy-tensorrt-llm.md):
  0  repository written and validated; the engine was built (trtllm-build on PATH) or the one printed line says
     what to run where TensorRT-LLM 1.2.x is installed
  3  trtllm-build ran and failed (the repository is kept; the line names its log)
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from builder.config import EngineConfig

# The last TensorRT-LLM release line that ships trtllm-build and the C++ `tensorrtllm` Triton backend
# (trtllm-checkpoint.md section 0); engines must be built and served by the same version.
TRTLLM_SERIES = "1.2"
TRTLLM_PIN = f"TensorRT-LLM {TRTLLM_SERIES}.x"
# NGC's Triton + TensorRT-LLM container. Known: 25.12 ships TensorRT-LLM 1.1.0 (Triton's compatibility matrix), which
# has trtllm-build too; which later tag ships 1.2.x is not confirmed here: pick the tag whose release notes list it.
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3"

ENGINE_MODEL = "tensorrt_llm"
CHECKPOINT_SUBDIR = "1/checkpoint"   # relative to REPO/tensorrt_llm: the TensorRT-LLM (or HF) checkpoint
ENGINE_SUBDIR = "1/engine"           # relative to REPO/tensorrt_llm: what build_engine.sh writes (gpt_model_path)
BUILD_SCRIPT = "build_engine.sh"
LAUNCH_SCRIPT = "launch_triton.sh"
BUILD_LOG = "build_engine.log"
EXIT_ENGINE_BUILD_FAILED = 3


def paged_context_fmha(engine_config: EngineConfig) -> bool:
    """Paged context FMHA (needed by chunked context and KV reuse); TensorRT-LLM turns it off with an INT8 KV cache."""
    return engine_config.model.quantization.kv_cache_quant_algo != "INT8"


def trtllm_build_args(engine_config: EngineConfig, checkpoint_dir: str = "$CHECKPOINT_DIR",
                      output_dir: str = "$ENGINE_DIR") -> list[str]:
    """The trtllm-build command line (TensorRT-LLM 1.2.x flag names) for a checkpoint written by `builder build`.

    Tensor parallelism and every quantization setting come from the checkpoint's config.json (trtllm-build has no
    flag for them). Tokens starting with "$" are shell variables, expanded by build_engine.sh.
    """
    build = engine_config.build
    world_size = engine_config.model.mapping.world_size
    args = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", output_dir,
        "--gpt_attention_plugin", "auto",      # fused attention with the KV cache (the model dtype)
        "--gemm_plugin", "auto",               # cuBLASLt GEMMs for the unquantized linears (lm_head)
        "--kv_cache_type", "paged",            # the in-flight batcher's paged KV cache
        "--remove_input_padding", "enable",    # packed tokens: the in-flight batcher requires it
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable" if paged_context_fmha(engine_config) else "disable",
        "--tokens_per_block", str(build.tokens_per_block),
        "--max_batch_size", str(build.max_batch_size),
        "--max_input_len", str(build.max_input_len),
        "--max_seq_len", str(build.max_seq_len),
        "--max_num_tokens", str(build.max_num_tokens),
        "--max_beam_width", "1",
    ]
    if world_size > 1:
        args += ["--workers", str(world_size)]  # one rank per visible GPU at a time (capped by trtllm-build)
    return args


def tritonserver_args(rank: int, world_size: int, engine_model: str = ENGINE_MODEL) -> list[str]:
    """One rank's tritonserver command line (TensorRT-LLM's launch convention, triton-contract.md section 0).

    Every rank: --disable-auto-complete-config and its own python shared-memory prefix. Rank 0 loads the whole
    repository and serves the endpoints; ranks > 0 load only the engine model (explicit model control) and open
    no endpoint: in the C++ backend's leader mode they only run their part of the engine.
    """
    args = ["tritonserver", "--model-repository=$REPO", "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
    if rank == 0:
        args += ["--grpc-port=$GRPC_PORT", "--http-port=$HTTP_PORT", "--metrics-port=$METRICS_PORT"]
    else:
        args += ["--model-control-mode=explicit", f"--load-model={engine_model}", "--allow-http=false",
                 "--allow-grpc=false", "--allow-metrics=false"]
    return args


def launch_args(world_size: int, engine_model: str = ENGINE_MODEL) -> list[str]:
    """The whole launch command: tritonserver (world size 1) or mpirun with one tritonserver per rank."""
    if world_size <= 1:
        return tritonserver_args(0, 1, engine_model)
    args = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        if rank:
            args.append(":")
        args += ["-n", "1", *tritonserver_args(rank, world_size, engine_model)]
    return args


def shell_words(args: list[str]) -> str:
    """A command line for a bash script: "$VAR" tokens (alone or after `=`) stay expandable, the rest is quoted."""
    words = []
    for arg in args:
        head, sep, tail = arg.partition("=")
        if arg.startswith("$"):
            words.append(f'"{arg}"')
        elif sep and tail.startswith("$") and " " not in head:
            words.append(f'{shlex.quote(head + sep)}"{tail}"')
        else:
            words.append(shlex.quote(arg))
    return " ".join(words)


def script_lines(args: list[str], indent: str = "    ") -> str:
    """args as one shell command continued over lines: a new line before every `--flag` (trtllm-build) or, for
    mpirun, before every rank's `-n 1 tritonserver ...` (the ranks are separated by `:`)."""
    if args and args[0] == "mpirun":
        breaks = [i for i, word in enumerate(args) if word == "-n" and (i == 0 or args[i - 1] != ":") or word == ":"]
    else:
        breaks = [i for i, word in enumerate(args) if i and word.startswith("--")]
    bounds = [0, *breaks, len(args)]
    parts = [args[a:b] for a, b in zip(bounds, bounds[1:]) if args[a:b]]
    return (" \\\n" + indent).join(shell_words(part) for part in parts)


@dataclass(frozen=True)
class FinishResult:
    """What `builder build` reports after writing a TensorRT-LLM target: its exit code and one line."""

    exit_code: int
    line: str


def finish(repo: Path, backend: str, which=shutil.which, run=subprocess.run) -> FinishResult:
    """After the repository is in place: build the engine if trtllm-build is on PATH, else say where to build it."""
    repo = Path(repo)
    launch = repo / LAUNCH_SCRIPT
    if backend == "trtllm-pytorch":
        return FinishResult(0, f"TensorRT-LLM PyTorch repository ready (no engine build); run `{launch}` where "
                               f"{TRTLLM_PIN} is installed (see docs/deploy-tensorrt-llm.md)")
    script = repo / BUILD_SCRIPT
    if which("trtllm-build") is None:
        return FinishResult(0, f"engine not built (no trtllm-build on PATH): run `{script}` then `{launch}` where "
                               f"{TRTLLM_PIN} is installed (e.g. {TRITON_IMAGE})")
    log = repo / BUILD_LOG
    with open(log, "wb") as out:
        done = run(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    if done.returncode != 0:
        return FinishResult(EXIT_ENGINE_BUILD_FAILED, f"trtllm-build failed (exit {done.returncode}, log {log}); "
                                                      f"fix the cause and rerun `{script}`")
    return FinishResult(0, f"engine built in {repo / ENGINE_MODEL / ENGINE_SUBDIR}; serve it with `{launch}`")
