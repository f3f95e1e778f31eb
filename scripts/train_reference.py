#!/usr/bin/env python3
"""Train the small Llama reference model (builder/checkpoint/data/reference/) from a corpus made by make_corpus.py.

1. A byte-level BPE tokenizer (Llama-3 style: <|begin_of_text|> prepended, <|end_of_text|> closes a document),
   vocabulary VOCAB_SIZE, trained with `tokenizers` on train.txt.
2. A LlamaForCausalLM of SHAPES, initialised from --seed, trained on random SEQ_LEN windows of the tokenized
   training documents (each "<bos> text <eos>", concatenated) with AdamW and a linear-warmup cosine schedule,
   bf16 autocast on CUDA (fp32 on CPU), deterministic algorithms and eager attention.
3. Saved as an HF folder in --dtype (bf16 by default): config.json, model.safetensors, generation_config.json,
   tokenizer files, heldout.txt (the corpus' held-out documents) and train_log.json (loss curve, held-out
   loss/perplexity of the saved weights, the command, versions, device).

    python scripts/train_reference.py --corpus CORPUS_DIR --out OUT_DIR [--steps 4000] [--device cuda]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from builder.checkpoint.reference import (DOC_SEPARATOR, TEST_MAX_TOKENS,  # noqa: E402
                                          heldout_perplexity)

VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SEQ_LEN = 256
# bf16 size: (2048*256 tied embedding + 3 * (196608 attention + 393216 MLP) + norms) * 2 bytes ~= 4.6 MB.
# Every linear's input width (256, 512) is a multiple of 128, the default int4 AWQ group size.
SHAPES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02)


def read_documents(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").rstrip("\n").split(DOC_SEPARATOR) if d.strip()]


def train_tokenizer(documents: list[str]):
    """Deterministic byte-level BPE: VOCAB_SIZE - 2 learned tokens, then BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator((line for doc in documents for line in doc.split("\n") if line.strip()),
                            trainer=trainer)
    tok.add_special_tokens([BOS, EOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=SHAPES["max_position_embeddings"])


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one int64 tensor: <bos> doc <eos> <bos> doc <eos> ..."""
    ids: list[int] = []
    for enc in tokenizer(documents, add_special_tokens=True)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         architectures=["LlamaForCausalLM"], attn_implementation="eager", **SHAPES)
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def stream_loss(model, stream: torch.Tensor, device: str, seq_len: int, max_windows: int | None = None,
                batch: int = 64) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of a token stream."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for start in range(0, n, batch):
        idx = torch.arange(start, min(n, start + batch)) * seq_len
        x = torch.stack([stream[i:i + seq_len] for i in idx]).to(device)
        y = torch.stack([stream[i + 1:i + seq_len + 1] for i in idx]).to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train()
    return total / max(1, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="folder with train.txt and heldout.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--min-lr-ratio", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget for training: after 100 steps, shorten the run to fit it")
    args = parser.parse_args(argv)
    command = "python scripts/train_reference.py " + " ".join(argv if argv is not None else sys.argv[1:])

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.time()
    train_docs = read_documents(args.corpus / "train.txt")
    held_docs = read_documents(args.corpus / "heldout.txt")
    tokenizer = train_tokenizer(train_docs)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # documents longer than model_max_length are fine here: we cut windows
    train_stream = token_stream(tokenizer, train_docs)
    held_stream = token_stream(tokenizer, held_docs)
    train_bytes = (args.corpus / "train.txt").stat().st_size
    log(f"tokenizer {time.time() - t0:.1f}s: train {len(train_stream)} tokens "
        f"({train_bytes / len(train_stream):.2f} bytes/token), held-out {len(held_stream)} tokens")

    model = build_model(tokenizer, args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=args.device.startswith("cuda"))
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_windows = len(train_stream) - SEQ_LEN - 1
    curve, evals = [], []
    running, running_n = torch.zeros((), device=args.device), 0  # summed on the device: no sync per step
    model.train()
    t_train = time.time()
    total_steps, step = args.steps, 0
    while step < total_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr, args.warmup, args.min_lr_ratio)
        starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
        offsets = starts[:, None] + torch.arange(SEQ_LEN + 1)[None, :]
        batch = train_stream[offsets].to(args.device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.detach()
        running_n += 1
        step += 1
        if step == 100 and args.max_minutes is not None:
            # Fit the run into --max-minutes by shortening it now, so the cosine schedule still ends annealed.
            per_step = (time.time() - t_train) / step
            fit = int(0.9 * 60 * args.max_minutes / per_step)
            log(f"{per_step * 1000:.1f} ms/step")
            if fit < total_steps:
                log(f"--max-minutes {args.max_minutes}: {total_steps} steps do not fit, training {fit}")
                total_steps = max(fit, args.warmup + 1)
        if step % args.eval_every == 0 or step == total_steps:
            train_loss = running.item() / max(1, running_n)
            held = stream_loss(model, held_stream, args.device, SEQ_LEN)
            entry = {"step": step, "train_loss": round(train_loss, 4), "heldout_loss": round(held, 4),
                     "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t_train, 1)}
            evals.append(entry)
            log(json.dumps(entry))
            running, running_n = torch.zeros((), device=args.device), 0
        if step % 50 == 0:
            curve.append(round(loss.item(), 4))
    steps_done = step
    train_seconds = time.time() - t_train

    # Save in the target dtype, then measure the saved weights exactly as the test does (fp32 compute on CPU).
    args.out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").to(getattr(torch, args.dtype)).eval()
    model.config.dtype = args.dtype
    model.config._attn_implementation = "sdpa"
    model.generation_config.do_sample = False
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    shutil.copyfile(args.corpus / "heldout.txt", args.out / "heldout.txt")
    saved = model.float()
    full_loss = stream_loss(saved, held_stream, "cpu", SEQ_LEN)
    final_train = stream_loss(saved, train_stream, "cpu", SEQ_LEN, max_windows=len(held_stream) // SEQ_LEN)
    test_ppl = heldout_perplexity(saved, tokenizer, "\n\n".join(held_docs), max_tokens=TEST_MAX_TOKENS)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    info = {
        "command": command,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__, "python": platform.python_version(),
        "seed": args.seed, "steps": steps_done, "steps_asked": args.steps, "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": steps_done * args.batch_size * SEQ_LEN, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "saved_dtype": args.dtype, "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "corpus": {"train_bytes": train_bytes, "train_tokens": len(train_stream), "heldout_tokens": len(held_stream),
                   "train_sha256": digest(args.corpus / "train.txt"),
                   "heldout_sha256": digest(args.corpus / "heldout.txt")},
        "final": {"train_loss": round(final_train, 4), "heldout_loss": round(full_loss, 4),
                  "heldout_perplexity": round(math.exp(full_loss), 3),
                  "test_slice_perplexity": round(test_ppl, 3), "test_slice_tokens": TEST_MAX_TOKENS,
                  "note": "saved weights, fp32 compute on CPU; train_loss over as many train windows as held-out"},
        "evals": evals, "train_loss_every_50_steps": curve,
    }
    (args.out / "train_log.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log(json.dumps(info["final"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
