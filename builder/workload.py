"""Benchmark workloads: request lengths and prompts, generated deterministically from a seed.

A workload is a list of `BenchRequest`s (input length, output length, and a prompt as token ids or as text).
The same spec and seed give the same requests in every tool (`builder bench` against a server,
`scripts/bench_engine.py` against the engine or HF transformers), and the first k requests of a list of n are the
list of k (sweep points with different request counts share a prefix).

Kinds:
- fixed: every request has input_len prompt tokens and output_len output tokens;
- mixed: per request, in order, input_len = rng.randint(*input_range) then output_len = rng.randint(*output_range)
  with rng = random.Random(seed) (defaults: prompts 32-1024 tokens, outputs 16-512);
- file: prompts from a file (one per line, or JSON lines with "text_input"/"prompt"/"text" and optional
  "max_tokens"/"output_len"); input lengths come from the tokenizer.

Input length means the tokens the engine prefills: for text prompts, `tokenizer.encode(text,
add_special_tokens=True)` as the repository's preprocessing model encodes them (BOS included). Text prompts of an
exact length are words that are single tokens in the tokenizer, joined by spaces, adjusted until the encoded
length matches (each is verified). Token prompts (offline) are uniform random ids outside the special ids. Prompt
contents come from random.Random(seed + CONTENT_SEED_OFFSET), so the lengths stay those of random.Random(seed).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import ConfigError

KINDS = ("fixed", "mixed", "file")
MIXED_INPUT_RANGE = (32, 1024)
MIXED_OUTPUT_RANGE = (16, 512)
CONTENT_SEED_OFFSET = 1_000_003
MAX_ADJUST_STEPS = 64
WORD = re.compile(r"[A-Za-z]{1,20}")


@dataclass(frozen=True)
class WorkloadSpec:
    """What requests to make; see the module docstring for the kinds."""

    kind: str = "fixed"
    input_len: int = 128
    output_len: int = 128
    input_range: tuple[int, int] = MIXED_INPUT_RANGE
    output_range: tuple[int, int] = MIXED_OUTPUT_RANGE
    seed: int = 0
    prompts_file: Path | None = None

    def validate(self) -> None:
        """ConfigError for impossible specs."""
        if self.kind not in KINDS:
            raise ConfigError(f"workload {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.kind == "fixed" and (self.input_len < 1 or self.output_len < 1):
            raise ConfigError(f"input and output lengths must be >= 1, got {self.input_len}/{self.output_len}")
        if self.kind == "mixed":
            for name, (lo, hi) in (("input", self.input_range), ("output", self.output_range)):
                if not 1 <= lo <= hi:
                    raise ConfigError(f"mixed {name} range must satisfy 1 <= low <= high, got {lo}-{hi}")
        if self.kind == "file" and (self.prompts_file is None or not Path(self.prompts_file).is_file()):
            raise ConfigError(f"the file workload needs an existing prompts file, got {self.prompts_file}")

    @property
    def max_input_len(self) -> int:
        """Longest prompt this spec can draw (0 for files: known only after tokenizing)."""
        return {"fixed": self.input_len, "mixed": self.input_range[1]}.get(self.kind, 0)

    @property
    def max_output_len(self) -> int:
        """Longest output this spec can draw (output_len for files without per-row lengths)."""
        return self.output_range[1] if self.kind == "mixed" else self.output_len

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (for benchmark metadata)."""
        data = asdict(self)
        data["prompts_file"] = str(self.prompts_file) if self.prompts_file else None
        if self.kind != "mixed":
            del data["input_range"], data["output_range"]
        else:
            del data["input_len"], data["output_len"]
        return data


@dataclass
class BenchRequest:
    """One request of a workload."""

    index: int
    input_len: int
    output_len: int
    prompt_ids: list[int] | None = None
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def draw_lengths(spec: WorkloadSpec, n: int) -> list[tuple[int, int]]:
    """(input_len, output_len) of the first n requests of a fixed or mixed spec."""
    spec.validate()
    if spec.kind == "fixed":
        return [(spec.input_len, spec.output_len)] * n
    if spec.kind != "mixed":
        raise ConfigError("draw_lengths() is for fixed and mixed workloads; files carry their own lengths")
    rng = random.Random(spec.seed)
    lengths = []
    for _ in range(n):
        input_len = rng.randint(*spec.input_range)
        lengths.append((input_len, rng.randint(*spec.output_range)))
    return lengths


