"""builder.quantize: modes, packing, per-mode checkpoint tensors, AWQ, FP8, KV-cache scales, calibration."""

from __future__ import annotations

import math

import pytest
import torch

from builder.config import QuantConfig
from builder.errors import ConfigError
from builder.quantize import (ActivationStats, awq_search, calibration_batches, check_group_divisible,
                              collect_activation_stats, dequantize_linear, fp8_linear_reference, is_excluded,
                              kv_cache_scale, linear_quant_algo, load_calibration_text, pack_int4, quantize_awq,
                              quantize_linear, reference_linear, resolve_quant_config, rope_safe_amax, tensor_amax,
                              weight_only_quantize)
from plugins.formats import dequantize_kv, quantize_kv, unpack_int4
from builder.quantize.awq import dequantize_awq

FP16 = torch.float16


def gen(seed: int = 0) -> torch.Generator:
    """A seeded generator so every test is deterministic."""
    return torch.Generator().manual_seed(seed)


# ---- modes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,algo", [("none", None), ("int8_wo", "W8A16"), ("int4_wo", "W4A16"),
                                       ("int4_awq", "W4A16_AWQ"), ("fp8", "FP8")])
def test_modes_map_to_trtllm_algos(mode, algo):
    qc = resolve_quant_config(mode)
    assert isinstance(qc, QuantConfig) and qc.quant_algo == algo and qc.group_size == 128
    assert qc.pre_quant_scale == (algo == "W4A16_AWQ") and qc.has_zero_point is False
    assert qc.exclude_modules == (None if algo is None else ["lm_head"])


@pytest.mark.parametrize("kv,algo", [("auto", None), ("int8", "INT8"), ("fp8", "FP8")])
def test_kv_cache_modes(kv, algo):
    assert resolve_quant_config("none", kv).kv_cache_quant_algo == algo


def test_unknown_modes_are_config_errors():
    with pytest.raises(ConfigError, match="int4_awq"):
        resolve_quant_config("int3")
    with pytest.raises(ConfigError, match="fp8"):
        resolve_quant_config("none", "fp4")


@pytest.mark.parametrize("size", [64, 128])
def test_supported_group_sizes(size):
    assert resolve_quant_config("int4_awq", group_size=size).group_size == size


@pytest.mark.parametrize("size", [16, 32, 96, 256])
def test_unsupported_group_sizes_are_rejected(size):
    with pytest.raises(ConfigError, match="64 or 128"):
        resolve_quant_config("int4_awq", group_size=size)


def test_group_size_only_for_groupwise_modes():
    with pytest.raises(ConfigError, match="only applies to int4_awq"):
        resolve_quant_config("int8_wo", group_size=128)


def test_group_divisibility_per_rank():
    check_group_divisible("mlp.proj", 256, 64, tp_size=2, row_parallel=True)
    check_group_divisible("attention.qkv", 64, 64, tp_size=2, row_parallel=False)  # column-parallel: full input
    with pytest.raises(ConfigError, match="in_features/tp_size = 64/2 = 32"):
        check_group_divisible("attention.dense", 64, 64, tp_size=2, row_parallel=True)
    with pytest.raises(ConfigError, match="not a multiple of group size 128"):
        check_group_divisible("mlp.fc", 192, 128)


def test_exclusion_patterns():
    qc = resolve_quant_config("fp8", exclude_modules=["lm_head", "transformer.layers.0.*"])
    assert is_excluded("lm_head", qc.exclude_modules)
    assert is_excluded("transformer.layers.0.mlp.fc", qc.exclude_modules)
    assert not is_excluded("transformer.layers.1.mlp.fc", qc.exclude_modules)
    assert linear_quant_algo(qc, "transformer.layers.1.attention.qkv") == "FP8"
    assert linear_quant_algo(qc, "transformer.layers.0.attention.qkv") is None
    assert linear_quant_algo(resolve_quant_config("fp8"), "lm_head") is None
    assert linear_quant_algo(resolve_quant_config("fp8", exclude_modules=[]), "lm_head") == "FP8"


