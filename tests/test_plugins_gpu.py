"""GPU kernels (plugins.gpu) against the torch reference math (plugins.reference, builder.quantize).

Runs on a CUDA GPU; skipped elsewhere. With TRITON_INTERPRET=1 (and triton installed) the same tests run the kernels
on CPU tensors through Triton's interpreter (slow; for development without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
else:
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)", allow_module_level=True)
pytest.importorskip("triton")

from builder.quantize.awq import quantize_awq  # noqa: E402
from builder.quantize.fp8 import quantize_fp8 as quantize_fp8_weight  # noqa: E402
from builder.quantize.kv_cache import kv_cache_scale  # noqa: E402
from builder.quantize.weight_only import weight_only_quantize  # noqa: E402
from plugins.formats import quantize_kv, to_fp8, unpack_int4  # noqa: E402
from plugins import gpu, reference  # noqa: E402
from plugins.metadata import AttentionMetadata  # noqa: E402

pytestmark = pytest.mark.gpu
INTERPRET = DEVICE.type == "cpu"
DTYPES = [torch.float16, torch.bfloat16]
KV_DTYPES = [None, torch.int8, torch.float8_e4m3fn]
KV_ALGO = {torch.int8: "INT8", torch.float8_e4m3fn: "FP8"}


def tol(base: float, dtype) -> float:
    """Tolerance; Triton's CPU interpreter rounds float32 -> bf16 toward zero, so loosen bf16 there."""
    return base * 10 if INTERPRET and dtype == torch.bfloat16 else base


def fp8_writes_ok() -> bool:
    """Triton's CPU interpreter converts float32 -> e4m3 wrongly near binade edges; the GPU does not."""
    return not INTERPRET


def skip_interpreted_bf16_dot(dtype) -> None:
    """Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits; only the GPU can check those."""
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("interpreter bf16 tl.dot")


def bit_exact(dtype) -> bool:
    """Whether kernels can match torch bit for bit in this dtype here (not bf16 under the interpreter)."""
    return not (INTERPRET and dtype == torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has NaN / inf)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------ norm / rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 4096), (33, 1000), (5, 64)])
def test_rms_norm(dtype, rows, hidden):
    g = gen(rows * hidden)
    x, res = randn(rows, hidden, g=g, dtype=dtype, scale=3), randn(rows, hidden, g=g, dtype=dtype)
    w = randn(hidden, g=g, dtype=dtype)
    out = gpu.rms_norm(x, w, 1e-5)
    ref = reference.rms_norm(x, w, 1e-5)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol(4e-3, dtype)
    out, summed = gpu.fused_add_rms_norm(x, res, w, 1e-6)
    ref, ref_summed = reference.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(summed, ref_summed) or not bit_exact(dtype)
    assert rel_err(out, ref) < tol(4e-3, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,nq,nkv,d", [(1, 32, 8, 128), (37, 12, 4, 64), (5, 4, 2, 16), (3, 8, 8, 128)])
def test_rotary(dtype, tokens, nq, nkv, d):
    g = gen(tokens + nq)
    qkv = randn(tokens, (nq + 2 * nkv) * d, g=g, dtype=dtype)  # q/k are strided views of the fused output
    q, k, _ = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    q, k = q.view(tokens, nq, d), k.view(tokens, nkv, d)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(4096).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEVICE)
    q_out, k_out = gpu.rotary_embedding(q, k, positions, cos, sin)
    q_ref, k_ref = reference.rotary_embedding(q, k, positions, cos, sin)
    limit = tol(1e-2 if dtype == torch.bfloat16 else 3e-3, dtype)  # within an ulp or two of torch's roundings
    assert rel_err(q_out, q_ref) < limit and rel_err(k_out, k_ref) < limit


# ------------------------------------------------------------------------------------------------ paged KV


