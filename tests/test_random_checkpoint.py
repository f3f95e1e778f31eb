"""scripts/make_random_checkpoint.py: a random-weight Llama checkpoint whose tokenizer matches its vocab size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_random_checkpoint.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run the script in a subprocess, capturing output."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def load_script():
    """Import the script as a module."""
    spec = importlib.util.spec_from_file_location("make_random_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random checkpoint made by the script (CPU, bfloat16)."""
    out = tmp_path_factory.mktemp("random") / "tiny"
    result = run_script("--shape", "tiny", "--out", str(out), "--device", "cpu", "--seed", "0")
    assert result.returncode == 0, result.stderr
    return out


def test_tokenizer_matches_vocab(checkpoint):
    """AutoTokenizer loads the folder with exactly vocab_size tokens, and builder's loaders accept it."""
    from transformers import AutoTokenizer

    from builder.checkpoint.hf import check_tokenizer
    from builder.triton.detokenizer import load_tokenizer

    config = json.loads((checkpoint / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    assert len(tokenizer) == config["vocab_size"] == 768
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    assert tokenizer.encode("hello", add_special_tokens=True)[0] == tokenizer.bos_token_id
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json"):
        assert (checkpoint / name).is_file(), name
    check_tokenizer(checkpoint)
    assert len(load_tokenizer(checkpoint)) == 768


def test_transformers_loads_random_weights(checkpoint):
    """LlamaForCausalLM loads every tensor; linears/embeddings are N(0, 0.02), norms are ones, lm_head untied."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert model.config.num_hidden_layers == 2 and model.config.tie_word_embeddings is False
    assert params["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    for name, param in params.items():
        values = param.detach().float()
        if name.endswith("norm.weight"):
            assert torch.equal(values, torch.ones_like(values)), name
        else:
            assert abs(values.std().item() - 0.02) < 0.004, name
            assert abs(values.mean().item()) < 0.003, name
    assert not torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[766, 10, 20]])).logits
    assert logits.shape == (1, 3, 768) and torch.isfinite(logits).all()


def test_existing_output_needs_force(checkpoint):
    """A second run without --force exits 2 with one line on stderr and leaves the folder alone."""
    before = sorted(p.name for p in checkpoint.iterdir())
    result = run_script("--shape", "tiny", "--out", str(checkpoint), "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--force" in lines[0], result.stderr
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".tiny.tmp-")]


def test_tokenizer_padding_and_sharding():
    """Smaller tokenizers are padded with decodable non-special fillers; shards respect the size limit in order."""
    import torch

    module = load_script()
    tokenizer = module.build_padded_tokenizer(1000, 512)
    assert len(tokenizer) == 1000
    assert tokenizer.decode([999, 768], skip_special_tokens=True) == "<|filler_999|><|filler_768|>"
    with pytest.raises(module.UsageError):
        module.build_padded_tokenizer(100, 512)
    plan = module.weight_plan(module.model_shape("tiny", None))
    shards = module.plan_shards(plan, torch.bfloat16, max_bytes=100_000)
    assert len(shards) > 1 and [entry for shard in shards for entry in shard] == plan
    for shard in shards:
        size = sum(module.nbytes(shape, torch.bfloat16) for _, shape in shard)
        assert size <= 100_000 or len(shard) == 1