# ---- int4 packing ----------------------------------------------------------------------------------------------

def test_pack_layout_even_row_is_low_nibble():
    q = torch.tensor([[1, -8, 7], [-2, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (1, 3)
    assert [b & 0xFF for b in packed[0].tolist()] == [0xE1, 0x08, 0xF7]


def test_pack_unpack_roundtrip_all_values():
    q = torch.randint(-8, 8, (16, 40), generator=gen(), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_pack_rejects_odd_rows():
    with pytest.raises(ConfigError, match="even number of rows"):
        pack_int4(torch.zeros(3, 4, dtype=torch.int8))


# ---- per-mode checkpoint tensors -------------------------------------------------------------------------------

def test_unquantized_and_weight_only_store_model_dtype_weight():
    w = torch.randn(48, 64, generator=gen())
    for algo in (None, "W8A16", "W4A16"):
        t = quantize_linear(w, algo, dtype=FP16)
        assert list(t) == ["weight"] and t["weight"].dtype == FP16 and t["weight"].shape == (48, 64)


def test_awq_tensors_shapes_and_dtypes():
    w = torch.randn(48, 256, generator=gen())
    t = quantize_linear(w, "W4A16_AWQ", group_size=128, dtype=torch.bfloat16, awq_scales=torch.ones(256))
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (24, 256)
    assert t["weights_scaling_factor"].dtype == torch.float32 and t["weights_scaling_factor"].shape == (48, 2)
    assert t["prequant_scaling_factor"].dtype == torch.bfloat16 and t["prequant_scaling_factor"].shape == (256,)
    found = awq_search([torch.nn.Parameter(w)], torch.randn(8, 256, generator=gen(1)), 128, alphas=[0.0, 0.5])
    from_param = quantize_linear(torch.nn.Parameter(w), "W4A16_AWQ", awq_scales=found.scales)
    assert not any(v.requires_grad for v in from_param.values())


def test_fp8_tensors_shapes_dtypes_and_scales():
    w = torch.randn(32, 64, generator=gen())
    t = quantize_linear(w, "FP8", act_stats=ActivationStats(input_amax=8.96))
    assert t["weight"].dtype == torch.float8_e4m3fn and t["weight"].shape == (32, 64)
    for key in ("weights_scaling_factor", "activation_scaling_factor"):
        assert t[key].dtype == torch.float32 and t[key].shape == (1,)
    assert t["weights_scaling_factor"].item() == pytest.approx(float(w.abs().max()) / 448)
    assert t["activation_scaling_factor"].item() == pytest.approx(8.96 / 448)
    assert float(t["weight"].float().abs().max()) == 448.0


def test_fp8_needs_activation_stats():
    with pytest.raises(ConfigError, match="calib"):
        quantize_linear(torch.randn(4, 4), "FP8")


def test_fp8_shared_scale_for_fused_qkv():
    q, k, v = (torch.randn(16, 32, generator=gen(i)) * (i + 1) for i in range(3))
    amax = tensor_amax(q, k, v)
    assert amax == float(v.abs().max())
    stats = ActivationStats(input_amax=1.0)
    parts = [quantize_linear(x, "FP8", act_stats=stats, weight_amax=amax) for x in (q, k, v)]
    assert all(p["weights_scaling_factor"].item() == pytest.approx(amax / 448) for p in parts)
    fused = quantize_linear(torch.cat([q, k, v]), "FP8", act_stats=stats)
    assert torch.equal(torch.cat([p["weight"] for p in parts]).view(torch.int8), fused["weight"].view(torch.int8))


def test_fp8_reference_quantizes_activations():
    w = torch.randn(16, 64, generator=gen(1))
    x = torch.randn(8, 64, generator=gen(2))
    t = quantize_linear(w, "FP8", act_stats=ActivationStats(input_amax=float(x.abs().max())))
    y = fp8_linear_reference(x, t)
    rel = float((y - x @ w.t()).norm() / (x @ w.t()).norm())
    assert rel < 0.05
    assert not torch.equal(y, x @ dequantize_linear(t, "FP8").t())  # x really went through e4m3
    clipped = fp8_linear_reference(x * 100, t)  # saturates at 448 * activation scale instead of overflowing
    assert torch.isfinite(clipped).all()


def test_awq_roundtrip_is_exact_on_grid_weights():
    g = 64
    q = torch.randint(-7, 8, (8, 128), generator=gen(), dtype=torch.int8)  # amax/7 scales never produce -8
    q[:, ::g] = 7  # every group reaches amax = 7 * scale, so its scale is recovered exactly
    scales = torch.rand(8, 2, generator=gen(1)) + 0.5
    w = q.float() * scales.repeat_interleave(g, dim=1)
    t = quantize_awq(w, g, None, dtype=torch.float32)
    assert torch.equal(unpack_int4(t["weight"]), q)
    assert torch.allclose(dequantize_linear(t, "W4A16_AWQ", g), w)


def test_awq_dequantize_error_is_half_a_step_inside_the_clip_range():
    """Weights inside a group's (clipped) range round to the nearest step; those beyond it saturate at +-7."""
    w = torch.randn(32, 128, generator=gen())
    s = torch.rand(128, generator=gen(1)) + 0.5
    t = quantize_linear(w, "W4A16_AWQ", group_size=64, awq_scales=s, dtype=torch.float32)
    step = t["weights_scaling_factor"].repeat_interleave(64, dim=1) * t["prequant_scaling_factor"][None, :]
    err = (dequantize_linear(t, "W4A16_AWQ", 64) - w).abs()
    inside = w.abs() <= 7 * step
    assert bool((err[inside] <= step[inside] / 2 + 1e-6).all())
    assert bool((unpack_int4(t["weight"])[~inside].abs() >= 7).all())


def test_clip_search_lowers_the_round_trip_error():
    """AWQ's clip search picks per-group ranges with less squared error than plain amax/7, never more."""
    from builder.quantize.weight_only import clipped_groupwise_scales, groupwise_scales

    w = torch.randn(64, 256, generator=gen())
    g = 128

    def err(scales):
        q = torch.round(w / scales.repeat_interleave(g, dim=1)).clamp(-8, 7)
        return ((q * scales.repeat_interleave(g, dim=1) - w) ** 2).reshape(64, 2, g).sum(-1)

    plain, clipped = groupwise_scales(w, g), clipped_groupwise_scales(w, g)
    assert bool((err(clipped) <= err(plain) + 1e-9).all())
    assert float(err(clipped).sum()) < 0.9 * float(err(plain).sum())


def test_awq_group_size_mismatch_is_detected():
    t = quantize_awq(torch.randn(8, 128), 64, None)
    with pytest.raises(ConfigError, match="group_size 128"):
        dequantize_linear(t, "W4A16_AWQ", 128)


def test_weight_only_follows_trtllm_convention():
    w = torch.tensor([[1.0, -0.5, 0.25, 1 / 256], [-2.0, 1.0, 0.0, 5 / 128]])
    q, scale = weight_only_quantize(w, 8, torch.float32)
    assert scale.tolist() == [1 / 128, 2 / 128]  # amax / 128
    assert q[0].tolist() == [127, -64, 32, 1]    # +amax clamps to 127; 0.5 rounds away from zero
    assert q[1].tolist() == [-128, 64, 0, 3]     # 2.5 rounds away from zero (C round, not half-to-even)
    q4, scale4 = weight_only_quantize(w, 4, torch.float32)
    assert scale4.tolist() == [1 / 8, 2 / 8] and q4[0].tolist() == [7, -4, 2, 0]


def test_weight_only_dequantize_error_bounded():
    w = torch.randn(16, 64, generator=gen()).to(FP16)
    for algo, levels in (("W8A16", 128), ("W4A16", 8)):
        t = quantize_linear(w, algo, dtype=FP16)
        err = (dequantize_linear(t, algo) - w.float()).abs()
        step = w.float().abs().amax(dim=1, keepdim=True) / levels
        assert bool((err <= step * 1.01).all())


def test_unknown_algo_rejected():
    with pytest.raises(ConfigError, match="W8A8_SQ"):
        quantize_linear(torch.randn(4, 4), "W8A8_SQ_PER_CHANNEL")


# ---- AWQ search ------------------------------------------------------------------------------------------------

def outlier_activations(n: int, width: int, seed: int) -> torch.Tensor:
    """Activations where a few input channels are much larger than the rest (as in real LLMs)."""
    x = torch.randn(n, width, generator=gen(seed))
    x[:, [3, 77, 130, 200]] *= 30.0
    return x


def test_awq_beats_plain_int4_on_outlier_channels():
    q, k = torch.randn(96, 256, generator=gen(1)), torch.randn(32, 256, generator=gen(2))
    x_cal, x_test = outlier_activations(256, 256, 3), outlier_activations(128, 256, 4)
    found = awq_search([q, k], x_cal, group_size=128)
    assert 0 < found.alpha <= 1 and found.loss < found.plain_loss and found.scales.shape == (256,)
    w = torch.cat([q, k])
    awq = reference_linear(x_test, quantize_awq(w, 128, found.scales, torch.float32, x_cal.abs().mean(0)),
                           "W4A16_AWQ", 128)
    plain = reference_linear(x_test, quantize_awq(w, 128, None, torch.float32), "W4A16_AWQ", 128)
    exact = x_test @ w.t()
    assert float(((awq - exact) ** 2).mean()) < 0.8 * float(((plain - exact) ** 2).mean())


def test_awq_row_parallel_split_matches_split_of_full_quantization():
    w, x = torch.randn(32, 256, generator=gen(1)), outlier_activations(64, 256, 2)
    s = awq_search([w], x, group_size=64, alphas=[0.5]).scales
    full = quantize_awq(w, 64, s, FP16)
    for rank in range(2):
        cols = slice(rank * 128, (rank + 1) * 128)
        part = quantize_awq(w[:, cols], 64, s[cols], FP16)
        assert torch.equal(part["weight"], full["weight"][:, cols])
        assert torch.equal(part["weights_scaling_factor"], full["weights_scaling_factor"][:, rank * 2:(rank + 1) * 2])
        assert torch.equal(part["prequant_scaling_factor"], full["prequant_scaling_factor"][cols])


def test_awq_effective_weight_uses_prequant_scale():
    w = torch.randn(8, 64, generator=gen())
    s = torch.linspace(0.5, 2.0, 64)
    t = quantize_awq(w, 64, s, torch.float32)
    assert torch.allclose(t["prequant_scaling_factor"], 1 / s)
    x = torch.randn(3, 64, generator=gen(1))
    y_kernel = (x * t["prequant_scaling_factor"]) @ (dequantize_awq(t) / t["prequant_scaling_factor"]).t()
    assert torch.allclose(y_kernel, x @ dequantize_awq(t).t(), atol=1e-5)


# ---- KV cache --------------------------------------------------------------------------------------------------

def test_kv_cache_scales():
    int8 = kv_cache_scale("INT8", 3.0, 6.35)
    assert int8.dtype == torch.float32 and int8.shape == (1,) and int8.item() == pytest.approx(6.35 / 127)
    assert kv_cache_scale("FP8", 3.0, 100.0).item() == 1.0  # amax/448 < 1 -> clamped to 1.0 (ModelOpt)
    assert kv_cache_scale("FP8", 896.0, 10.0).item() == pytest.approx(2.0)
    assert kv_cache_scale("FP8", 3.0, 100.0, clamp_fp8=False).item() == pytest.approx(100 / 448)
    with pytest.raises(ConfigError, match="INT8 or FP8"):
        kv_cache_scale("INT4", 1.0, 1.0)


def test_kv_quantize_roundtrip():
    k = torch.randn(4, 2, 16, generator=gen()) * 3
    scale = kv_cache_scale("INT8", float(k.abs().max()), 0.0)
    q = quantize_kv(k, scale, "INT8")
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert float((dequantize_kv(q, scale) - k).abs().max()) <= scale.item() / 2 + 1e-6
    f = quantize_kv(k, kv_cache_scale("FP8", 3.0, 3.0), "FP8")
    normal = k.abs() >= 2 ** -6  # e4m3 normals: 3 mantissa bits, so at most 1/16 relative rounding error
    assert f.dtype == torch.float8_e4m3fn
    assert float(((dequantize_kv(f, torch.tensor([1.0])) - k).abs() / k.abs())[normal].max()) <= 1 / 16


def test_rope_safe_amax_bounds_rotated_keys():
    head, k = 8, torch.randn(32, 2 * 8, generator=gen())
    bound = rope_safe_amax(k, head)
    heads = k.reshape(32, 2, head)
    for angle in torch.linspace(0, 2 * math.pi, 17):
        cos, sin = math.cos(angle), math.sin(angle)
        a, b = heads[..., :4], heads[..., 4:]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        assert float(rotated.abs().max()) <= bound + 1e-5
    assert bound >= float(k.abs().max())


# ---- calibration -----------------------------------------------------------------------------------------------

def test_default_calibration_text_and_missing_file(tmp_path):
    assert len(load_calibration_text()) > 1000
    with pytest.raises(ConfigError, match="--calib-data"):
        load_calibration_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        load_calibration_text(tmp_path / "empty.txt")


def test_calibration_batches():
    batches = calibration_batches(list(range(10)), seq_len=4, max_batches=2)
    assert [b.tolist() for b in batches] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    with pytest.raises(ConfigError, match="no tokens"):
        calibration_batches([], 4)


@pytest.fixture(scope="module")
def tiny_llama():
    """A 1-layer random Llama small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_collect_activation_stats(tiny_llama):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    batches = [torch.randint(0, 64, (1, 12), generator=gen(i)) for i in range(3)]
    stats = collect_activation_stats(tiny_llama, batches, names, max_samples=1000,
                                     output_names=["model.layers.0.self_attn.k_proj"], head_size=8)
    q = stats[names[0]]
    assert q.num_tokens == 36 and q.input_samples.shape == (36, 32)
    assert q.input_amax == pytest.approx(float(q.input_samples.abs().max()))
    assert torch.allclose(q.input_abs_mean, q.input_samples.abs().mean(dim=0))
    assert stats[names[1]].input_samples.shape == (36, 64)
    k = stats["model.layers.0.self_attn.k_proj"]
    assert k.output_amax > 0 and k.output_rope_amax >= k.output_amax
    capped = collect_activation_stats(tiny_llama, batches, names[:1], max_samples=10)
    assert capped[names[0]].input_samples.shape == (10, 32) and capped[names[0]].num_tokens == 36
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_llama.modules())


def test_collect_activation_stats_unknown_layer(tiny_llama):
    with pytest.raises(ConfigError, match="no module"):
        collect_activation_stats(tiny_llama, [torch.zeros(1, 4, dtype=torch.long)], ["model.layers.9.mlp"])


def test_the_family_table_names_the_quantizable_linears():
    """Which modules a quant_algo may apply to is the family's weight table's to say (not a name list here): the
    decoder linears, never the embedding, norms or (kept out by default) lm_head."""
    from builder.config import ModelConfig
    from builder.models import arch_spec

    for arch, extra in (("LlamaForCausalLM", set()), ("Qwen3ForCausalLM", set())):
        cfg = ModelConfig(architecture=arch, dtype="float32", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_size=16, intermediate_size=128,
                          max_position_embeddings=64)
        linears = {row.engine for row in arch_spec(arch).weights(cfg) if row.is_linear_weight}
        want = {f"transformer.layers.{i}.{m}.weight" for i in range(2)
                for m in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")} | extra
        assert linears == want, arch
        keys = arch_spec(arch).stats_keys(cfg)
        assert keys["mlp.gate"] == "mlp.fc" and keys["attention.qkv"] == "attention.qkv"
