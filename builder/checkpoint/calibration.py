"""Streaming calibration: run the calibration tokens through an HF checkpoint one decoder layer at a time, on the
family's own forward pass (builder.layers.decoder: the layers the engine runs, not a second copy of the model).

The whole model is never loaded. The calibration tokens are embedded (reading only the embedding rows they use),
then for each decoder layer only that layer's tensors are read (HFCheckpoint.get), fused into the engine's tensors by
the family's weight table, cast to the engine dtype and run in float32 by DecoderModel.run_layer, with the layer's
linears wrapped by observers and a K/V hook on the attention. Along the way it records what the quantization needs
per layer, keyed by engine module (attention.qkv ...; linears that read one input share their statistics):

  input amax (FP8 activation scales) and, for AWQ, mean |x| per channel plus up to `max_samples` evenly spaced
  rows of every linear input; the AWQ scale search then runs on those rows with that layer's weights before moving
  on (samples are not kept across layers);
  weight amax of each group of linears sharing an input (FP8 weight scales);
  K (after any q/k norm, bounded for RoPE by rope_safe_amax) and V amax (KV-cache scales).

The hidden states are passed on with the float weights (the standard AWQ/ModelOpt approach), so peak memory is
one layer's weights in float32 plus the calibration activations. `device` runs it on the GPU (the reference ops in
float32 on CUDA tensors): `builder build --device cuda` calibrates there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import plugins
from builder.config import Mapping, ModelConfig, QuantConfig
from builder.errors import ConfigError
from builder.layers.decoder import DecoderLayer, DecoderModel
from builder.layers.linear import Linear
from builder.layers.rotary import rope_attention_factor
from builder.models import arch_spec
from builder.models.spec import WeightSpec
from builder.quantize.awq import awq_search
from builder.quantize.calibrate import ActivationStats, calibration_batches, load_calibration_text
from builder.quantize.fp8 import tensor_amax
from builder.quantize.kv_cache import rope_safe_amax
from builder.quantize.modes import linear_quant_algo

DEFAULT_CALIB_SIZE = 16      # sequences
DEFAULT_CALIB_SEQ_LEN = 256  # tokens per sequence
MAX_SAMPLES = 256            # calibration rows kept per linear input for the AWQ search
CHUNK_TOKENS = 2048          # sequences are run through a layer in chunks of about this many tokens
EMBED_CHUNK_ROWS = 8192      # embedding rows read at a time


@dataclass
class LayerCalibration:
    """What one decoder layer's quantization needs, keyed by engine module (without the layer prefix); linears that
    share an input (mlp.fc, mlp.gate) hold the same entries."""

    input_amax: dict[str, float] = field(default_factory=dict)
    weight_amax: dict[str, float] = field(default_factory=dict)
    awq_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # s fp32 [in] of the full layer
    awq_x_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # mean |x| fp32 [in]: AWQ's clip search
    awq_alpha: dict[str, float] = field(default_factory=dict)
    k_amax: float = 0.0  # bound on |K| after RoPE
    v_amax: float = 0.0

    def get(self, table: str, module: str):
        """table[module] (e.g. get("input_amax", "attention.qkv"))."""
        return getattr(self, table)[module]


@dataclass
class Calibration:
    """Per-layer calibration results plus what they were computed from."""

    layers: list[LayerCalibration]
    num_sequences: int
    seq_len: int


def calibration_tokens(tokenizer_dir: Path, calib_data: str | Path | None, num_sequences: int, seq_len: int,
                       max_len: int | None = None) -> torch.Tensor:
    """int64 [n, L] token windows of --calib-data (default: the bundled corpus), n <= num_sequences.

    Only full windows are used unless the text is shorter than one window; ConfigError for a missing or empty
    file, or sizes < 1.
    """
    if num_sequences < 1 or seq_len < 1:
        raise ConfigError(f"--calib-size and --calib-seq-len must be >= 1, got {num_sequences} and {seq_len}")
    seq_len = min(seq_len, max_len) if max_len else seq_len
    text = load_calibration_text(calib_data)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # missing or broken tokenizer files
        raise ConfigError(f"calibration needs the model's tokenizer, which does not load from {tokenizer_dir} "
                          f"({type(exc).__name__}: {exc}); copy tokenizer.json/tokenizer_config.json there") from exc
    text = text[:num_sequences * seq_len * 32]  # far more characters than the tokens needed; bounds tokenizing
    ids = tokenizer(text, verbose=False)["input_ids"]
    batches = calibration_batches(ids, seq_len, num_sequences)
    full = [b for b in batches if b.shape[1] == seq_len] or batches[:1]
    return torch.cat(full, dim=0)


class _InputStats:
    """Accumulates one linear input over the chunks: amax, per-channel sum |x| and evenly spaced sample rows."""

    def __init__(self, total_rows: int, max_samples: int, keep_samples: bool) -> None:
        self.stats = ActivationStats()
        self.rows = torch.linspace(0, total_rows - 1, min(max_samples, total_rows)).round().long().unique()
        self.keep = keep_samples
        self.samples: list[torch.Tensor] = []
        self.offset = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold rows x [n, in] (the next n rows in token order) into the statistics."""
        s, n = self.stats, x.shape[0]
        s.input_amax = max(s.input_amax, float(x.abs().max()) if x.numel() else 0.0)
        total = x.abs().sum(dim=0)
        s.input_abs_sum = total if s.input_abs_sum is None else s.input_abs_sum + total
        s.num_tokens += n
        if self.keep:
            picked = self.rows[(self.rows >= self.offset) & (self.rows < self.offset + n)] - self.offset
            self.samples.append(x[picked].clone())
        self.offset += n

    def finish(self) -> ActivationStats:
        if self.samples:
            self.stats.input_samples = torch.cat(self.samples)
        return self.stats


