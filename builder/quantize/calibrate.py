"""Calibration: load the calibration text, cut it into token batches, and record per-linear activation statistics
of a PyTorch (Hugging Face) model with forward hooks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.errors import ConfigError
from builder.quantize.kv_cache import rope_safe_amax

# The bundled calibration text is the checkpoint package's original prose corpus (also shipped as package data).
DEFAULT_CALIB_FILE = Path(__file__).resolve().parent.parent / "checkpoint" / "data" / "corpus.txt"


@dataclass
class ActivationStats:
    """Statistics of one linear's input (and optionally output) over the calibration batches."""

    input_amax: float = 0.0                    # max |x| over all tokens and channels
    input_abs_sum: torch.Tensor | None = None  # sum over tokens of |x| per input channel, fp32 [in]
    input_samples: torch.Tensor | None = None  # up to max_samples input rows, fp32 [n, in] (for AWQ)
    num_tokens: int = 0
    output_amax: float | None = None           # max |y| (only for names in output_names)
    output_rope_amax: float | None = None      # bound on |y| after rotate-half RoPE (needs head_size)

    @property
    def input_abs_mean(self) -> torch.Tensor:
        """Mean |x| per input channel, fp32 [in]."""
        if self.input_abs_sum is None or self.num_tokens == 0:
            raise ConfigError("no calibration tokens reached this layer; check --calib-data and the layer name")
        return self.input_abs_sum / self.num_tokens


def load_calibration_text(path: str | Path | None = None) -> str:
    """Text of --calib-data FILE, or of the bundled corpus when path is None."""
    file = DEFAULT_CALIB_FILE if path is None else Path(path)
    if not file.is_file():
        hint = "reinstall the builder package" if path is None else "pass an existing UTF-8 text file to --calib-data"
        raise ConfigError(f"calibration text {file} does not exist; {hint}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration text {file} is not UTF-8 ({exc}); convert it or pick another file") from exc
    if not text.strip():
        raise ConfigError(f"calibration text {file} is empty; give it a few paragraphs of representative text")
    return text


def calibration_batches(token_ids: Sequence[int], seq_len: int = 512, max_batches: int = 64) -> list[torch.Tensor]:
    """Cut token ids into up to max_batches consecutive windows, each a [1, seq_len] (last may be shorter)."""
    if seq_len <= 0 or max_batches <= 0:
        raise ConfigError(f"calibration seq_len and batch count must be > 0, got {seq_len} and {max_batches}")
    if not token_ids:
        raise ConfigError("calibration text produced no tokens; use a non-empty --calib-data file")
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    return [ids[i:i + seq_len][None, :] for i in range(0, len(ids), seq_len)][:max_batches]


def collect_activation_stats(model: torch.nn.Module, input_id_batches: Sequence[torch.Tensor],
                             linear_names: Sequence[str], *, max_samples: int = 256,
                             output_names: Sequence[str] = (), head_size: int | None = None,
                             ) -> dict[str, ActivationStats]:
    """Run the model on each batch and gather input statistics of linear_names (and output amax of output_names)."""
    stats = {name: ActivationStats() for name in dict.fromkeys([*linear_names, *output_names])}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in linear_names}
    per_batch = max(1, math.ceil(max_samples / max(1, len(input_id_batches))))
    handles = []
    try:
        for name in stats:
            module = _submodule(model, name)
            if name in linear_names:
                handles.append(module.register_forward_pre_hook(_input_hook(stats[name], samples[name], per_batch)))
            if name in output_names:
                handles.append(module.register_forward_hook(_output_hook(stats[name], head_size)))
        _run(model, input_id_batches)
    finally:
        for handle in handles:
            handle.remove()
    for name, chunks in samples.items():
        if chunks:
            stats[name].input_samples = torch.cat(chunks)[:max_samples]
    return stats


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """model.get_submodule(name) with a ConfigError naming the missing layer."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(f"calibration: the model has no module {name!r}; pass Hugging Face module names "
                          "such as model.layers.0.self_attn.q_proj") from exc


def _input_hook(item: ActivationStats, chunks: list[torch.Tensor], per_batch: int) -> Callable:
    """Forward pre-hook that folds one call's input into item and keeps up to per_batch rows in chunks."""
    def hook(_module: torch.nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        item.input_amax = max(item.input_amax, float(x.abs().max()) if x.numel() else 0.0)
        total = x.abs().sum(dim=0)
        item.input_abs_sum = total if item.input_abs_sum is None else item.input_abs_sum + total
        item.num_tokens += x.shape[0]
        rows = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).round().long()
        chunks.append(x[rows].clone())
    return hook


def _output_hook(item: ActivationStats, head_size: int | None) -> Callable:
    """Forward hook that folds one call's output amax (and RoPE-safe amax) into item."""
    def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        y = output.detach().float()
        item.output_amax = max(item.output_amax or 0.0, float(y.abs().max()) if y.numel() else 0.0)
        if head_size:
            item.output_rope_amax = max(item.output_rope_amax or 0.0, rope_safe_amax(y, head_size))
    return hook


def _run(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Forward every batch through the model without gradients or KV cache."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch, use_cache=False)
    finally:
        model.train(was_training)
