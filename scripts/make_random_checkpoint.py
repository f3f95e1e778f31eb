"""Write a Hugging Face checkpoint folder with random weights in a named real shape, and a matching tokenizer.

Usage:
    python scripts/make_random_checkpoint.py --shape llama3-8b --out /data/random-llama3-8b
        [--dtype bfloat16] [--seed 0] [--device cpu|cuda] [--force]
    builder build --model /data/random-llama3-8b --output REPO --dtype bfloat16 --device cuda
    builder serve REPO &
    builder bench --url localhost:8001 --repo REPO --concurrency 1,16,64 --input-len 1024 --output-len 128

Shapes: llama3-8b (Llama-3-8B: vocab 128256, hidden 4096, 32 layers, GQA 32/8 heads of 128, MLP 14336), qwen3-8b
(Qwen3-8B: vocab 151936, hidden 4096, 36 layers, GQA 32/8 heads of 128, MLP 12288, q/k norms) and tiny (the shape
of builder's tiny-llama). The tensor names and shapes come from the architecture's weight table
(builder.models.<family>). Weights are N(0, 0.02) (embeddings, every linear and an untied lm_head) and ones (RMS
norms, q/k norms too), drawn tensor by tensor from one seeded torch.Generator on --device and streamed into
safetensors shards of at most 5 GB plus model.safetensors.index.json; peak host memory is about one tensor
(1 GB for Llama-3-8B's embedding in bfloat16). config.json is the transformers config class of the model type.

The tokenizer is builder's tiny-llama byte-level BPE tokenizer (BOS <|begin_of_text|>, EOS <|end_of_text|>)
padded with non-special added tokens "<|filler_ID|>" up to the model's vocab size, so every id the random model
can emit decodes to text and text prompts of an exact token length can be made (builder/workload.py).

Everything is written to a temporary folder next to --out, renamed to --out at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from builder.checkpoint.safetensors_io import write_streaming  # noqa: E402
from builder.checkpoint.trtllm import model_config_from_hf  # noqa: E402
from builder.models import arch_spec  # noqa: E402
from plugins.formats import TORCH_DTYPES  # noqa: E402

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=12288, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, max_position_embeddings=512, rope_theta=10000.0,
                 rms_norm_eps=1e-5),
}
STD = 0.02
MAX_SHARD_BYTES = 5 * 10**9  # "5GB" as transformers' save_pretrained counts it
CHUNK_ELEMENTS = 2**26  # random numbers drawn per step (256 MB of float32)
INDEX_FILE = "model.safetensors.index.json"
FILLER = "<|filler_{}|>"
PROG = "make_random_checkpoint"


class UsageError(Exception):
    """A problem with the command line or the --out folder (exit status 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="named model shape")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES), help="weights dtype")
    p.add_argument("--seed", type=int, default=0, help="torch.Generator seed")
    p.add_argument("--device", default=None,
                   help="where random numbers are drawn: cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--num-layers", type=int, default=None,
                   help="for quick checks only: override the shape's number of layers (not a real model then)")
    return p.parse_args(argv)


def model_shape(name: str, num_layers: int | None) -> dict:
    """The named shape, with the layer count overridden when asked."""
    shape = dict(SHAPES[name])
    if num_layers is not None:
        if num_layers < 1:
            raise UsageError(f"--num-layers must be >= 1, got {num_layers}")
        shape["num_hidden_layers"] = num_layers
    return shape


def weight_plan(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, shape) of every weight of the shape's architecture, in the order of its family's weight table
    (builder.models.<family>)."""
    cfg = model_config_from_hf({**shape, "tie_word_embeddings": False}, "float32")
    plan: dict[str, tuple[int, ...]] = {}
    for row in arch_spec(cfg.architecture).weights(cfg):
        plan.update(zip(row.hf, row.hf_shapes))
    return list(plan.items())


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def plan_shards(plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                max_bytes: int = MAX_SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the plan, in order, into shards of at most max_bytes (a bigger single tensor gets its own shard)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator) -> torch.Tensor:
    """A CPU tensor of N(0, STD) values drawn on `device` in chunks of rows (bounded temporary memory)."""
    out = torch.empty(shape, dtype=dtype)
    rows = shape[0]
    row_elems = torch.Size(shape[1:]).numel()
    step = max(1, CHUNK_ELEMENTS // max(1, row_elems))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = torch.randn((stop - start,) + tuple(shape[1:]), generator=generator, device=device,
                            dtype=torch.float32)
        out[start:stop] = chunk.mul_(STD).to(dtype).cpu()
    return out


def make_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> torch.Tensor:
    """Ones for RMS norm weights, N(0, STD) for everything else."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return random_tensor(shape, dtype, device, generator)