def make_batch(seqs: list[tuple[int, int]], nq: int, nkv: int, d: int, tpb: int, dtype, kv_dtype, seed: int):
    """Random paged caches holding every sequence's context, the batch's queries and metadata.

    seqs: (query_len, context_len) per sequence. Blocks are assigned in a random order (and block tables padded
    with 0), so any indexing mistake shows."""
    g = gen(seed)
    blocks = [-(-ctx // tpb) for _, ctx in seqs]
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for b in blocks:
        tables.append(perm[used:used + b])
        used += b
    width = max(blocks)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kv_scale = None
    k = torch.randn(num_blocks, tpb, nkv, d, generator=g) * 2
    v = torch.randn(num_blocks, tpb, nkv, d, generator=g)
    if kv_dtype is None:
        k_cache, v_cache = k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)
    else:
        algo = KV_ALGO[kv_dtype]
        kv_scale = kv_cache_scale(algo, float(k.abs().max()), float(v.abs().max()), clamp_fp8=False)
        k_cache = quantize_kv(k, kv_scale, algo).to(DEVICE)
        v_cache = quantize_kv(v, kv_scale, algo).to(DEVICE)
        kv_scale = kv_scale.to(DEVICE)
    slots = []
    for (qlen, ctx), table in zip(seqs, tables):
        slots += [table[p // tpb] * tpb + p % tpb for p in range(ctx - qlen, ctx)]
    qlens = [q for q, _ in seqs]
    starts = [0]
    for q in qlens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        query_start=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEVICE),
        query_lens_host=qlens, context_lens_host=[c for _, c in seqs])
    q = randn(starts[-1], nq, d, g=g, dtype=dtype)
    return q, k_cache, v_cache, kv_scale, meta


def attn_tol(dtype, kv_dtype) -> float:
    return tol(2e-2, dtype) if dtype == torch.bfloat16 else 5e-3


DECODE_CASES = [  # (nq, nkv, d, tpb, context lengths)
    (32, 8, 128, 32, [1, 17, 64, 65, 300, 1000]),
    (8, 8, 64, 16, [5, 129, 40]),
    (28, 4, 128, 64, [333, 2, 97]),
    (16, 1, 16, 16, [31, 7]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_decode(dtype, kv_dtype, case, num_splits):
    skip_interpreted_bf16_dot(dtype)
    nq, nkv, d, tpb, ctxs = DECODE_CASES[case]
    q, k_cache, v_cache, kv_scale, meta = make_batch([(1, c) for c in ctxs], nq, nkv, d, tpb, dtype, kv_dtype,
                                                     seed=case)
    out = gpu.paged_attention(q, k_cache, v_cache, meta, d ** -0.5, kv_scale, num_splits=num_splits)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, d ** -0.5, kv_scale)
    assert rel_err(out, ref) < attn_tol(dtype, kv_dtype)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_paged_decode_long_context_split_kv(kv_dtype):
    ctxs = [3000, 11] if INTERPRET else [20000, 9001, 11]
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    q, k_cache, v_cache, kv_scale, meta = make_batch([(1, c) for c in ctxs], 32, 8, 128, 32, dtype, kv_dtype, seed=7)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, 128 ** -0.5, kv_scale)
    for splits in (None, 16, 64):
        out = gpu.paged_attention(q, k_cache, v_cache, meta, 128 ** -0.5, kv_scale, num_splits=splits)
        assert rel_err(out, ref) < 2e-2, splits


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("block_n,num_warps", [(32, 4), (128, 4), (64, 8)])
def test_paged_decode_tiles(kv_dtype, block_n, num_warps):
    dtype = torch.float16
    q, k_cache, v_cache, kv_scale, meta = make_batch([(1, c) for c in (1, 100, 777, 64)], 32, 8, 128, 16, dtype,
                                                     kv_dtype, seed=5)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, 0.1, kv_scale)
    for splits in (1, 5):
        out = gpu.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1, kv_scale,
                                         num_splits=splits, block_n=block_n, num_warps=num_warps)
        assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("config", [(128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3), (16, 64, 4, 3)])
def test_paged_prefill_tiles(config):
    q, k_cache, v_cache, kv_scale, meta = make_batch([(300, 300), (17, 500), (1, 40), (129, 129)], 16, 4, 128, 32,
                                                     torch.float16, None, seed=21)
    out = gpu.paged_prefill_attention(q, k_cache, v_cache, meta, 0.09, kv_scale, config=config)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, 0.09, kv_scale)
    assert rel_err(out, ref) < 5e-3


