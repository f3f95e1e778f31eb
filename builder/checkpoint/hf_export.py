"""HF-format checkpoint for TensorRT-LLM's PyTorch backend: HF names, and ModelOpt's unified layout when quantized.

What TensorRT-LLM >= 1.0 (`LLM(model=DIR)`, the Triton `llmapi` model) loads (trtllm-checkpoint.md sections 3.1, 5):
  config.json            the source HF config, `dtype`/`torch_dtype` set to the export dtype, and when quantized a
                         `quantization_config` with quant_method "modelopt"
  model.safetensors      every tensor under its HF name, unsharded (TensorRT-LLM shards at load time)
  hf_quant_config.json   quantized exports only: {producer, quantization: {quant_algo, kv_cache_quant_algo, ...}}
  tokenizer files        as in the source folder

Quantized linear tensors (HF module name + suffix), as nvidia-modelopt 0.47's `export_hf_checkpoint` writes them
(checked on this machine against a tiny Llama, see docs/deploy-tensorrt-llm.md):
  W8A16  (int8_wo)   weight int8 [out, in], weight_scale fp32 [out] = amax/127 per output channel (round half even)
  W4A16_AWQ (int4_awq, and int4_wo = AWQ layout with unit pre-quant scales: ModelOpt's INT4 blockwise weight-only
         export, since the unified format has no per-channel W4A16)
                     weight uint8 [out/2, in] (two int4 of adjacent output rows per byte, even row in the low
                     nibble), weight_scale fp32 [out, in/g], pre_quant_scale model dtype [in] on o_proj/down_proj;
                     for q/k/v and gate/up it is folded into the preceding RMSNorm weight (they share one scale)
  FP8                weight float8_e4m3fn [out, in], weight_scale fp32 [] = amax/448, input_scale fp32 [] =
                     calibrated input amax/448; q/k/v share one weight scale, gate/up another (lossless fusion)
  FP8 KV cache       self_attn.k_proj.k_scale, self_attn.v_proj.v_scale fp32 [] = amax/448 (ModelOpt 0.47's unified
                     export does not clamp these to >= 1, unlike its TensorRT-LLM checkpoint export)
TensorRT-LLM's PyTorch backend has no INT8 KV cache, so --kv-cache-dtype int8 is refused for this target.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from builder import __version__
from builder.checkpoint.calibration import calibrate, calibration_device, calibration_tokens
from builder.checkpoint.convert import plan_checkpoint
from builder.checkpoint.hf import HFCheckpoint, copy_tokenizer, staged_tokenizer
from builder.checkpoint.safetensors_io import write_streaming
from builder.checkpoint.trtllm import IGNORED_SUFFIXES
from builder.config import BuildSettings, EngineConfig, Mapping, ModelConfig, QuantConfig, QuantOptions
from builder.errors import ConfigError
from builder.models import arch_spec
from builder.models.parallel import validate_tp
from builder.models.spec import WeightSpec
from builder.quantize.awq import quantize_awq
from builder.quantize.fp8 import fp8_scale, quantize_fp8
from builder.quantize.modes import DEFAULT_GROUP_SIZE, linear_quant_algo, needs_calibration
from plugins.formats import TORCH_DTYPES

HF_QUANT_CONFIG = "hf_quant_config.json"
WEIGHTS_FILE = "model.safetensors"
INT8_WO_MAX = 127.0  # ModelOpt's int8 weight-only bound (TensorRT-LLM's own build-time quantizer uses 128)

# Which HF linear is which engine module, which share statistics, and which RMSNorm absorbs a group's AWQ pre-quant
# scale (ModelOpt folds it there) all come from the family's weight table (WeightSpec.hf / quant_group / fold_into);
# quantization choices are made in TensorRT-LLM names (exclude_modules, calibration statistics), as for the
# TensorRT-LLM checkpoint.

Calibrate = Callable[[HFCheckpoint, ModelConfig], Any]


def check_pytorch_quantization(quant: QuantConfig) -> None:
    """Raise ConfigError for quantization the PyTorch backend cannot load from an HF checkpoint."""
    if quant.kv_cache_quant_algo == "INT8":
        raise ConfigError("TensorRT-LLM's PyTorch backend has no INT8 KV cache; use --kv-cache-dtype fp8 (or auto), "
                          "or --backend tensorrtllm for an INT8 KV cache")


def exported_quant_config(quant: QuantConfig) -> QuantConfig:
    """What the HF checkpoint declares: W4A16 (per channel) has no unified-format spelling, so int4_wo is written as
    ModelOpt writes its INT4 blockwise weight-only export: W4A16_AWQ, group 128, without pre-quant scale tensors."""
    if quant.quant_algo == "W4A16":
        return replace(quant, quant_algo="W4A16_AWQ", group_size=DEFAULT_GROUP_SIZE, pre_quant_scale=True)
    return quant


def hf_quant_config(quant: QuantConfig, exclude: list[str], producer: dict[str, str]) -> dict[str, Any] | None:
    """hf_quant_config.json content (None when nothing is quantized), keys as ModelOpt 0.47 writes them."""
    if quant.quant_algo is None and quant.kv_cache_quant_algo is None:
        return None
    inner: dict[str, Any] = {"quant_algo": quant.quant_algo, "kv_cache_quant_algo": quant.kv_cache_quant_algo}
    if quant.quant_algo == "W4A16_AWQ":
        inner.update(group_size=quant.group_size, has_zero_point=False, pre_quant_scale=True)
    inner["exclude_modules"] = exclude
    return {"producer": producer, "quantization": inner}


def quantization_config(quant: QuantConfig, exclude: list[str], producer: dict[str, str]) -> dict[str, Any]:
    """config.json's `quantization_config` (quant_method "modelopt"), the same facts as hf_quant_config.json."""
    data: dict[str, Any] = {"quant_method": "modelopt", "quant_algo": quant.quant_algo, "ignore": exclude,
                            "producer": producer}
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    if quant.quant_algo == "FP8":
        data["config_groups"] = {"group_0": {"input_activations": fp8, "weights": fp8, "targets": ["Linear"]}}
    if quant.quant_algo == "W4A16_AWQ":
        data["group_size"] = quant.group_size
    if quant.kv_cache_quant_algo == "FP8":
        data["kv_cache_scheme"] = fp8
        data["kv_cache_quant_algo"] = "FP8"
    return data


