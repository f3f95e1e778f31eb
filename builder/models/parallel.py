"""Tensor-parallel splits of engine tensors, by the parallel style the family's weight table gives each module.

Rules (docs: trtllm-checkpoint.md section 2; ModelOpt's export for the quantization tensors):
  column-parallel linears (COLUMN: mlp.fc, mlp.gate; QKV: attention.qkv; VOCAB: lm_head): output rows split (dim 0);
    QKV splits q, k and v separately and concatenates rank r's parts [q_r; k_r; v_r]; when
    tp > num_key_value_heads every KV head is first duplicated tp/nkv times, so each rank owns one;
    VOCAB is zero-padded to a multiple of tp rows first.
  row-parallel linears (ROW: attention.dense, mlp.proj): input columns split (dim 1); biases kept whole.
  everything else (norms, vocab_embedding with use_parallel_embedding false, KV-cache scales): replicated.
Per-suffix table SPLIT_DIMS says which dim of each tensor of a linear follows that split (quantization scales
included); a tensor that lacks that dim (a per-output-channel [out] scale of a row-parallel linear) or holds a
single element (a per-tensor scale) is the same on every rank.

Rank numbering (pp_size 1): rank r is tp_rank r; rank{r}.safetensors holds its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from builder.config import ModelConfig
from builder.errors import ConfigError
from builder.models import arch_spec
from builder.models.spec import COLUMN, QKV, REPLICATED, ROW, VOCAB, relative

# Parallel style -> tensor suffix -> dim split across ranks (None: the same tensor on every rank).
SPLIT_DIMS: dict[str, dict[str, int | None]] = {
    COLUMN: {
        "weight": 0,                     # [out, in] (AWQ int4 packed [out/2, in])
        "bias": 0,                       # [out]
        "per_channel_scale": 0,          # [out]
        "weights_scaling_factor": 0,     # group-wise [out, in/g]; per-tensor [1] stays whole
        "zero": 0,
        "prequant_scaling_factor": None,  # [in]: the input is not split
        "activation_scaling_factor": None,
        "weights_scaling_factor_2": None,
        "alpha": None,
    },
    ROW: {
        "weight": 1,                     # [out, in]
        "bias": None,                    # added once after the all-reduce
        "per_channel_scale": None,       # [out]
        "weights_scaling_factor": 1,     # group-wise [out, in/g]; per-tensor [1] stays whole
        "zero": 1,
        "prequant_scaling_factor": 0,    # [in]
        "activation_scaling_factor": None,
        "weights_scaling_factor_2": None,
        "alpha": None,
    },
}


@dataclass(frozen=True)
class Split:
    """How one rank's shard is cut out of the full tensor: index ranges along `dim`, then `pad` zero rows.

    dim None means the rank gets the whole tensor. Ranges are in full-tensor coordinates and are
    concatenated in order (attention.qkv: q part, k part, v part).
    """

    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    pad: int = 0


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ConfigError unless tensor parallelism of size tp can split this model."""
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"--tp must be a positive integer, got {tp!r}")
    nq, nkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    problems = []
    if nq % tp:
        problems.append(f"num_attention_heads ({nq}) is not divisible by it")
    if nkv % tp and tp % nkv:
        problems.append(f"num_key_value_heads ({nkv}) neither divides it nor is divisible by it")
    if inter % tp:
        problems.append(f"intermediate_size ({inter}) is not divisible by it")
    if problems:
        valid = [t for t in range(1, nq + 1) if not nq % t and not (nkv % t and t % nkv) and not inter % t]
        raise ConfigError(f"--tp {tp} cannot split this model: {'; '.join(problems)}; use one of "
                          f"{', '.join(map(str, valid))}")


