"""The committed trained reference model: a small Llama trained on local documentation (scripts/train_reference.py).

Random-weight tiny models cannot show quantization error honestly; this one is genuinely trained (its held-out
perplexity is in data/reference/train_log.json), so quantized-vs-reference comparisons mean something.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
DOC_SEPARATOR = "\n\f\n"  # between documents in make_corpus.py's train.txt / heldout.txt
EVAL_SEQ_LEN = 256  # the training sequence length
TEST_MAX_TOKENS = 2048  # the held-out slice the tests score (8 windows of EVAL_SEQ_LEN)


def reference_model_dir() -> Path:
    """The HF folder of the committed reference model (config.json, model.safetensors, tokenizer files)."""
    if not (REFERENCE_DIR / "config.json").is_file():
        raise FileNotFoundError(f"reference model missing at {REFERENCE_DIR}; see scripts/train_reference.py")
    return REFERENCE_DIR


def heldout_documents() -> list[str]:
    """The held-out documents (none of them in the training text)."""
    text = (REFERENCE_DIR / "heldout.txt").read_text(encoding="utf-8").rstrip("\n")
    return [d for d in text.split(DOC_SEPARATOR) if d.strip()]


def heldout_text() -> str:
    """The held-out evaluation text: the held-out documents joined by blank lines."""
    return "\n\n".join(heldout_documents())


def train_log() -> dict:
    """The training record: command, versions, device, loss curve and final losses."""
    return json.loads((REFERENCE_DIR / "train_log.json").read_text(encoding="utf-8"))


def load_reference(dtype=None):
    """(model, tokenizer) of the reference model, offline; dtype defaults to float32 for CPU evaluation."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = reference_model_dir()
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def heldout_perplexity(model, tokenizer, text: str | None = None, max_tokens: int = TEST_MAX_TOKENS,
                       seq_len: int = EVAL_SEQ_LEN) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping seq_len windows of the first max_tokens tokens.

    The text (default: heldout_text()) is tokenized with the tokenizer's BOS; only full windows are scored.
    """
    import torch

    ids = tokenizer(heldout_text() if text is None else text, verbose=False)["input_ids"][:max_tokens + 1]
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"need at least {seq_len + 1} tokens, got {len(ids)}")
    ids_t = torch.tensor(ids[:n * seq_len + 1], dtype=torch.int64)
    x = torch.stack([ids_t[i * seq_len:(i + 1) * seq_len] for i in range(n)])
    y = torch.stack([ids_t[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n)])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x.to(device)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))
    model.train(was_training)
    return math.exp(loss.item())