def token_prompts(spec: WorkloadSpec, n: int, vocab_size: int, exclude_ids: Sequence[int] = (),
                  tokenizer: Any = None) -> list[BenchRequest]:
    """n requests whose prompts are token ids (offline engine / HF runs).

    fixed/mixed: uniform random ids in [0, vocab_size) minus exclude_ids (special tokens), exactly input_len long.
    file: the file's prompts encoded with `tokenizer` (required) as the server's preprocessing would.
    """
    if spec.kind == "file":
        if tokenizer is None:
            raise ConfigError("the file workload needs a tokenizer to turn prompts into token ids")
        requests = text_prompts(spec, n, tokenizer)
        for r in requests:
            r.prompt_ids = list(tokenizer.encode(r.text, add_special_tokens=True))
        return requests
    excluded = set(int(t) for t in exclude_ids)
    allowed = [t for t in range(vocab_size) if t not in excluded]
    if not allowed:
        raise ConfigError(f"no token ids left to draw prompts from (vocab_size {vocab_size})")
    rng = random.Random(spec.seed + CONTENT_SEED_OFFSET)
    return [BenchRequest(i, inp, out, prompt_ids=[rng.choice(allowed) for _ in range(inp)])
            for i, (inp, out) in enumerate(draw_lengths(spec, n))]


def text_prompts(spec: WorkloadSpec, n: int, tokenizer: Any) -> list[BenchRequest]:
    """n requests with text prompts that encode (add_special_tokens=True) to exactly input_len tokens."""
    spec.validate()
    if spec.kind == "file":
        return _file_prompts(spec, n, tokenizer)
    pool = word_pool(tokenizer)
    rng = random.Random(spec.seed + CONTENT_SEED_OFFSET)
    return [BenchRequest(i, inp, out, text=exact_length_text(tokenizer, inp, rng, pool))
            for i, (inp, out) in enumerate(draw_lengths(spec, n))]


_POOLS: dict[int, list[str]] = {}


def word_pool(tokenizer: Any) -> list[str]:
    """Alphabetic words w such that " w" is a single token (sorted; cached per tokenizer object)."""
    key = id(tokenizer)
    if key not in _POOLS:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        words = sorted({p.strip() for p in pieces if WORD.fullmatch(p.strip())})
        encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"] if words else []
        pool = [w for w, ids in zip(words, encoded) if len(ids) == 1]
        if not pool:  # a tokenizer without single-token words: any word still works, the loop adjusts
            pool = words or ["a"]
        _POOLS[key] = pool
    return _POOLS[key]


def special_token_count(tokenizer: Any) -> int:
    """Tokens encode(..., add_special_tokens=True) adds around a text (BOS for Llama/Mistral, none for Qwen2)."""
    return len(tokenizer.encode("a", add_special_tokens=True)) - len(tokenizer.encode("a", add_special_tokens=False))


def exact_length_text(tokenizer: Any, target: int, rng: random.Random, pool: Sequence[str]) -> str:
    """A space-joined text of pool words encoding to exactly `target` tokens (special tokens included)."""
    need = target - special_token_count(tokenizer)
    if need < 1:
        raise ConfigError(f"input length {target} leaves no room for text after the tokenizer's special tokens")
    words = [rng.choice(pool) for _ in range(need)]
    for step in range(MAX_ADJUST_STEPS):
        text = " ".join(words)
        diff = target - len(tokenizer.encode(text, add_special_tokens=True))
        if diff == 0:
            return text
        if diff > 0:
            words += [rng.choice(pool) for _ in range(diff)]
        else:
            del words[max(1, len(words) + diff):]
        if step >= 8:  # oscillating around the target: change the last word
            words[-1] = rng.choice(pool)
    raise ConfigError(f"could not make a prompt of exactly {target} tokens with this tokenizer; use --workload file")


def _file_prompts(spec: WorkloadSpec, n: int, tokenizer: Any) -> list[BenchRequest]:
    """The first n prompts of the file (cycled when it has fewer), lengths from the tokenizer."""
    rows = read_prompts_file(Path(spec.prompts_file))
    requests = []
    for i in range(n):
        text, output_len = rows[i % len(rows)]
        input_len = len(tokenizer.encode(text, add_special_tokens=True)) if tokenizer is not None else 0
        requests.append(BenchRequest(i, input_len, output_len or spec.output_len, text=text))
    return requests


def read_prompts_file(path: Path) -> list[tuple[str, int | None]]:
    """(text, output_len or None) per non-empty line: plain text, or a JSON object per line."""
    rows: list[tuple[str, int | None]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: invalid JSON ({exc})") from exc
            text = next((row[k] for k in ("text_input", "prompt", "text") if k in row), None)
            if not isinstance(text, str) or not text:
                raise ConfigError(f"{path}:{number}: needs a non-empty \"text_input\", \"prompt\" or \"text\"")
            out = row.get("max_tokens", row.get("output_len"))
            rows.append((text, int(out) if out is not None else None))
        else:
            rows.append((line, None))
    if not rows:
        raise ConfigError(f"{path} holds no prompts")
    return rows