PREFILL_CASES = [  # (nq, nkv, d, tpb, (query_len, context_len) per sequence)
    (32, 8, 128, 32, [(37, 37), (100, 300), (1, 50), (200, 200), (129, 1000)]),
    (8, 8, 64, 16, [(16, 16), (3, 40), (64, 64)]),
    (12, 4, 128, 64, [(300, 300), (17, 500)]),
    (4, 2, 16, 16, [(5, 5), (1, 9), (33, 60)]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_paged_prefill(dtype, kv_dtype, case):
    skip_interpreted_bf16_dot(dtype)
    nq, nkv, d, tpb, seqs = PREFILL_CASES[case]
    q, k_cache, v_cache, kv_scale, meta = make_batch(seqs, nq, nkv, d, tpb, dtype, kv_dtype, seed=10 + case)
    out = gpu.paged_attention(q, k_cache, v_cache, meta, d ** -0.5, kv_scale)
    ref = reference.paged_attention(q, k_cache, v_cache, meta, d ** -0.5, kv_scale)
    assert rel_err(out, ref) < attn_tol(dtype, kv_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_store_kv_cache(dtype, kv_dtype):
    if kv_dtype == torch.float8_e4m3fn and not fp8_writes_ok():
        pytest.skip("interpreter e4m3 conversion")
    seqs = [(37, 37), (1, 50), (16, 100)]
    _, k_cache, v_cache, kv_scale, meta = make_batch(seqs, 8, 4, 64, 16, dtype, kv_dtype, seed=3)
    g = gen(4)
    tokens = int(meta.query_start[-1])
    k = randn(tokens, 4, 64, g=g, dtype=dtype, scale=2)
    v = randn(tokens, 4, 64, g=g, dtype=dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv_cache(k, v, k_ref, v_ref, meta, kv_scale)
    gpu.store_kv_cache(k, v, k_cache, v_cache, meta, kv_scale)
    if not bit_exact(dtype) and kv_dtype is None:
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        return
    assert torch.equal(k_cache.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_ref.view(torch.uint8))
    # padded rows (slot -1) write nothing
    meta.slot_mapping[:] = -1
    before = k_cache.clone()
    gpu.store_kv_cache(k * 3, v, k_cache, v_cache, meta, kv_scale)
    assert torch.equal(k_cache.view(torch.uint8), before.view(torch.uint8))


# ------------------------------------------------------------------------------------------------ GEMMs

GEMM_SHAPES = [(1, 256, 512), (5, 384, 256), (16, 512, 1024), (64, 256, 384), (200, 640, 512)]
if not INTERPRET:
    GEMM_SHAPES += [(1, 6144, 4096), (33, 4096, 14336), (256, 14336, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_awq(dtype, m, n, k, group_size):
    skip_interpreted_bf16_dot(dtype)
    g = gen(m + n + k + group_size)
    w = torch.randn(n, k, generator=g) * 0.05
    s = torch.rand(k, generator=g) + 0.5
    t = quantize_awq(w, group_size, s, dtype)
    packed = gpu.repack_awq(t["weight"].to(DEVICE), t["weights_scaling_factor"].to(DEVICE), dtype)
    x = randn(m, k, g=g, dtype=dtype)
    bias = randn(n, g=g, dtype=dtype) if m % 2 else None
    pre = t["prequant_scaling_factor"].to(DEVICE)
    out = gpu.int4_linear(x, packed, bias, pre_quant_scale=pre)
    # the runtime's weight: int4 * group scale in the model dtype, rounded once (LlamaModel Linear.load)
    scales = t["weights_scaling_factor"].to(dtype).repeat_interleave(group_size, dim=1)
    w_rt = (unpack_int4(t["weight"]).float() * scales.float()).to(dtype).to(DEVICE)
    ref = F.linear((x * pre).float(), w_rt.float(), None if bias is None else bias.float())
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < tol(1e-2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 64])
def test_int4_per_channel(dtype, m):
    skip_interpreted_bf16_dot(dtype)
    g = gen(m)
    w = torch.randn(256, 512, generator=g)
    q, scale = weight_only_quantize(w, 4, dtype)
    packed = gpu.repack_int4_per_channel(q.to(DEVICE), scale.to(DEVICE), dtype)
    x = randn(m, 512, g=g, dtype=dtype)
    out = gpu.int4_linear(x, packed)
    ref = F.linear(x.float(), (q.float() * scale.float()[:, None]).to(dtype).float().to(DEVICE))
    assert rel_err(out, ref) < tol(1e-2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES + [(3, 130, 200)])
def test_int8_weight_only(dtype, m, n, k):
    skip_interpreted_bf16_dot(dtype)
    g = gen(m * n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    q, scale = weight_only_quantize(w, 8, dtype)
    x = randn(m, k, g=g, dtype=dtype)
    bias = randn(n, g=g, dtype=dtype) if m % 2 else None
    out = gpu.int8_linear(x, q.to(DEVICE), scale.to(DEVICE), bias)
    w_rt = (q.float() * scale.float()[:, None]).to(dtype).float().to(DEVICE)
    ref = F.linear(x.float(), w_rt, None if bias is None else bias.float())
    assert out.dtype == dtype and rel_err(out, ref) < tol(1e-2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("backend", ["triton", "scaled_mm"])
def test_fp8(dtype, m, n, k, backend):
    skip_interpreted_bf16_dot(dtype)
    if not fp8_writes_ok():
        pytest.skip("torch._scaled_mm needs CUDA; interpreter e4m3 conversion")
    g = gen(m + n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = randn(m, k, g=g, dtype=dtype, scale=2)
    t = {name: v.to(DEVICE) for name, v in quantize_fp8_weight(w, float(x.abs().max()) * 0.8).items()}
    bias = randn(n, g=g, dtype=dtype) if m % 2 else None
    out = gpu.fp8_linear(x, t["weight"], t["activation_scaling_factor"], t["weights_scaling_factor"], bias,
                         backend=backend)
    ref = reference.quantized_linear(x.float(), t["weight"].float(), None if bias is None else bias.float(), None,
                                     t["activation_scaling_factor"], t["weights_scaling_factor"])
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, ref) < tol(1e-2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_matches_reference(dtype):
    if not fp8_writes_ok():
        pytest.skip("interpreter e4m3 conversion")
    g = gen(1)
    x = randn(7, 300, g=g, dtype=dtype, scale=100)
    scale = torch.tensor([0.17], device=DEVICE)
    ours = gpu.quantize_fp8(x, scale)
    assert torch.equal(ours.view(torch.uint8), to_fp8(x, scale).view(torch.uint8))


GEMM_CONFIGS = [(1, 64, 4, 4, 1), (1, 128, 4, 4, 3), (1, 32, 4, 3, 2), (16, 32, 4, 4, 2), (32, 64, 4, 4, 1),
                (64, 128, 4, 3, 2), (128, 64, 4, 3, 1), (128, 256, 8, 3, 1)]


@pytest.mark.parametrize("config", GEMM_CONFIGS)
@pytest.mark.parametrize("m", [1, 3, 20, 70])
def test_gemm_configs(config, m):
    """Every tile config the benchmark may pick (GEMV and tensor-core forms, split-K or not) is correct."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    if INTERPRET and config[0] >= 64:
        pytest.skip("slow under the interpreter")
    g = gen(m + config[1])
    n, k = 320, 512
    w = torch.randn(n, k, generator=g) * 0.05
    x = randn(m, k, g=g, dtype=dtype)
    bias = randn(n, g=g, dtype=dtype)
    t = quantize_awq(w, 128, None, dtype)
    packed = gpu.repack_awq(t["weight"].to(DEVICE), t["weights_scaling_factor"].to(DEVICE), dtype)
    w4 = (unpack_int4(t["weight"]).float() * t["weights_scaling_factor"].to(dtype).float()
          .repeat_interleave(128, dim=1)).to(dtype).float().to(DEVICE)
    out = gpu.int4_linear(x, packed, bias, config=config)
    assert rel_err(out, F.linear(x.float(), w4, bias.float())) < tol(1e-2, dtype)
    q, scale = weight_only_quantize(w, 8, dtype)
    out = gpu.int8_linear(x, q.to(DEVICE), scale.to(DEVICE), bias, config=config)
    w8 = (q.float() * scale.float()[:, None]).to(dtype).float().to(DEVICE)
    assert rel_err(out, F.linear(x.float(), w8, bias.float())) < tol(1e-2, dtype)
    if fp8_writes_ok():
        f = {name: v.to(DEVICE) for name, v in quantize_fp8_weight(w, float(x.abs().max())).items()}
        out = gpu.fp8_linear(x, f["weight"], f["activation_scaling_factor"], f["weights_scaling_factor"], bias,
                             backend="triton", config=config)
        ref = reference.quantized_linear(x.float(), f["weight"].float(), bias.float(), None,
                                         f["activation_scaling_factor"], f["weights_scaling_factor"])
        assert rel_err(out, ref) < tol(1e-2, dtype)
