"""Accuracy of an engine against its unquantized reference: held-out perplexity and next-token KL divergence.

Both engines run through builder's own runtime (LLMEngine.score: teacher-forced logits for every position, the
same paged-KV forward pass that serves requests, so KV-cache quantization is included). The text is tokenized
with the model's tokenizer (BOS added as the tokenizer does) and cut into consecutive non-overlapping windows of
seq_len inputs; window i scores tokens i*seq_len+1 .. (i+1)*seq_len (the same windows as
builder.checkpoint.reference.heldout_perplexity). All statistics are computed in float64 from the engines'
float32 logits:

  perplexity      exp(mean negative log-likelihood of the next token)
  mean_kl         mean over positions of KL(P_ref || P_engine) in nats, P = softmax of the logits
  top1_agreement  share of positions where both engines' argmax agree

The reference engine is scored first and its logits kept (tokens x vocab float32: in memory up to 1 GiB, beyond
that in a temp file), then the engine under test is scored window group by window group, so only one engine is in
memory at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from builder.checkpoint.convert import convert_checkpoint
from builder.checkpoint.reference import REFERENCE_DIR, heldout_text
from builder.config import BuildSettings, EngineConfig, QuantConfig
from builder.errors import BuilderError, ConfigError
from builder.runtime.engine import LLMEngine
from builder.runtime.model_runner import kv_block_bytes

DEFAULT_SEQ_LEN = 256      # the reference model's training length
DEFAULT_BUILD_TOKENS = 8192  # tokens a build scores by default (--eval-tokens)
REPORT_FILE = "accuracy.json"  # written into the engine folder: <repo>/tensorrt_llm/1/engine/accuracy.json
LOGIT_ELEMENTS = 2**25     # float64 elements per comparison chunk (256 MiB)


class AccuracyGateError(BuilderError):
    """The built engine is less accurate than --max-ppl-increase allows."""


@dataclass
class AccuracyReport:
    """Accuracy of one engine against its unquantized reference on one text."""

    perplexity: float
    reference_perplexity: float
    ppl_increase_pct: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    windows: int = 0
    seq_len: int = 0
    text_source: str = ""
    quantization: dict = field(default_factory=dict)  # the engine's config.json `quantization`
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the build log."""
        algo = self.quantization.get("quant_algo") or "none"
        kv = self.quantization.get("kv_cache_quant_algo")
        what = algo + (f" + {kv} KV" if kv else "")
        return (f"accuracy ({what}): perplexity {self.perplexity:.4g} vs {self.reference_perplexity:.4g} "
                f"unquantized ({self.ppl_increase_pct:+.2f}%), mean KL {self.mean_kl:.4g} nats, top-1 agreement "
                f"{100 * self.top1_agreement:.1f}% over {self.tokens} tokens of {self.text_source or 'text'}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AccuracyReport":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class _Totals:
    """Running sums over scored positions."""

    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Fold one window's logits [T, V] (and the reference's) with targets [T] in, in float64."""
        if logits.shape != ref_logits.shape or logits.shape[0] != targets.shape[0]:
            raise ConfigError(f"logits {tuple(logits.shape)} and reference logits {tuple(ref_logits.shape)} do not "
                              "match; the engine and its reference must share the vocabulary")
        rows = max(1, LOGIT_ELEMENTS // max(1, logits.shape[-1]))
        for start in range(0, logits.shape[0], rows):
            lp = torch.log_softmax(logits[start:start + rows].double(), dim=-1)
            ref_lp = torch.log_softmax(ref_logits[start:start + rows].double(), dim=-1)
            t = targets[start:start + rows].long()[:, None]
            self.nll -= float(lp.gather(1, t).sum())
            self.ref_nll -= float(ref_lp.gather(1, t).sum())
            self.kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
            self.agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
            self.tokens += lp.shape[0]


def compare_logits(logits: Sequence[torch.Tensor], ref_logits: Sequence[torch.Tensor],
                   targets: Sequence[Sequence[int]]) -> dict[str, float]:
    """perplexity, reference_perplexity, mean_kl (KL(ref || engine)), top1_agreement and tokens of logit windows."""
    totals = _Totals()
    for lg, ref, tg in zip(logits, ref_logits, targets, strict=True):
        totals.add(lg, ref, torch.as_tensor(list(tg)))
    return _stats(totals)


def _stats(t: _Totals) -> dict[str, float]:
    if t.tokens == 0:
        raise ConfigError("no tokens were scored; give a longer evaluation text")
    return {"perplexity": math.exp(t.nll / t.tokens), "reference_perplexity": math.exp(t.ref_nll / t.tokens),
            "mean_kl": max(0.0, t.kl / t.tokens), "top1_agreement": t.agree / t.tokens, "tokens": t.tokens}


def tokenize(text: str, tokenizer_dir: str | Path) -> list[int]:
    """Token ids of text with the model's tokenizer (special tokens such as BOS added as the tokenizer does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return list(tokenizer(text, verbose=False)["input_ids"])


