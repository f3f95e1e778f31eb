"""Tests for builder.checkpoint: tiny models, HF validation/streaming, TRT-LLM conversion, error messages."""

from __future__ import annotations

import re

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from builder.checkpoint.convert import convert_checkpoint
from builder.checkpoint.hf import HFCheckpoint, check_tokenizer, copy_tokenizer, read_hf_config
from builder.checkpoint.safetensors_io import write_streaming
from builder.checkpoint.tiny import make_tiny_model
from builder.checkpoint.trtllm import model_config_from_hf
from builder.config import BuildSettings, EngineConfig
from builder.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
TEXT = "Hello  world,\n café naïve Ελληνικά 中文 🚀 ❤️ end  "
H, V, I, D, NQ, NKV = 64, 768, 128, 16, 4, 2
CONFIG_KEYS = {"architecture", "dtype", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
               "position_embedding_type", "max_position_embeddings", "rotary_base", "mapping", "quantization"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per architecture, shared by the module (read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


def _copy(src: Path, dst: Path) -> Path:
    """A writable copy of a tiny checkpoint for tests that damage it."""
    shutil.copytree(src, dst)
    return dst


def _digest(folder: Path) -> str:
    """Hash of every file name and content in a folder."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _expected(attn_bias: bool) -> dict[str, tuple[int, ...]]:
    """Names/shapes docs/contracts.md promises for the tiny shapes (written out independently of trtllm.py)."""
    out = {"transformer.vocab_embedding.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(2):
        p = f"transformer.layers.{i}."
        out.update({p + "input_layernorm.weight": (H,), p + "attention.qkv.weight": ((NQ + 2 * NKV) * D, H),
                    p + "attention.dense.weight": (H, NQ * D), p + "post_layernorm.weight": (H,),
                    p + "mlp.fc.weight": (I, H), p + "mlp.gate.weight": (I, H), p + "mlp.proj.weight": (H, I)})
        if attn_bias:
            out[p + "attention.qkv.bias"] = ((NQ + 2 * NKV) * D,)
    return out


# --- tiny models ---------------------------------------------------------------------------------------------------

def test_tiny_is_deterministic_and_sharded(tmp_path, tiny):
    a = make_tiny_model(tmp_path / "a")
    assert _digest(a) == _digest(tiny["LlamaForCausalLM"])
    b = make_tiny_model(tmp_path / "b", seed=1)
    assert (a / "model.safetensors.index.json").read_bytes() == (b / "model.safetensors.index.json").read_bytes()
    assert _digest(a) != _digest(b)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_tokenizer_and_config(tiny, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[arch], local_files_only=True)
    cfg = json.loads((tiny[arch] / "config.json").read_text())
    ids = tok(TEXT)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert cfg["vocab_size"] == len(tok) == V
    assert cfg["eos_token_id"] == tok.eos_token_id is not None
    assert cfg.get("bos_token_id") == tok.bos_token_id
    if arch == "Qwen2ForCausalLM":
        assert tok.bos_token_id is None and ids[0] != tok.eos_token_id and cfg["tie_word_embeddings"]
    else:
        assert ids[0] == tok.bos_token_id and not cfg["tie_word_embeddings"]
    if arch == "MistralForCausalLM":  # byte fallback: a rare character becomes <0x..> tokens
        assert "<0xCE>" in tok.convert_ids_to_tokens(tok("Ω")["input_ids"])


def test_qwen2_biases_are_nonzero(tiny):
    ckpt = HFCheckpoint(tiny["Qwen2ForCausalLM"])
    for x in "qkv":
        assert ckpt.get(f"model.layers.0.self_attn.{x}_proj.bias").abs().min() > 0


# --- conversion ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_convert_names_shapes_config(tmp_path, tiny, arch):
    engine_cfg = convert_checkpoint(tiny[arch], tmp_path, BuildSettings())
    qwen = arch == "Qwen2ForCausalLM"
    tensors = load_file(tmp_path / "rank0.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == _expected(attn_bias=qwen)
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert CONFIG_KEYS <= cfg.keys()
    assert cfg["architecture"] == arch and cfg["dtype"] == "float32"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (V, H, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]) == (NQ, NKV, D)
    assert (cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["rotary_base"]) == (I, 512, 10000.0)
    assert (cfg["hidden_act"], cfg["position_embedding_type"], cfg["norm_epsilon"]) == ("silu", "rope_gpt_neox", 1e-5)
    assert cfg["mapping"]["world_size"] == 1 and cfg["quantization"]["quant_algo"] is None
    assert cfg["attn_bias"] == qwen and cfg["tie_word_embeddings"] == qwen and cfg.get("qwen_type") == (
        "qwen2" if qwen else None)
    assert EngineConfig.load(tmp_path) == engine_cfg and engine_cfg.build.dtype == "float32"


@pytest.mark.parametrize("arch", ("LlamaForCausalLM", "Qwen2ForCausalLM"))
def test_convert_values(tmp_path, tiny, arch):
    convert_checkpoint(tiny[arch], tmp_path, BuildSettings())
    hf, out = HFCheckpoint(tiny[arch]), load_file(tmp_path / "rank0.safetensors")
    for layer in range(2):
        p, t = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        qkv = torch.cat([hf.get(f"{p}self_attn.{x}_proj.weight") for x in "qkv"])
        assert torch.equal(out[t + "attention.qkv.weight"], qkv)
        assert torch.equal(out[t + "mlp.fc.weight"], hf.get(p + "mlp.gate_proj.weight"))
        assert torch.equal(out[t + "mlp.gate.weight"], hf.get(p + "mlp.up_proj.weight"))
        assert torch.equal(out[t + "mlp.proj.weight"], hf.get(p + "mlp.down_proj.weight"))
        assert torch.equal(out[t + "attention.dense.weight"], hf.get(p + "self_attn.o_proj.weight"))
        assert torch.equal(out[t + "post_layernorm.weight"], hf.get(p + "post_attention_layernorm.weight"))
        if arch == "Qwen2ForCausalLM":
            bias = torch.cat([hf.get(f"{p}self_attn.{x}_proj.bias") for x in "qkv"])
            assert torch.equal(out[t + "attention.qkv.bias"], bias)
    head = "model.embed_tokens.weight" if arch == "Qwen2ForCausalLM" else "lm_head.weight"
    assert torch.equal(out["lm_head.weight"], hf.get(head))
    assert torch.equal(out["transformer.ln_f.weight"], hf.get("model.norm.weight"))


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_convert_dtype(tmp_path, tiny, dtype):
    cfg = convert_checkpoint(tiny["MistralForCausalLM"], tmp_path, BuildSettings(dtype=dtype))
    assert cfg.model.dtype == cfg.build.dtype == dtype
    with safe_open(tmp_path / "rank0.safetensors", framework="pt") as f:
        emb = f.get_tensor("transformer.vocab_embedding.weight")
        assert all(f.get_slice(k).get_dtype() == {"float16": "F16", "bfloat16": "BF16"}[dtype] for k in f.keys())
    ref = HFCheckpoint(tiny["MistralForCausalLM"]).get("model.embed_tokens.weight")
    assert torch.equal(emb, ref.to(getattr(torch, dtype)))


def test_auto_dtype_follows_checkpoint(tmp_path, tiny):
    hf = _copy(tiny["LlamaForCausalLM"], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    (hf / "config.json").write_text(json.dumps(cfg))
    assert convert_checkpoint(hf, tmp_path / "eng", BuildSettings()).model.dtype == "bfloat16"


def test_streaming_writer_loads_everywhere(tmp_path):
    tensors = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.ones(3, dtype=torch.bfloat16)),
               ("c", torch.full((1,), 2.5, dtype=torch.float16))]
    write_streaming(tmp_path / "x.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors], iter(tensors))
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors)


def test_rope_settings_from_hf_config():
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
            "num_hidden_layers": 1, "intermediate_size": 8, "max_position_embeddings": 64}
    assert model_config_from_hf({**base, "rope_theta": 5e5}, "float32").rotary_base == 5e5
    plain = model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "float32")
    assert (plain.rotary_base, plain.rotary_scaling, plain.head_size, plain.num_key_value_heads) == (1e6, None, 16, 4)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    cfg = model_config_from_hf({**base, "rope_parameters": {**llama3, "rope_theta": 5e5}}, "bfloat16")
    assert cfg.rotary_base == 5e5 and cfg.rotary_scaling == llama3
    old = model_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, "float16")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert model_config_from_hf({**base, "rope_scaling": yarn}, "bfloat16").rotary_scaling == yarn
    with pytest.raises(CheckpointError, match="rope scaling 'dynamic' is not supported yet"):  # at build, not serve
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "float32")
    assert old.rotary_scaling == {"type": "linear", "factor": 2.0}


# --- errors --------------------------------------------------------------------------------------------------------

def test_unknown_architecture(tmp_path, tiny):
    hf = _copy(tiny["LlamaForCausalLM"], tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        convert_checkpoint(hf, tmp_path / "eng", BuildSettings())


def test_bad_config_json(tmp_path, tiny):
    hf = _copy(tiny["LlamaForCausalLM"], tmp_path / "hf")
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_hf_config(hf)
    (hf / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_hf_config(hf)


def test_truncated_safetensors(tmp_path, tiny):
    hf = _copy(tiny["LlamaForCausalLM"], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*corrupt or truncated"):
        convert_checkpoint(hf, tmp_path / "eng", BuildSettings())
    assert not (tmp_path / "eng" / "rank0.safetensors").exists()


def test_missing_index_shard(tmp_path, tiny):
    hf = _copy(tiny["MistralForCausalLM"], tmp_path / "hf")
    shard = sorted(hf.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}.*download"):
        HFCheckpoint(hf)
    (hf / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        HFCheckpoint(hf)


def test_tokenizer_copy_and_missing(tmp_path, tiny):
    dest = tmp_path / "tok"
    copied = copy_tokenizer(tiny["MistralForCausalLM"], dest)
    assert "tokenizer.json" in copied and (dest / "tokenizer_config.json").is_file()
    hf = _copy(tiny["LlamaForCausalLM"], tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / f).unlink()
    for call in (lambda: check_tokenizer(hf), lambda: copy_tokenizer(hf, tmp_path / "tok2")):
        with pytest.raises(TokenizerError, match="no tokenizer files in .*copy tokenizer.json"):
            call()
    (hf / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="does not load"):
        check_tokenizer(hf)


def test_tiny_llama32_is_tied_with_llama3_rope(tmp_path):
    """tiny-llama3.2: no lm_head tensor (tied embeddings) and Llama 3.2's rope scaling, read back by the converter."""
    from safetensors import safe_open

    from builder.checkpoint.trtllm import model_config_from_hf

    hf_dir = make_tiny_model(tmp_path / "t", "tiny-llama3.2")
    names = set()
    for shard in hf_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), "float32")
    assert cfg.tie_word_embeddings
    assert cfg.rotary_scaling["rope_type"] == "llama3" and cfg.rotary_scaling["factor"] == 32.0


def test_unknown_tiny_model_lists_the_registry(tmp_path):
    from builder.models import TINY_MODELS

    assert len(TINY_MODELS) >= 5
    with pytest.raises(UnsupportedArchitectureError, match=re.escape(", ".join(TINY_MODELS))):
        make_tiny_model(tmp_path / "x", "tiny-gpt2")