def padded_vocab(vocab_size: int, tp: int) -> int:
    """lm_head rows after zero-padding the vocabulary to a multiple of tp."""
    return -(-vocab_size // tp) * tp


def parallel_style(name: str, cfg: ModelConfig) -> str:
    """The family table's style (COLUMN, ROW, QKV, VOCAB, REPLICATED) of the module of engine tensor `name`; tensors
    outside the table (KV-cache scales) are REPLICATED (use_parallel_embedding false: the embedding too)."""
    module = relative(name.rsplit(".", 1)[0] if "." in name else name)
    row = arch_spec(cfg.architecture).modules(cfg).get(module)
    return REPLICATED if row is None else row.style


def split_dim(name: str, ndim: int, numel: int, cfg: ModelConfig) -> int | None:
    """The dim of `name` split across ranks, or None when every rank holds it whole."""
    style = parallel_style(name, cfg)
    if style == REPLICATED or numel == 1:
        return None
    suffix = name.rsplit(".", 1)[-1]
    rules = SPLIT_DIMS[ROW if style == ROW else COLUMN]
    if suffix not in rules:
        raise ConfigError(f"no tensor-parallel rule for {name}; add {suffix!r} to "
                          "builder.models.parallel.SPLIT_DIMS")
    dim = rules[suffix]
    return dim if dim is not None and dim < ndim else None


def plan_split(name: str, shape: tuple[int, ...] | list[int], cfg: ModelConfig, rank: int, tp: int) -> Split:
    """How rank `rank` of `tp` cuts its shard of the full tensor `name` of shape `shape`."""
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= s
    dim = split_dim(name, len(shape), numel, cfg) if tp > 1 else None
    if dim is None:
        return Split(None)
    size = shape[dim]
    style = parallel_style(name, cfg)
    if dim == 0 and style == QKV:
        return Split(0, _qkv_ranges(name, size, cfg, rank, tp))
    if dim == 0 and style == VOCAB:
        per = padded_vocab(size, tp) // tp
        start, stop = min(rank * per, size), min((rank + 1) * per, size)
        return Split(0, ((start, stop),), per - (stop - start))
    if size % tp:
        raise ConfigError(f"{name}: dim {dim} of shape {list(shape)} is not divisible by tp {tp}; "
                          "choose a tp that divides it")
    per = size // tp
    return Split(dim, ((rank * per, (rank + 1) * per),))


def _qkv_ranges(name: str, rows: int, cfg: ModelConfig, rank: int, tp: int) -> tuple[tuple[int, int], ...]:
    """Rows of rank's [q_r; k_r; v_r] in the fused [q; k; v] tensor (KV heads duplicated when tp > nkv)."""
    nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if rows % (nq + 2 * nkv):
        raise ConfigError(f"{name}: {rows} rows do not split into {nq} + 2x{nkv} heads; the checkpoint does not "
                          "match its config.json")
    unit = rows // (nq + 2 * nkv)  # rows per head (head_size, or head_size/2 for packed int4)
    nq_local, nkv_local = cfg.local_heads(tp)
    kv_head = rank * nkv_local if tp <= nkv else rank // (tp // nkv)
    heads = ((rank * nq_local, nq_local), (nq + kv_head, nkv_local), (nq + nkv + kv_head, nkv_local))
    return tuple((first * unit, (first + count) * unit) for first, count in heads)


def shard_shape(name: str, shape: tuple[int, ...] | list[int], cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """Per-rank shape of the full tensor `name` (the same on every rank)."""
    split = plan_split(name, shape, cfg, 0, tp)
    if split.dim is None:
        return tuple(shape)
    out = list(shape)
    out[split.dim] = sum(b - a for a, b in split.ranges) + split.pad
    return tuple(out)


def apply_split(tensor: torch.Tensor, split: Split) -> torch.Tensor:
    """Cut a shard out of the full tensor according to `split`."""
    if split.dim is None:
        return tensor
    return _assemble([tensor.narrow(split.dim, a, b - a) for a, b in split.ranges], split, tuple(tensor.shape),
                     tensor.dtype)


def split_for_rank(name: str, tensor: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of the full TRT-LLM tensor `name` (weights and quantization scales alike)."""
    return apply_split(tensor, plan_split(name, tensor.shape, cfg, rank, tp))


def read_shard(name: str, shape: tuple[int, ...], sources: list[tuple[str, int]], cfg: ModelConfig, rank: int,
               tp: int, read: Callable[[str, int | None, int, int], torch.Tensor]) -> torch.Tensor:
    """Rank's shard of a tensor fused (dim 0) from `sources` [(name, rows)], reading only the slices needed.

    read(source, dim, start, stop) returns source[start:stop] along dim (the whole tensor when dim is None).
    """
    split = plan_split(name, shape, cfg, rank, tp)
    if split.dim is None:
        parts = [read(src, None, 0, 0) for src, _ in sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if split.dim != 0:
        if len(sources) != 1:
            raise ConfigError(f"internal error: {name} is fused from several tensors but split on dim "
                              f"{split.dim}; please report this bug")
        pieces = [read(sources[0][0], split.dim, a, b) for a, b in split.ranges]
        return _assemble(pieces, split, shape)
    pieces = []
    for a, b in split.ranges:  # each range lies inside one source (q, k or v)
        offset = 0
        for src, rows in sources:
            if offset <= a and b <= offset + rows:
                if b > a:
                    pieces.append(read(src, 0, a - offset, b - offset))
                break
            offset += rows
        else:
            raise ConfigError(f"internal error: rows {a}:{b} of {name} straddle its sources; please report this bug")
    return _assemble(pieces, split, shape)


def _assemble(pieces: list[torch.Tensor], split: Split, shape: tuple[int, ...],
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate pieces along split.dim and append split.pad zero rows (full tensor shape `shape`)."""
    if split.pad:
        pad_shape = list(shape)
        pad_shape[split.dim] = split.pad
        dtype = pieces[0].dtype if pieces else (dtype or torch.float32)
        pieces = pieces + [torch.zeros(pad_shape, dtype=dtype)]
    return pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=split.dim)


def merge_shards(name: str, shards: list[torch.Tensor], full_shape: tuple[int, ...] | list[int],
                 cfg: ModelConfig) -> torch.Tensor:
    """Rebuild the full tensor from every rank's shard (inverse of split_for_rank; duplicates must agree)."""
    tp = len(shards)
    full_shape = tuple(full_shape)
    if plan_split(name, full_shape, cfg, 0, tp).dim is None:
        for rank, shard in enumerate(shards[1:], 1):
            if not torch.equal(shard, shards[0]):
                raise ConfigError(f"{name}: rank {rank} differs from rank 0 but the tensor is replicated")
        return shards[0]
    full = torch.zeros(full_shape, dtype=shards[0].dtype)
    seen = torch.zeros(full_shape[plan_split(name, full_shape, cfg, 0, tp).dim], dtype=torch.bool)
    for rank, shard in enumerate(shards):
        split = plan_split(name, full_shape, cfg, rank, tp)
        at = 0
        for a, b in split.ranges:
            piece = shard.narrow(split.dim, at, b - a)
            target = full.narrow(split.dim, a, b - a)
            if seen[a:b].any() and not torch.equal(target, piece):
                raise ConfigError(f"{name}: duplicated rows {a}:{b} differ between ranks")
            target.copy_(piece)
            seen[a:b] = True
            at += b - a
        if split.pad and shard.narrow(split.dim, at, split.pad).any():
            raise ConfigError(f"{name}: rank {rank}'s padding rows are not zero")
    return full