def write_weights(dest: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: torch.device,
                  seed: int) -> int:
    """Write the safetensors shards and the index into dest, shard by shard, with progress; return total bytes."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    shards = plan_shards(plan, dtype)
    total = sum(nbytes(shape, dtype) for _, shape in plan)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("random weights", total=total)
        for k, shard in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            progress.update(task, description=file)

            def tensors(shard=shard):
                """Yield the shard's tensors one at a time, advancing the progress bar."""
                for name, shape in shard:
                    tensor = make_weight(name, shape, dtype, device, generator)
                    yield name, tensor
                    progress.advance(task, nbytes(shape, dtype))

            started = time.monotonic()
            write_streaming(dest / file, [(name, dtype, shape) for name, shape in shard], tensors())
            size = sum(nbytes(shape, dtype) for _, shape in shard)
            print(f"{file}: {len(shard)} tensors, {size / 1e9:.2f} GB in {time.monotonic() - started:.1f} s",
                  flush=True)
            weight_map.update({name: file for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def build_padded_tokenizer(vocab_size: int, max_length: int):
    """builder's tiny-llama tokenizer padded with non-special filler tokens to exactly vocab_size ids."""
    from tokenizers import AddedToken

    from builder.checkpoint.tiny import build_tokenizer, tiny_spec

    tokenizer = build_tokenizer(tiny_spec("LlamaForCausalLM"))
    base = len(tokenizer)
    if base > vocab_size:
        raise UsageError(f"the tiny-llama tokenizer has {base} tokens, more than the model's vocab_size "
                         f"{vocab_size}; pick a shape with a larger vocabulary")
    if base < vocab_size:
        tokenizer.add_tokens([AddedToken(FILLER.format(i), special=False, normalized=False)
                              for i in range(base, vocab_size)])
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    tokenizer.model_max_length = max_length
    return tokenizer


def save_tokenizer(tokenizer, dest: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in dest."""
    tokenizer.save_pretrained(dest)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    (dest / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_config(dest: Path, shape: dict, dtype_name: str, tokenizer) -> None:
    """config.json (the transformers config class of the shape's model_type) and generation_config.json in dest."""
    from transformers import AutoConfig, GenerationConfig

    fields = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **fields, tie_word_embeddings=False, dtype=dtype_name,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=STD)
    config.save_pretrained(dest)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(dest)


def check_out(out: Path, force: bool) -> None:
    """UsageError unless --out is absent, an empty folder, or replaceable with --force."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder; choose another path")
        if any(out.iterdir()) and not force:
            raise UsageError(f"--out {out} exists and is not empty; pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"the parent folder of --out, {out.parent}, does not exist")


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_device(name: str | None) -> torch.device:
    """--device, defaulting to cuda when available; UsageError for an unusable device."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    return device


def make_checkpoint(args: argparse.Namespace) -> Path:
    """Write the checkpoint into a temp folder next to --out, then rename it to --out; return --out."""
    out = args.out.absolute()
    check_out(out, args.force)
    shape = model_shape(args.shape, args.num_layers)
    device = resolve_device(args.device)
    dtype = TORCH_DTYPES[args.dtype]
    started = time.monotonic()
    tokenizer = build_padded_tokenizer(shape["vocab_size"], shape["max_position_embeddings"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; give --out the usual permissions
        save_tokenizer(tokenizer, tmp)
        write_config(tmp, shape, args.dtype, tokenizer)
        total = write_weights(tmp, weight_plan(shape), dtype, device, args.seed)
        check_out(out, args.force)  # again: another process may have written it meanwhile
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{out}: {args.shape} ({shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}), "
          f"{total / 1e9:.2f} GB of {args.dtype} weights drawn on {device}, {time.monotonic() - started:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 on a usage error (one line on stderr)."""
    args = parse_args(argv)
    try:
        make_checkpoint(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
