"""Streaming calibration: run the calibration tokens through an HF checkpoint one decoder layer at a time.

The whole model is never loaded. The calibration tokens are embedded (reading only the embedding rows they use),
then for each decoder layer only that layer's tensors are read (HFCheckpoint.get), cast to the engine dtype and
run in float32 with a plain dense forward that follows HF Llama/Mistral/Qwen2 (RMSNorm, rotate-half RoPE, causal
SDPA with GQA, SwiGLU). Along the way it records what the quantization needs per layer:

  input amax (FP8 activation scales) and, for AWQ, mean |x| per channel plus up to `max_samples` evenly spaced
  rows, at the four linear inputs: q/k/v (shared), o_proj, gate/up (shared), down_proj; the AWQ scale search then
  runs on those rows with that layer's weights before moving on (samples are not kept across layers);
  weight amax of the fused qkv, o_proj, gate+up (shared) and down_proj (FP8 weight scales);
  k_proj output bounded after RoPE (rope_safe_amax) and v_proj output amax (KV-cache scales).

The hidden states are passed on with the float weights (the standard AWQ/ModelOpt approach), so peak memory is
one layer's weights in float32 plus the calibration activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import plugins
from builder.config import ModelConfig
from builder.errors import ConfigError
from builder.layers.rotary import rope_tables
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

# TRT-LLM module -> (HF linears of the layer it is made from, the input it reads)
GROUPS = {
    "attention.qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_in"),
    "attention.dense": (("self_attn.o_proj",), "attn_out"),
    "mlp.fc": (("mlp.gate_proj", "mlp.up_proj"), "mlp_in"),  # mlp.gate shares fc's input and statistics
    "mlp.proj": (("mlp.down_proj",), "mlp_act"),
}
SHARED = {"mlp.gate": "mlp.fc"}


@dataclass
class LayerCalibration:
    """What one decoder layer's quantization needs, keyed by TRT-LLM module suffix (mlp.gate = mlp.fc)."""

    input_amax: dict[str, float] = field(default_factory=dict)
    weight_amax: dict[str, float] = field(default_factory=dict)
    awq_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # s fp32 [in] of the full layer
    awq_x_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)  # mean |x| fp32 [in]: AWQ's clip search
    awq_alpha: dict[str, float] = field(default_factory=dict)
    k_amax: float = 0.0  # bound on |K| after RoPE
    v_amax: float = 0.0

    def get(self, table: str, module: str):
        """table[module] with mlp.gate resolved to mlp.fc (they share their input)."""
        return getattr(self, table)[SHARED.get(module, module)]


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


def calibrate(ckpt, cfg: ModelConfig, tokens: torch.Tensor, max_samples: int = MAX_SAMPLES,
              progress: Callable[[int], None] | None = None) -> Calibration:
    """Layer-by-layer calibration of the HF checkpoint `ckpt` (HFCheckpoint) on token windows [n, L].

    cfg is the engine's ModelConfig (dtype and cfg.quantization decide what is computed). progress(layer) is
    called after each layer.
    """
    quant = cfg.quantization
    dtype = getattr(torch, cfg.dtype)
    awq = quant.quant_algo == "W4A16_AWQ"
    n, seq_len = tokens.shape
    hidden = _embed(ckpt, tokens, dtype)
    cos, sin = rope_tables(cfg, seq_len, torch.device("cpu"))
    per_chunk = max(1, CHUNK_TOKENS // seq_len)
    layers = []
    with torch.no_grad():
        for i in range(cfg.num_hidden_layers):
            w = _load_layer(ckpt, i, cfg, dtype)
            acc = {key: _InputStats(n * seq_len, max_samples, awq) for _, key in GROUPS.values()}
            result = LayerCalibration()
            for start in range(0, n, per_chunk):
                chunk = hidden[start:start + per_chunk]
                hidden[start:start + per_chunk] = _layer_forward(chunk, w, cfg, cos, sin, acc, result)
            stats = {key: a.finish() for key, a in acc.items()}
            for module, (linears, key) in GROUPS.items():
                weights = [w[name] for name in linears]
                result.input_amax[module] = stats[key].input_amax
                result.weight_amax[module] = tensor_amax(*weights)
                quantized = any(linear_quant_algo(quant, f"transformer.layers.{i}.{m}") for m in
                                (module, *[k for k, v in SHARED.items() if v == module]))
                if awq and quantized:
                    found = awq_search(weights, stats[key].input_samples, quant.group_size,
                                       x_abs_mean=stats[key].input_abs_mean)
                    result.awq_scales[module], result.awq_alpha[module] = found.scales, found.alpha
                    result.awq_x_abs_mean[module] = stats[key].input_abs_mean
            layers.append(result)
            del w
            if progress is not None:
                progress(i)
    return Calibration(layers, n, seq_len)


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


def _load_layer(ckpt, layer: int, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer `layer`'s HF tensors (suffix -> tensor), rounded to the engine dtype, as float32."""
    prefix = f"model.layers.{layer}."
    names = [n for linears, _ in GROUPS.values() for n in linears]
    out = {n: ckpt.get(f"{prefix}{n}.weight").to(dtype).float() for n in names}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[norm] = ckpt.get(f"{prefix}{norm}.weight").to(dtype).float()
    if cfg.attn_bias:
        for x in "qkv":
            out[f"self_attn.{x}_proj.bias"] = ckpt.get(f"{prefix}self_attn.{x}_proj.bias").to(dtype).float()
    return out


def _layer_forward(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig, cos: torch.Tensor,
                   sin: torch.Tensor, acc: dict[str, _InputStats], result: LayerCalibration) -> torch.Tensor:
    """One HF decoder layer on h [b, L, H] (float32), folding the linear inputs and K/V into the statistics."""
    b, seq_len, hidden_size = h.shape
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    eps = cfg.norm_epsilon
    x = plugins.rms_norm(h, w["input_layernorm"], eps).reshape(-1, hidden_size)
    acc["attn_in"].add(x)
    q, k, v = (F.linear(x, w[f"self_attn.{p}_proj"], w.get(f"self_attn.{p}_proj.bias")) for p in "qkv")
    result.k_amax = max(result.k_amax, rope_safe_amax(k, d))
    result.v_amax = max(result.v_amax, float(v.abs().max()))
    positions = torch.arange(seq_len).repeat(b)
    q, k = plugins.rotary_embedding(q.view(-1, nq, d), k.view(-1, nkv, d), positions, cos, sin)
    q, k, v = (t.reshape(b, seq_len, -1, d).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(nq // nkv, dim=1) for t in (k, v))
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5)
    attn = attn.transpose(1, 2).reshape(-1, nq * d)
    acc["attn_out"].add(attn)
    h = h + F.linear(attn, w["self_attn.o_proj"]).view(b, seq_len, hidden_size)
    x = plugins.rms_norm(h, w["post_attention_layernorm"], eps).reshape(-1, hidden_size)
    acc["mlp_in"].add(x)
    act = F.silu(F.linear(x, w["mlp.gate_proj"])) * F.linear(x, w["mlp.up_proj"])
    acc["mlp_act"].add(act)
    return h + F.linear(act, w["mlp.down_proj"]).view(b, seq_len, hidden_size)