def int8_weight_only(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt's W8A16 export of one linear: int8 [out, in] and fp32 [out] scale = amax/127 (round half to even)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / INT8_WO_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def hf_linears(cfg: ModelConfig) -> dict[str, tuple[int, WeightSpec]]:
    """HF linear weight name -> (layer, the weight-table row of the engine linear it is part of), in table order."""
    spec, out = arch_spec(cfg.architecture), {}
    for layer in range(cfg.num_hidden_layers):
        for row in spec.layer_weights(cfg, layer):
            if row.is_linear_weight:
                out.update({hf: (layer, row) for hf in row.hf})
    return out


def excluded_hf_modules(cfg: ModelConfig, quant: QuantConfig) -> list[str]:
    """HF module names kept unquantized (ModelOpt lists the embedding and lm_head, then any excluded linears)."""
    names = ["lm_head", "model.embed_tokens"]
    if quant.quant_algo is None:
        return names
    for hf, (_, row) in hf_linears(cfg).items():
        if linear_quant_algo(quant, row.module) is None:
            names.append(hf.removesuffix(".weight"))
    return names


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """A one-element fp32 tensor as a 0-d tensor (ModelOpt writes per-tensor scales with shape [])."""
    return value.detach().float().reshape(())


class _Layout:
    """Which HF tensor becomes which output tensors, decided from the config before any tensor is read."""

    def __init__(self, ckpt: HFCheckpoint, cfg: ModelConfig, dtype: torch.dtype):
        self.ckpt, self.cfg, self.dtype, self.quant = ckpt, cfg, dtype, cfg.quantization
        keys = arch_spec(cfg.architecture).stats_keys(cfg)
        self.algo: dict[str, tuple[int, str, str | None]] = {}  # HF weight name -> (layer, stats module, algo)
        self.folds: dict[str, str | None] = {}  # HF weight name -> the norm its AWQ pre-quant scale folds into
        for hf, (layer, row) in hf_linears(cfg).items():
            self.algo[hf] = (layer, keys[row.relative], linear_quant_algo(self.quant, row.module))
            self.folds[hf] = row.fold_into
        # RMSNorm weights that absorb an AWQ pre-quant scale: every linear they feed must be AWQ-quantized.
        self.folded: dict[str, tuple[int, str]] = {}
        if self.quant.quant_algo == "W4A16_AWQ":
            for layer in range(cfg.num_hidden_layers):
                fed: dict[str, list[tuple[str, str | None]]] = {}
                for hf, (lay, key, algo) in self.algo.items():
                    if lay == layer and self.folds[hf] is not None:
                        fed.setdefault(self.folds[hf], []).append((key, algo))
                for norm, linears in fed.items():
                    if all(a == "W4A16_AWQ" for _, a in linears):
                        self.folded[f"model.layers.{layer}.{norm}.weight"] = (layer, linears[0][0])

    def entries(self, name: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(output name, dtype, shape) of what HF tensor `name` becomes."""
        shape = tuple(self.ckpt.shape(name))
        if name not in self.algo or self.algo[name][2] is None:
            extra = []
            if self.quant.kv_cache_quant_algo == "FP8" and name.endswith(("self_attn.k_proj.weight",
                                                                          "self_attn.v_proj.weight")):
                kind = "k_scale" if ".k_proj." in name else "v_scale"
                extra = [(name.removesuffix("weight") + kind, torch.float32, ())]
            return [(name, self.dtype, shape)] + extra
        module_name = name.removesuffix(".weight")
        out, in_features = shape
        algo, group = self.algo[name][2], self.quant.group_size
        if algo == "W8A16":
            parts = [("weight", torch.int8, (out, in_features)), ("weight_scale", torch.float32, (out,))]
        elif algo in ("W4A16", "W4A16_AWQ"):
            parts = [("weight", torch.uint8, (out // 2, in_features)),
                     ("weight_scale", torch.float32, (out, in_features // group))]
            if algo == "W4A16_AWQ" and self.folds[name] is None:
                parts.append(("pre_quant_scale", self.dtype, (in_features,)))
        else:  # FP8
            parts = [("weight", torch.float8_e4m3fn, (out, in_features)), ("weight_scale", torch.float32, ()),
                     ("input_scale", torch.float32, ())]
        if self.quant.kv_cache_quant_algo == "FP8" and name.endswith(("self_attn.k_proj.weight",
                                                                      "self_attn.v_proj.weight")):
            parts.append(("k_scale" if ".k_proj." in name else "v_scale", torch.float32, ()))
        return [(f"{module_name}.{suffix}", dt, sh) for suffix, dt, sh in parts]


def _produce(layout: _Layout, name: str, calib) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors of HF tensor `name`, in the order of layout.entries(name)."""
    quant, dtype = layout.quant, layout.dtype
    tensor = layout.ckpt.get(name).to(dtype)
    kv = None
    if quant.kv_cache_quant_algo == "FP8" and name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        stats = calib.layers[int(name.split(".")[2])]
        kind = "k_scale" if ".k_proj." in name else "v_scale"
        kv = (name.removesuffix("weight") + kind, _scalar(fp8_scale(stats.k_amax if kind == "k_scale"
                                                                     else stats.v_amax)))
    if name in layout.folded:  # RMSNorm weight times the AWQ pre-quant scale of the group it feeds
        layer, module = layout.folded[name]
        pre_quant = (1.0 / calib.layers[layer].awq_scales[module].float()).to(dtype)
        yield name, (tensor.float() * pre_quant.float()).to(dtype)
        return
    if name not in layout.algo or layout.algo[name][2] is None:
        yield name, tensor
        if kv:
            yield kv
        return
    layer, module, algo = layout.algo[name]
    module_name = name.removesuffix(".weight")
    if algo == "W8A16":
        parts = int8_weight_only(tensor)
    elif algo in ("W4A16", "W4A16_AWQ"):
        scales = x_abs_mean = None
        if algo == "W4A16_AWQ":
            stats = calib.layers[layer]
            scales, x_abs_mean = stats.awq_scales[module], stats.awq_x_abs_mean[module]
        awq = quantize_awq(tensor, quant.group_size, scales, dtype, x_abs_mean)
        parts = {"weight": awq["weight"].view(torch.uint8), "weight_scale": awq["weights_scaling_factor"]}
        if algo == "W4A16_AWQ" and layout.folds[name] is None:
            parts["pre_quant_scale"] = awq["prequant_scaling_factor"]
    else:  # FP8: q/k/v and gate/up share the weight amax of their fused TensorRT-LLM module
        stats, key = calib.layers[layer], module
        fp8 = quantize_fp8(tensor, stats.input_amax[key], stats.weight_amax[key])
        parts = {"weight": fp8["weight"], "weight_scale": _scalar(fp8["weights_scaling_factor"]),
                 "input_scale": _scalar(fp8["activation_scaling_factor"])}
    for suffix, value in parts.items():
        yield f"{module_name}.{suffix}", value
    if kv:
        yield kv


def _default_calibrate(quant_options, max_len: int, device: str = "cpu") -> Calibrate:
    """Layer-by-layer calibration of builder.checkpoint.calibration on --calib-data (the same as the TensorRT-LLM path)."""
    options = quant_options or QuantOptions()

    def run(ckpt: HFCheckpoint, cfg: ModelConfig):
        with staged_tokenizer(ckpt.dir) as tokenizer_dir:
            tokens = calibration_tokens(tokenizer_dir, options.calib_data, options.calib_size, options.calib_seq_len,
                                        max_len)
        return calibrate(ckpt, cfg, tokens, device=calibration_device(device))
    return run


def export_hf_checkpoint(hf_dir: Path, out_dir: Path, settings: BuildSettings, tp_size: int = 1,
                         quant_config: QuantConfig | None = None, calibrate: Calibrate | None = None,
                         quant_options=None) -> EngineConfig:
    """Write an HF-format checkpoint (quantized in ModelOpt's unified layout when quant_config says so) to out_dir.

    Returns the EngineConfig the repository is rendered from (mapping = the tensor-parallel size TensorRT-LLM will
    shard to at load time; the files themselves are not sharded). `calibrate(ckpt, cfg)` supplies the statistics of
    AWQ, FP8 and the FP8 KV cache (default: builder.checkpoint.calibration on quant_options' calibration text).
    """
    settings.validate()
    quant = quant_config or QuantConfig()
    check_pytorch_quantization(quant)
    ckpt = HFCheckpoint(hf_dir)
    cfg, _ = plan_checkpoint(ckpt, settings.dtype)  # config fields and every weight's shape checked
    dtype_name = cfg.dtype
    validate_tp(cfg, tp_size)
    cfg.mapping = Mapping(world_size=tp_size, tp_size=tp_size, pp_size=1)
    exported = exported_quant_config(quant)
    cfg.quantization = exported  # group-wise int4 must fit every rank's input width (TensorRT-LLM shards at load)
    arch_spec(cfg.architecture).check_quantization(cfg, tp_size)
    cfg.quantization = quant  # the layout follows the requested mode (int4_wo: no AWQ search, no pre-quant scales)
    calib = None
    if needs_calibration(quant):
        calibrate = calibrate or _default_calibrate(quant_options, settings.max_seq_len, settings.device)
        calib = calibrate(ckpt, cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(hf_dir, out_dir)  # also copies config.json / generation_config.json, rewritten below
    layout = _Layout(ckpt, cfg, TORCH_DTYPES[dtype_name])
    names = [n for n in ckpt.names() if not n.endswith(IGNORED_SUFFIXES)]
    entries = [entry for name in names for entry in layout.entries(name)]
    write_streaming(out_dir / WEIGHTS_FILE, entries, (t for name in names for t in _produce(layout, name, calib)))
    producer = {"name": "builder", "version": __version__}
    config = dict(ckpt.config)
    config["dtype"] = config["torch_dtype"] = dtype_name  # transformers >= 4.56 reads dtype, older torch_dtype
    config.pop("quantization_config", None)
    exclude = excluded_hf_modules(cfg, quant)
    hf_quant = hf_quant_config(exported, exclude, producer)
    if hf_quant is not None:
        config["quantization_config"] = quantization_config(exported, exclude, producer)
        (out_dir / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg.quantization = exported
    return EngineConfig(cfg, replace(settings, dtype=dtype_name))