def token_windows(ids: Sequence[int], seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) of consecutive non-overlapping windows of seq_len tokens over ids[:max_tokens + 1].

    Only full windows are kept; targets are the inputs shifted by one token."""
    if seq_len < 1:
        raise ConfigError(f"evaluation seq_len must be >= 1, got {seq_len}")
    ids = list(ids) if max_tokens is None else list(ids[:max_tokens + 1])
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ConfigError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len} + 1; "
                          "give a longer text (--eval-data) or a smaller window")
    return [(ids[i * seq_len:(i + 1) * seq_len], ids[i * seq_len + 1:(i + 1) * seq_len + 1]) for i in range(n)]


def _open_engine(engine_dir: Path, device: str, seq_len: int):
    """An LLMEngine whose KV pool holds at least one window (score() waits for room otherwise)."""
    config = EngineConfig.load(engine_dir)
    if seq_len > config.build.max_seq_len:
        raise ConfigError(f"evaluation window {seq_len} exceeds the engine's max_seq_len "
                          f"({config.build.max_seq_len}); use a smaller window")
    blocks = -(-seq_len // config.build.tokens_per_block)
    need_mb = 1.01 * blocks * kv_block_bytes(config) / 2**20
    return LLMEngine(engine_dir, device=device, kv_cache_memory_mb=max(config.build.kv_cache_memory_mb, need_mb))


class _LogitStore:
    """The reference engine's float32 logits per window: in memory up to RAM_LIMIT bytes, else in a plain temp file
    (read and written with file I/O, not mmap, so the pages never count in this process's RSS)."""

    RAM_LIMIT = 2**30

    def __init__(self, num_windows: int, seq_len: int, vocab: int, spill_dir: str | Path | None = None) -> None:
        import tempfile

        self.shape = (seq_len, vocab)
        self.window_bytes = seq_len * vocab * 4
        self._memory: list[torch.Tensor | None] | None = None
        self._file = None
        if num_windows * self.window_bytes <= self.RAM_LIMIT:
            self._memory = [None] * num_windows
        else:
            self._file = tempfile.TemporaryFile(prefix="reference-logits-", dir=spill_dir)

    def __setitem__(self, index: int, logits: torch.Tensor) -> None:
        logits = logits.float().contiguous()
        if tuple(logits.shape) != self.shape:
            raise ConfigError(f"reference logits {tuple(logits.shape)}, expected {self.shape}")
        if self._memory is not None:
            self._memory[index] = logits
        else:
            self._file.seek(index * self.window_bytes)
            self._file.write(logits.numpy().tobytes())

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[index]
        import numpy as np

        self._file.seek(index * self.window_bytes)
        data = np.frombuffer(self._file.read(self.window_bytes), dtype=np.float32)
        return torch.from_numpy(data.copy()).view(*self.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _scored(engine, windows: list[tuple[list[int], list[int]]], seq_len: int):
    """(index, logits [seq_len, V]) per window, score() called on ~1 GiB of logits at a time."""
    group = max(1, (2**28 // max(1, engine.config.model.vocab_size)) // seq_len)
    for start in range(0, len(windows), group):
        part = windows[start:start + group]
        yield from enumerate(engine.score([inputs for inputs, _ in part]), start)


def evaluate(engine_dir: str | Path, reference_engine_dir: str | Path, text: str | Sequence[int],
             seq_len: int = DEFAULT_SEQ_LEN, max_tokens: int | None = None, *,
             tokenizer_dir: str | Path | None = None, device: str = "cpu", text_source: str = "",
             reference_cache: dict | None = None, spill_dir: str | Path | None = None) -> AccuracyReport:
    """Perplexity and KL(reference || engine) of engine_dir against reference_engine_dir on `text`.

    text: a string (tokenized with tokenizer_dir's tokenizer) or token ids. max_tokens: score at most this many
    tokens (None: every full window). reference_cache: a dict that keeps the reference logits between calls with
    the same reference engine and windows (scripts/eval_quant.py compares many engines to one reference).
    spill_dir: where reference logits larger than 1 GiB go (a temp file; default: the system temp folder)."""
    started = time.monotonic()
    if isinstance(text, str):
        if tokenizer_dir is None:
            raise ConfigError("evaluate() needs tokenizer_dir to tokenize text")
        ids = tokenize(text, tokenizer_dir)
    else:
        ids = [int(t) for t in text]
    windows = token_windows(ids, seq_len, max_tokens)
    engine_dir, reference_engine_dir = Path(engine_dir), Path(reference_engine_dir)
    key = (str(reference_engine_dir.resolve()), device, seq_len, tuple(ids[:len(windows) * seq_len + 1]))
    store = reference_cache.get(key) if reference_cache is not None else None
    try:
        if store is None:
            with _open_engine(reference_engine_dir, device, seq_len) as ref_engine:
                store = _LogitStore(len(windows), seq_len, ref_engine.config.model.vocab_size, spill_dir)
                for index, logits in _scored(ref_engine, windows, seq_len):
                    store[index] = logits
            if reference_cache is not None:
                reference_cache[key] = store
        totals = _Totals()
        with _open_engine(engine_dir, device, seq_len) as engine:
            quantization = asdict(engine.config.model.quantization)
            for index, logits in _scored(engine, windows, seq_len):
                totals.add(logits, store[index], torch.tensor(windows[index][1]))
    finally:
        if store is not None and reference_cache is None:
            store.close()
    stats = _stats(totals)
    increase = 100.0 * (stats["perplexity"] / stats["reference_perplexity"] - 1.0)
    return AccuracyReport(perplexity=stats["perplexity"], reference_perplexity=stats["reference_perplexity"],
                          ppl_increase_pct=increase, mean_kl=stats["mean_kl"], top1_agreement=stats["top1_agreement"],
                          tokens=int(stats["tokens"]), windows=len(windows), seq_len=seq_len, text_source=text_source,
                          quantization=quantization, seconds=round(time.monotonic() - started, 3))


def check_ppl_increase(report: AccuracyReport, max_pct: float | None) -> None:
    """AccuracyGateError (one line) when the perplexity increase exceeds max_pct percent; None disables the gate."""
    if max_pct is None:
        return
    if not report.ppl_increase_pct <= max_pct:  # NaN fails too
        raise AccuracyGateError(
            f"perplexity increased {report.ppl_increase_pct:.2f}% ({report.reference_perplexity:.4g} -> "
            f"{report.perplexity:.4g} on {report.tokens} tokens of {report.text_source or 'text'}), more than "
            f"--max-ppl-increase {max_pct:g}%; choose a milder --quant (int8_wo, fp8) or raise the limit")


def write_report(report: AccuracyReport, path: str | Path) -> Path:
    """Write the report as JSON to path (a file, or a folder to hold accuracy.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def read_report(path: str | Path) -> AccuracyReport | None:
    """The report at path (a file, an engine folder or a model repository); None when there is none.

    In a repository: tensorrt_llm/1/engine (portable backend) or tensorrt_llm/1/checkpoint (--backend tensorrtllm)."""
    path = Path(path)
    model = path / "tensorrt_llm" / "1"
    for candidate in (path, path / REPORT_FILE, model / "engine" / REPORT_FILE, model / "checkpoint" / REPORT_FILE):
        if candidate.is_file():
            return AccuracyReport.from_dict(json.loads(candidate.read_text()))
    return None


# ---- build integration (builder build --eval / --eval-data / --eval-tokens / --max-ppl-increase) -----------------

EVAL_MODES = ("auto", "on", "off")


@dataclass
class EvalOptions:
    """What `builder build` was asked to measure: --eval, --eval-data, --eval-tokens, --max-ppl-increase."""

    mode: str = "auto"                      # auto: when the engine is quantized (weights or KV) or gated; on; off
    max_ppl_increase: float | None = None   # percent; the build fails past it
    eval_data: Path | None = None           # UTF-8 text; default: the reference model's bundled held-out text
    max_tokens: int = DEFAULT_BUILD_TOKENS  # tokens scored (0: every full window of the text)
    seq_len: int = DEFAULT_SEQ_LEN          # window length (capped at the engine's max_seq_len)


def check_eval_options(options: EvalOptions) -> None:
    """ConfigError for inconsistent evaluation options, before any work is done."""
    if options.mode not in EVAL_MODES:
        raise ConfigError(f"--eval {options.mode!r} is not one of {', '.join(EVAL_MODES)}")
    if options.max_ppl_increase is not None:
        if not math.isfinite(options.max_ppl_increase) or options.max_ppl_increase < 0:
            raise ConfigError(f"--max-ppl-increase must be a percentage >= 0, got {options.max_ppl_increase}")
        if options.mode == "off":
            raise ConfigError("--max-ppl-increase needs the accuracy evaluation; drop --eval off")
    if options.max_tokens < 0 or options.seq_len < 1:
        raise ConfigError(f"--eval-tokens must be >= 0 (0: all) and the window >= 1, got {options.max_tokens} "
                          f"and {options.seq_len}")
    if options.max_tokens and options.max_tokens < min(options.seq_len, 16):
        raise ConfigError(f"--eval-tokens {options.max_tokens} is too few to score; use at least {options.seq_len}")
    if options.eval_data is not None:
        eval_text(options)


def wants_eval(options: EvalOptions, quantization: QuantConfig) -> bool:
    """True when the build should measure accuracy (auto: a quantized engine, or a --max-ppl-increase gate)."""
    if options.mode != "auto":
        return options.mode == "on"
    quantized = quantization.quant_algo is not None or quantization.kv_cache_quant_algo is not None
    return quantized or options.max_ppl_increase is not None


def eval_text(options: EvalOptions) -> tuple[str, str]:
    """(text, description): --eval-data's file, else the reference model's held-out documentation text.

    The default text is disjoint from the calibration corpus (builder/checkpoint/data/corpus.txt) and from the
    reference model's training data, and is ordinary English technical prose any tokenizer handles.
    """
    if options.eval_data is None:
        return heldout_text(), f"bundled held-out text ({(REFERENCE_DIR / 'heldout.txt').name})"
    path = Path(options.eval_data).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--eval-data {path} does not exist; pass a UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--eval-data {path} cannot be read as UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ConfigError(f"--eval-data {path} is empty; give it a few thousand words of held-out text")
    return text, str(path)


def _eval_device(device: str, tp_size: int) -> str:
    """The serve device when it is a usable CUDA device with enough GPUs, else cpu."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() >= tp_size:
        return device
    return "cpu"


def evaluate_build(options: EvalOptions, hf_dir: Path, tokenizer_dir: Path, engine_dir: Path,
                   engine_config: EngineConfig, settings: BuildSettings, scratch: Path) -> AccuracyReport | None:
    """Measure the just-converted engine against an unquantized tp-1 engine of the same dtype (converted into
    scratch and deleted), write engine_dir/accuracy.json and apply --max-ppl-increase (AccuracyGateError).

    Returns None when no evaluation was asked for (see wants_eval)."""
    if not wants_eval(options, engine_config.model.quantization):
        return None
    text, source = eval_text(options)
    reference_dir = Path(scratch) / "reference-engine"
    try:
        convert_checkpoint(hf_dir, reference_dir, replace(settings, dtype=engine_config.build.dtype), tp_size=1)
        seq_len = min(options.seq_len, engine_config.build.max_seq_len)
        report = evaluate(engine_dir, reference_dir, text, seq_len, options.max_tokens or None,
                          tokenizer_dir=tokenizer_dir, text_source=source, spill_dir=scratch,
                          device=_eval_device(settings.device, engine_config.model.mapping.tp_size))
    finally:
        shutil.rmtree(reference_dir, ignore_errors=True)
    write_report(report, Path(engine_dir) / REPORT_FILE)
    check_ppl_increase(report, options.max_ppl_increase)
    return report