def calibration_device(engine_device: str) -> torch.device:
    """Where calibration runs: the engine's CUDA device when this machine has one (`builder build --device cuda`),
    else the CPU (a build for a GPU server made on a CPU machine calibrates on the CPU)."""
    if engine_device.startswith("cuda") and torch.cuda.is_available():
        return torch.device(engine_device)
    return torch.device("cpu")


class _Observed:
    """A linear that folds its inputs into the statistics of its group, then runs as before."""

    def __init__(self, linear: Linear, stats: _InputStats) -> None:
        self.linear, self.stats, self.bias = linear, stats, linear.bias

    def __call__(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        self.stats.add(x.reshape(-1, x.shape[-1]))
        return self.linear(x, with_bias)


def calibrate(ckpt, cfg: ModelConfig, tokens: torch.Tensor, max_samples: int = MAX_SAMPLES,
              progress: Callable[[int], None] | None = None, device: torch.device | str = "cpu") -> Calibration:
    """Layer-by-layer calibration of the HF checkpoint `ckpt` (HFCheckpoint) on token windows [n, L].

    cfg is the engine's ModelConfig (dtype and cfg.quantization decide what is computed). progress(layer) is
    called after each layer.
    """
    spec, quant, dtype, device = arch_spec(cfg.architecture), cfg.quantization, getattr(torch, cfg.dtype), \
        torch.device(device)
    awq = quant.quant_algo == "W4A16_AWQ"
    n, seq_len = tokens.shape
    float_cfg = replace(cfg, dtype="float32", quantization=QuantConfig(), mapping=Mapping())
    model: DecoderModel = spec.model_class().without_weights(float_cfg, seq_len, device)
    keys = spec.stats_keys(cfg)  # linear -> the module whose statistics it shares
    hidden = _embed(ckpt, tokens, dtype).reshape(n * seq_len, -1).to(device)
    residual: torch.Tensor | None = None
    per_chunk = max(1, CHUNK_TOKENS // seq_len)
    layers = []
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            rows = spec.layer_weights(cfg, i)
            weights = {row.engine: torch.cat([ckpt.get(src) for src in row.hf]).to(dtype).float().to(device)
                       for row in rows}
            layer = DecoderLayer.from_table(weights, rows, float_cfg)
            acc = {key: _InputStats(n * seq_len, max_samples, awq) for key in set(keys.values())}
            observed = replace(layer, **{row.runtime: _Observed(getattr(layer, row.runtime), acc[keys[row.relative]])
                                         for row in rows if row.is_linear_weight})
            result = LayerCalibration()
            model.kv_observer = _kv_observer(result, cfg.head_size, rope_attention_factor(cfg))
            out, res = [], []
            for start in range(0, n, per_chunk):
                count = min(per_chunk, n - start)
                rows_of = slice(start * seq_len, (start + count) * seq_len)
                h, r = model.run_layer(observed, hidden[rows_of], None if residual is None else residual[rows_of],
                                       *_prefill(count, seq_len, float_cfg, model, device))
                out.append(h)
                res.append(r)
            hidden, residual = torch.cat(out), torch.cat(res)
            _finish_layer(result, rows, weights, keys, {key: a.finish() for key, a in acc.items()}, quant, i)
            layers.append(result)
            del weights, layer, observed
            if progress is not None:
                progress(i)
    model.kv_observer = None
    return Calibration(layers, n, seq_len)


def _kv_observer(result: LayerCalibration, head_size: int,
                 rope_factor: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The attention's K/V hook: K before RoPE (after any q/k norm) bounded for RoPE (times the factor the rope
    scaling puts on cos/sin: YaRN's), V amax."""
    def observe(k: torch.Tensor, v: torch.Tensor) -> None:
        result.k_amax = max(result.k_amax, rope_safe_amax(k.reshape(k.shape[0], -1), head_size) * rope_factor)
        result.v_amax = max(result.v_amax, float(v.abs().max()) if v.numel() else 0.0)
    return observe


def _prefill(count: int, seq_len: int, cfg: ModelConfig, model: DecoderModel, device: torch.device):
    """(positions, one layer's KV cache, metadata) for `count` whole sequences of seq_len tokens, one block each."""
    positions = torch.arange(seq_len, device=device).repeat(count)
    one_layer = replace(model.kv_cache_spec(cfg), layers=1)  # the pool of this layer only
    cache = one_layer.allocate(count, seq_len, torch.float32, device)[0]
    meta = plugins.AttentionMetadata(
        slot_mapping=torch.arange(count * seq_len, device=device),
        block_tables=torch.arange(count, dtype=torch.int32, device=device)[:, None],
        query_start=torch.arange(0, (count + 1) * seq_len, seq_len, dtype=torch.int32, device=device),
        context_lens=torch.full((count,), seq_len, dtype=torch.int32, device=device),
        query_lens_host=[seq_len] * count, context_lens_host=[seq_len] * count)
    return positions, cache, meta


def _finish_layer(result: LayerCalibration, rows: list[WeightSpec], weights: dict[str, torch.Tensor],
                  keys: dict[str, str], stats: dict[str, ActivationStats], quant: QuantConfig, layer: int) -> None:
    """Per group of linears sharing an input: input amax, weight amax, and the AWQ search when one is quantized."""
    linears = [row for row in rows if row.is_linear_weight]
    for key in dict.fromkeys(keys.values()):
        group = [row for row in linears if keys[row.relative] == key]
        group_weights = [weights[row.engine] for row in group]
        found = None
        if quant.quant_algo == "W4A16_AWQ" and any(linear_quant_algo(quant, row.module) for row in group):
            found = awq_search(group_weights, stats[key].input_samples, quant.group_size,
                               x_abs_mean=stats[key].input_abs_mean)
        for row in group:
            module = row.relative
            result.input_amax[module] = stats[key].input_amax
            result.weight_amax[module] = tensor_amax(*group_weights)
            if found is not None:
                result.awq_scales[module], result.awq_alpha[module] = found.scales.cpu(), found.alpha
                result.awq_x_abs_mean[module] = stats[key].input_abs_mean.cpu()


def _embed(ckpt, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 [n, L, H] embeddings of tokens, reading the embedding in row chunks (only the rows used are kept)."""
    name = "model.embed_tokens.weight"
    vocab, hidden_size = ckpt.shape(name)
    flat = tokens.reshape(-1)
    if int(flat.max()) >= vocab:
        raise ConfigError(f"calibration token id {int(flat.max())} is outside the embedding ({vocab} rows); the "
                          "tokenizer does not match the checkpoint")
    out = torch.empty(flat.numel(), hidden_size, dtype=torch.float32)
    for start in range(0, vocab, EMBED_CHUNK_ROWS):
        stop = min(start + EMBED_CHUNK_ROWS, vocab)
        hit = (flat >= start) & (flat < stop)
        if hit.any():
            rows = ckpt.get_part(name, 0, start, stop)
            out[hit] = rows[flat[hit] - start].to(dtype).float()
    return out.reshape(*tokens.shape, hidden_size)
