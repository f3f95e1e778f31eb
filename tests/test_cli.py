"""`builder build` from the command line: bad input gives one readable line, a non-zero exit and no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUILDER = [sys.executable, "-m", "builder.cli"]
SMALL = ["--max-seq-len", "128", "--kv-cache-memory-mb", "4"]


def run_builder(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, capturing output."""
    return subprocess.run(BUILDER + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture()
def hf_copy(tiny_checkpoints, tmp_path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoints["LlamaForCausalLM"], tmp_path / "hf"))


def assert_clean_failure(result: subprocess.CompletedProcess, output: Path, needle: str) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback, nothing left behind."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


def test_build_tiny_llama_default_and_output_exists(tmp_path):
    """The default model builds; a second build into the same folder needs --force."""
    out = tmp_path / "repo"
    first = run_builder("build", "--output", str(out), *SMALL)
    assert first.returncode == 0, first.stderr
    assert (out / "tensorrt_llm" / "1" / "engine" / "rank0.safetensors").exists()
    marker = out / "ensemble" / "config.pbtxt"
    before = marker.stat().st_mtime_ns
    again = run_builder("build", "--output", str(out), *SMALL)
    assert again.returncode == 2 and "--force" in again.stderr and marker.stat().st_mtime_ns == before
    forced = run_builder("build", "--output", str(out), "--force", "--preprocessing-instances", "3",
                         "--max-responses-per-second", "500", *SMALL)
    assert forced.returncode == 0, forced.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]
    assert "{ count: 3 kind: KIND_CPU }" in (out / "preprocessing" / "config.pbtxt").read_text()
    assert 'key: "max_responses_per_second" value: { string_value: "500" }' in \
        (out / "tensorrt_llm" / "config.pbtxt").read_text()


def test_unknown_architecture(hf_copy, tmp_path):
    """An unsupported architecture names the supported ones."""
    config = json.loads((hf_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (hf_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "repo"
    result = run_builder("build", "--model", str(hf_copy), "--output", str(out), *SMALL)
    assert_clean_failure(result, out, "GPT2LMHeadModel")
    assert "LlamaForCausalLM" in result.stderr and "Qwen2ForCausalLM" in result.stderr


def test_corrupt_safetensors(hf_copy, tmp_path):
    """A truncated weights file is named in the error."""
    shard = sorted(hf_copy.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "repo"
    assert_clean_failure(run_builder("build", "--model", str(hf_copy), "--output", str(out), *SMALL), out, shard.name)


def test_missing_tokenizer(hf_copy, tmp_path):
    """A checkpoint without tokenizer files is refused before any conversion."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (hf_copy / name).unlink(missing_ok=True)
    out = tmp_path / "repo"
    assert_clean_failure(run_builder("build", "--model", str(hf_copy), "--output", str(out), *SMALL), out, "tokenizer")


def test_missing_model_folder(tmp_path):
    """A --model that is neither a folder nor a built-in model is a one-line error."""
    out = tmp_path / "repo"
    assert_clean_failure(run_builder("build", "--model", str(tmp_path / "nope"), "--output", str(out)), out, "nope")


def test_bad_build_option(tmp_path):
    """Inconsistent limits are refused with the option's name."""
    out = tmp_path / "repo"
    result = run_builder("build", "--output", str(out), "--max-seq-len", "64", "--max-input-len", "128")
    assert_clean_failure(result, out, "max_input_len")
    result = run_builder("build", "--output", str(out), "--preprocessing-instances", "0")
    assert_clean_failure(result, out, "preprocessing_instances")
