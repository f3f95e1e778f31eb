"""Integer weight quantization: int4 packing, group-wise int4 (AWQ layout) and per-channel W8A16/W4A16.

Two conventions live here on purpose:
- group-wise int4 follows ModelOpt's export (scale = amax/7, round half to even, clamp to [-8, 7]);
- per-channel W8A16/W4A16 follows TensorRT-LLM's build-time quantizer (`symmetric_quantize` in
  cutlass_preprocessors.cpp: scale = amax/128 or amax/8, round half away from zero, clamp to the signed range,
  scale stored in the model dtype), because trtllm-build quantizes those checkpoints itself (see decisions.md).
"""

from __future__ import annotations

import torch

from builder.errors import ConfigError
from plugins.formats import INT4_MAX, INT4_MIN, expand_groups


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values [out, in] (int8 in [-8, 7]) into int8 [out/2, in]: row 2r low nibble, row 2r+1 high
    (plugins.formats.unpack_int4 is the inverse)."""
    if q.dim() != 2 or q.shape[0] % 2:
        raise ConfigError(f"int4 packing needs a 2-D tensor with an even number of rows, got {tuple(q.shape)}")
    q = q.to(torch.int16)
    low, high = q[0::2] & 0x0F, q[1::2] & 0x0F
    packed = low | (high << 4)
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)




def groupwise_scales(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group int4 scales fp32 [out, in/g] = amax/7 (all-zero groups get 1.0, as ModelOpt does)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ConfigError(f"in_features {in_features} is not a multiple of group size {group_size}; "
                          "use a group size that divides it or exclude the layer")
    amax = weight.float().reshape(out_features, in_features // group_size, group_size).abs().amax(dim=-1)
    scales = amax / INT4_MAX
    return torch.where(scales == 0, torch.ones_like(scales), scales)


CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5, as AWQ's clip search
CLIP_CHUNK_ROWS = 2048


def clipped_groupwise_scales(weight: torch.Tensor, group_size: int, channel_weight: torch.Tensor | None = None,
                             ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per-group int4 scales fp32 [out, in/g] = (r * amax)/7, r chosen per group to minimise the output error.

    AWQ's clip search: shrinking a group's range clips its few largest weights but quantizes the rest more finely.
    The squared error of each input channel is weighted by channel_weight [in] (the expected squared activation
    it multiplies; uniform when None). Ratio 1.0 (plain amax/7) wins ties, so weights already on the int4 grid
    keep their exact scales.
    """
    best = groupwise_scales(weight, group_size)
    out_features, in_features = weight.shape
    cw = None if channel_weight is None else channel_weight.float().reshape(in_features // group_size, group_size)
    for start in range(0, out_features, CLIP_CHUNK_ROWS):
        w = weight[start:start + CLIP_CHUNK_ROWS].float().reshape(-1, in_features // group_size, group_size)
        plain = best[start:start + CLIP_CHUNK_ROWS]
        best_err = _group_error(w, plain, cw)
        for ratio in ratios[1:]:
            candidate = plain * ratio
            err = _group_error(w, candidate, cw)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + CLIP_CHUNK_ROWS] = torch.where(better, candidate, best[start:start + CLIP_CHUNK_ROWS])
    return best


def _group_error(w: torch.Tensor, scales: torch.Tensor, cw: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum of squared int4 round-trip errors per group: w [rows, groups, g], scales [rows, groups]."""
    s = scales[..., None]
    err = (torch.round(w / s).clamp(INT4_MIN, INT4_MAX) * s - w) ** 2
    return (err if cw is None else err * cw).sum(dim=-1)


def quantize_int4_groupwise(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Quantize [out, in] with fp32 [out, in/g] scales to int4 values (int8 [out, in], unpacked)."""
    expanded = expand_groups(scales, weight.shape[1])
    return torch.round(weight.float() / expanded).clamp(INT4_MIN, INT4_MAX).to(torch.int8)




def fake_quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize [out, in] group-wise (float32 result); used by the AWQ search.

    The same arithmetic as groupwise_scales + quantize_int4_groupwise + dequantize_int4_groupwise, on a
    [out, in/g, g] view instead of expanded scales (it runs 21 times per linear in the search)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        groupwise_scales(weight, group_size)  # raises the ConfigError
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    scales = w.abs().amax(dim=-1, keepdim=True) / INT4_MAX
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return (torch.round(w / scales).clamp(INT4_MIN, INT4_MAX) * scales).reshape(out_features, in_features)




def weight_only_bits(algo: str) -> int:
    """Bits per weight of a per-channel weight-only algo (W8A16 -> 8, W4A16 -> 4)."""
    bits = {"W8A16": 8, "W4A16": 4}.get(algo)
    if bits is None:
        raise ConfigError(f"{algo} is not a per-channel weight-only algorithm; use W8A16 or W4A16")
    return bits


def weight_only_quantize(weight: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16,
                         row_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's per-output-channel quantizer: (int8 values [out, in], per_channel_scale [out]).

    row_amax [out] replaces the rows' own absolute maxima: a tensor-parallel shard of a row-parallel layer passes the
    maxima of the whole rows, so every rank quantizes with the scales the unsplit layer would have."""
    qmax, weight = 2 ** (bits - 1), weight.detach()
    amax = weight.float().abs().amax(dim=1) if row_amax is None else row_amax.float()
    scale = amax * (1.0 / qmax)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    x = weight.float() / safe[:, None]
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # C round(): half away from zero
    q = torch.where(scale[:, None] == 0, torch.zeros_like(q), q)
    return q.clamp(-qmax, qmax - 1).to(torch.int8), scale.to(scale_dtype)
