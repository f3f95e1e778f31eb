"""Build-side hardening (issue #20): filesystem errors, stale staging folders, what --force may replace, reads
confined to the checkpoint folder, and the HF config / weight shapes checked before anything is written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.checkpoint.tiny import make_tiny_model
from builder.cli import main

PROJECT = Path(__file__).resolve().parents[1]
SMALL = ["--dtype", "float32", "--max-seq-len", "128", "--max-input-len", "64", "--max-num-tokens", "128",
         "--max-batch-size", "4", "--kv-cache-memory-mb", "4", "--eval", "off"]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """One tiny Llama checkpoint for the module (read-only: tests that damage it take a copy)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # its stderr handler binds now, not to one test's captured (then closed) stream
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "tiny-llama")


@pytest.fixture()
def hf(tiny_llama, tmp_path) -> Path:
    """A private copy of the tiny Llama that a test may change."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "hf"))


def run_build(capsys, *args: str) -> tuple[int, str]:
    """`builder build ARGS` in this process: (exit code, stderr)."""
    code = main(["build", *args])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one `error: ` line on stderr that names every needle; returns that line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def leftovers(output: Path) -> list[str]:
    """Staging / trash folders of `output` beside it."""
    if not output.parent.is_dir():
        return []
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


def digest(folder: Path) -> str:
    """Hash of every path and file content under folder (symlinks by target)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def edit_config(folder: Path, **changes) -> None:
    """Set (or with value ... delete) keys of folder/config.json."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def replace_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite tensors in the shards that hold them (shapes may change)."""
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    for shard in sorted({weight_map[name] for name in tensors}):
        data = load_file(folder / shard)
        data.update({name: t for name, t in tensors.items() if weight_map[name] == shard})
        save_file(data, folder / shard, metadata={"format": "pt"})


def move_outside(folder: Path, name: str, outside: Path) -> Path:
    """Move folder/name to outside/name and leave a symlink to it; returns the outside path."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / name
    shutil.move(str(folder / name), str(target))
    (folder / name).symlink_to(target)
    return target


# ---- 1. filesystem errors are one line ------------------------------------------------------------------------------

def test_output_under_a_regular_file(capsys, tmp_path):
    """--output FILE/repo and FILE/sub/repo: the line names the file that is in the way."""
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder\n")
    for output in (blocker / "repo", blocker / "sub" / "repo"):
        line = assert_one_line(*run_build(capsys, "--output", str(output), *SMALL), str(blocker), "not a folder")
        assert "internal error" not in line
    assert blocker.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


def test_output_is_a_regular_file(capsys, tmp_path):
    """--output naming a file is refused, with --force too, and the file stays."""
    target = tmp_path / "repo"
    target.write_text("mine\n")
    for force in ([], ["--force"]):
        assert_one_line(*run_build(capsys, "--output", str(target), *force, *SMALL), str(target))
    assert target.read_text() == "mine\n"


def test_output_name_too_long(capsys, tmp_path):
    """A name over NAME_MAX, and one that fits but leaves no room for the staging folder beside it."""
    for length in (300, 250):
        output = tmp_path / ("r" * length)
        assert_one_line(*run_build(capsys, "--output", str(output), *SMALL), "too long", "--output")
    assert list(tmp_path.iterdir()) == []


def test_output_in_unwritable_place(capsys):
    """A folder even root cannot create (sysfs refuses mkdir with EPERM): one line, not a traceback."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs")
    output = Path("/sys/builder-test-output/repo")
    assert_one_line(*run_build(capsys, "--output", str(output), *SMALL), "/sys", "--output")


def test_filesystem_error_during_build_is_one_line(capsys, tmp_path, monkeypatch):
    """An OSError while staging (disk full) becomes a BuilderError line that says what failed."""
    import builder.checkpoint.hf as hf_module

    def full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_module.shutil, "copy2", full)
    output = tmp_path / "repo"
    line = assert_one_line(*run_build(capsys, "--output", str(output), *SMALL), "No space left on device")
    assert "internal error" not in line
    assert not output.exists() and leftovers(output) == []


# ---- 2. stale staging folders -------------------------------------------------------------------------------------

def _wait_for_staging(output: Path, process: subprocess.Popen, timeout: float = 180.0) -> Path:
    """The `.NAME.building-*` folder of a running build, once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [output.parent / n for n in leftovers(output) if ".building-" in n]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the build never created its staging folder")


def test_sigkilled_build_leaves_nothing_for_the_next_build(capsys, tmp_path):
    """A live build's staging folder survives a concurrent build of the same output; once that build is killed
    with SIGKILL, the next build removes its folder and succeeds."""
    output = tmp_path / "repo"
    first = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "--output", str(output), *SMALL],
                             cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        staging = _wait_for_staging(output, first)
        first.send_signal(signal.SIGSTOP)  # alive but not progressing
        code, err = run_build(capsys, "--output", str(output), *SMALL)
        assert code == 0, err
        assert staging.is_dir(), "a live build's staging folder was deleted"
        first.kill()
        first.wait(timeout=60)
        assert staging.is_dir()  # what SIGKILL leaves behind
        code, err = run_build(capsys, "--output", str(output), "--force", *SMALL)
        assert code == 0, err
        assert not staging.exists()
        assert leftovers(output) == []
        assert (output / "tensorrt_llm" / "1" / "engine" / "rank0.safetensors").is_file()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _dead_owner_tag() -> str:
    """The owner tag a process that has exited wrote into its folder names."""
    done = subprocess.run([sys.executable, "-c", "from builder.build import owner_tag; print(owner_tag())"],
                          cwd=PROJECT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_stale_trash_and_staging_folders_removed_others_kept(capsys, tmp_path):
    """Trash (.NAME.old-*) and staging folders of dead builders go; folders whose owner is alive, or that this
    version did not name (no owner tag), stay."""
    from builder.build import owner_tag

    output = tmp_path / "repo"
    dead = _dead_owner_tag()
    stale = [tmp_path / f".repo.old-{dead}-1a2b3c4d", tmp_path / f".repo.building-{dead}-zz9"]
    alive = [tmp_path / f".repo.building-{owner_tag()}-q1w2", tmp_path / ".repo.building-legacy12",
             tmp_path / f".other.building-{dead}-x1"]
    for folder in stale + alive:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "file").write_text("x")
    code, err = run_build(capsys, "--output", str(output), *SMALL)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in alive)


# ---- 3. --force replaces only a builder repository ------------------------------------------------------------------

def test_force_refuses_a_folder_of_user_files(capsys, tmp_path):
    """--force onto a folder that builder did not write is refused and the folder is untouched."""
    output = tmp_path / "mine"
    (output / "docs").mkdir(parents=True)
    (output / "notes.txt").write_text("precious\n")
    (output / "docs" / "a.md").write_text("# a\n")
    before = digest(output)
    line = assert_one_line(*run_build(capsys, "--output", str(output), "--force", *SMALL), str(output),
                           "not a builder repository")
    assert "notes.txt" in line
    assert digest(output) == before and leftovers(output) == []


def test_force_refuses_a_builder_repository_holding_user_files(capsys, tmp_path):
    """A repository builder wrote, to which the user added a file, is not replaced either."""
    output = tmp_path / "repo"
    assert run_build(capsys, "--output", str(output), *SMALL)[0] == 0
    (output / "my-notes.txt").write_text("precious\n")
    before = digest(output)
    assert_one_line(*run_build(capsys, "--output", str(output), "--force", *SMALL), "my-notes.txt")
    assert digest(output) == before


def test_user_folder_without_force_does_not_suggest_force(capsys, tmp_path):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("precious\n")
    line = assert_one_line(*run_build(capsys, "--output", str(output), *SMALL), "not a builder repository")
    assert "pass --force" not in line
    assert (output / "notes.txt").read_text() == "precious\n"


def test_force_replaces_an_empty_folder(capsys, tmp_path):
    output = tmp_path / "repo"
    output.mkdir()
    code, err = run_build(capsys, "--output", str(output), "--force", *SMALL)
    assert code == 0, err
    assert (output / "ensemble" / "config.pbtxt").is_file()


@pytest.mark.parametrize("backend", ["portable", "tensorrtllm", "trtllm-pytorch"])
def test_force_replaces_a_builder_repository_of_every_backend(capsys, tmp_path, tiny_llama, backend):
    """What each backend writes is recognised as a builder repository, also after a build of another backend."""
    output = tmp_path / "repo"
    other = "portable" if backend != "portable" else "trtllm-pytorch"
    for step in (backend, backend, other):
        code, err = run_build(capsys, "--model", str(tiny_llama), "--output", str(output), "--force",
                              "--backend", step, *SMALL)
        assert code == 0, err
    assert leftovers(output) == []


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("relation", ["same", "inside", "parent", "symlink"])
def test_output_overlapping_the_model_is_refused(capsys, tmp_path, tiny_llama, relation, force):
    """--output equal to, inside, or above --model (symlinks resolved) is refused before anything is written."""
    work = tmp_path / "work"
    model = Path(shutil.copytree(tiny_llama, work / "ckpt"))
    link = tmp_path / "alias"
    link.symlink_to(model)
    output = {"same": model, "inside": model / "repo", "parent": work, "symlink": link}[relation]
    before, listing = digest(model), sorted(p.name for p in tmp_path.rglob("*"))
    args = ["--model", str(model), "--output", str(output), *SMALL] + (["--force"] if force else [])
    assert_one_line(*run_build(capsys, *args), "--model")
    assert digest(model) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


# ---- 4. nothing outside the checkpoint folder is read ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "SHARD",
                                  "generation_config.json", "special_tokens_map.json", INDEX])
def test_symlink_leaving_the_checkpoint_is_refused(capsys, tmp_path, hf, name):
    """A checkpoint file that is a symlink to a file outside the folder is refused, naming the file."""
    if name == "SHARD":
        name = sorted(hf.glob("*.safetensors"))[0].name
    if not (hf / name).exists():
        (hf / name).write_text("{}\n")
    move_outside(hf, name, tmp_path / "elsewhere")
    output = tmp_path / "repo"
    line = assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), *SMALL), name,
                           "outside")
    assert str(tmp_path / "elsewhere") in line
    assert not output.exists() and leftovers(output) == []


@pytest.mark.parametrize("absolute", [False, True])
def test_index_entry_leaving_the_checkpoint_is_refused(capsys, tmp_path, hf, absolute):
    """A weight_map entry naming a file outside the folder (../x or /abs/x) is refused."""
    index = json.loads((hf / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(str(hf / shard), str(outside / shard))
    entry = str(outside / shard) if absolute else f"../elsewhere/{shard}"
    index["weight_map"] = {k: (entry if v == shard else v) for k, v in index["weight_map"].items()}
    (hf / INDEX).write_text(json.dumps(index))
    output = tmp_path / "repo"
    assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), *SMALL), shard, "outside")
    assert not output.exists()


def test_tokenizer_file_leaving_the_checkpoint_is_refused(capsys, tmp_path, hf):
    """tokenizer_config.json's tokenizer_file naming a file outside the folder is refused."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy2(hf / "tokenizer.json", outside / "tokenizer.json")
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = str(outside / "tokenizer.json")
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    output = tmp_path / "repo"
    assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), *SMALL), "tokenizer_file",
                    "outside")
    assert not output.exists()


@pytest.mark.parametrize("absolute", [False, True])
def test_tokenizer_file_inside_the_checkpoint_is_fine(capsys, tmp_path, hf, absolute):
    """A tokenizer_file inside the folder is accepted; the repository's copy drops it (it would name hf's file)."""
    config = json.loads((hf / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = str(hf / "tokenizer.json") if absolute else "tokenizer.json"
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = run_build(capsys, "--model", str(hf), "--output", str(tmp_path / "repo"), *SMALL)
    assert code == 0, err
    copied = json.loads((tmp_path / "repo" / "preprocessing" / "1" / "tokenizer" / "tokenizer_config.json").read_text())
    assert "tokenizer_file" not in copied and copied["eos_token"] == config["eos_token"]


def test_chat_template_symlink_leaving_the_checkpoint_is_refused(capsys, tmp_path, hf):
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    move_outside(hf, "chat_template.jinja", tmp_path / "elsewhere")
    output = tmp_path / "repo"
    assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), *SMALL), "chat_template.jinja",
                    "outside")


def test_symlinks_inside_the_checkpoint_are_fine(capsys, tmp_path, hf):
    """Symlinks that stay inside the folder (here into a subfolder) build as usual."""
    (hf / "real").mkdir()
    for name in ("config.json", "tokenizer.json", sorted(hf.glob("*.safetensors"))[0].name):
        shutil.move(str(hf / name), str(hf / "real" / name))
        (hf / name).symlink_to(Path("real") / name)
    code, err = run_build(capsys, "--model", str(hf), "--output", str(tmp_path / "repo"), *SMALL)
    assert code == 0, err


def _hf_cache_snapshot(src: Path, cache: Path) -> Path:
    """src laid out as the HF hub cache does: snapshots/<rev>/<name> -> ../../blobs/<sha256>."""
    repo = cache / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy2(path, blobs / blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def test_hf_cache_snapshot_builds(capsys, tmp_path, tiny_llama):
    """A hub-cache snapshot folder (symlinks into its repository's blobs/) is accepted (docs/decisions.md)."""
    snapshot = _hf_cache_snapshot(tiny_llama, tmp_path / "hub")
    code, err = run_build(capsys, "--model", str(snapshot), "--output", str(tmp_path / "repo"), *SMALL)
    assert code == 0, err


def test_hf_cache_snapshot_symlink_leaving_blobs_is_refused(capsys, tmp_path, tiny_llama):
    snapshot = _hf_cache_snapshot(tiny_llama, tmp_path / "hub")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy2(snapshot / "config.json", outside / "config.json")
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(Path("..") / ".." / ".." / ".." / "elsewhere" / "config.json")
    assert_one_line(*run_build(capsys, "--model", str(snapshot), "--output", str(tmp_path / "repo"), *SMALL),
                    "config.json", "outside")


# ---- 5. the HF config and weight shapes are checked before anything is written -----------------------------------

BAD_CONFIGS = [
    ("hidden_size", 0), ("hidden_size", -64), ("hidden_size", "64"), ("hidden_size", [64]), ("hidden_size", True),
    ("hidden_size", 64.5), ("num_attention_heads", 0), ("num_attention_heads", "four"), ("num_key_value_heads", 3),
    ("num_key_value_heads", 0), ("num_hidden_layers", 0), ("num_hidden_layers", None), ("intermediate_size", -1),
    ("vocab_size", 0), ("vocab_size", "768"), ("head_dim", 0), ("head_dim", -16), ("rope_theta", "abc"),
    ("rope_theta", 0), ("rope_theta", -10000.0), ("rope_theta", math.inf), ("rope_theta", math.nan),
    ("rms_norm_eps", "abc"), ("rms_norm_eps", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", math.nan),
    ("rms_norm_eps", [1e-5]), ("max_position_embeddings", 10**12), ("max_position_embeddings", 0),
    ("max_position_embeddings", "512"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0}), ("rope_scaling", {"rope_type": "linear", "factor": "x"}),
    ("rope_scaling", {"rope_type": "dynamic", "factor": math.inf}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    ("rope_scaling", "linear"), ("rope_scaling", {"rope_type": "linear"}), ("sliding_window", "abc"),
    ("tie_word_embeddings", "false"),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS, ids=[f"{f}={v!r}"[:40] for f, v in BAD_CONFIGS])
def test_bad_config_field_is_one_line(capsys, tmp_path, hf, field, value):
    """Each malformed config.json field gives one line naming the field; nothing is written."""
    edit_config(hf, **{field: value})
    output = tmp_path / "repo"
    line = assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), *SMALL), field,
                           "config.json")
    assert "internal error" not in line and "build failed" not in line
    assert not output.exists() and leftovers(output) == []


def test_heads_must_divide_hidden_without_head_dim(capsys, tmp_path, hf):
    edit_config(hf, head_dim=..., num_attention_heads=5, num_key_value_heads=5)
    assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(tmp_path / "repo"), *SMALL),
                    "hidden_size", "num_attention_heads")


def test_huge_max_position_embeddings_with_explicit_max_seq_len_still_refused(capsys, tmp_path, hf):
    """max_seq_len defaults from max_position_embeddings: 10**12 must not reach serve time either way."""
    edit_config(hf, max_position_embeddings=10**12)
    args = ["--model", str(hf), "--output", str(tmp_path / "repo"), "--dtype", "float32", "--kv-cache-memory-mb", "4"]
    assert_one_line(*run_build(capsys, *args), "max_position_embeddings")


@pytest.mark.parametrize("backend", ["portable", "tensorrtllm", "trtllm-pytorch"])
@pytest.mark.parametrize("damage", ["q_proj", "mlp", "norm"])
def test_weight_shape_against_config(capsys, tmp_path, hf, backend, damage):
    """A weight of consistent but wrong shape is refused, naming the tensor, for every backend."""
    h, i, layers = 64, 128, 2
    if damage == "q_proj":
        tensors = {"model.layers.1.self_attn.q_proj.weight": torch.zeros(h, h + 8)}
    elif damage == "norm":
        tensors = {"model.layers.0.input_layernorm.weight": torch.ones(h + 8)}
    else:  # every layer's MLP narrower than intermediate_size, consistently
        tensors = {}
        for layer in range(layers):
            p = f"model.layers.{layer}.mlp."
            tensors.update({p + "gate_proj.weight": torch.zeros(i - 32, h), p + "up_proj.weight": torch.zeros(i - 32, h),
                            p + "down_proj.weight": torch.zeros(h, i - 32)})
    replace_tensors(hf, tensors)
    output = tmp_path / "repo"
    needle = {"q_proj": "q_proj", "norm": "input_layernorm", "mlp": "intermediate_size"}[damage]
    line = assert_one_line(*run_build(capsys, "--model", str(hf), "--output", str(output), "--backend", backend,
                                      *SMALL), needle)
    assert "internal error" not in line
    assert not output.exists() and leftovers(output) == []


def test_config_checked_before_staging(tmp_path, hf, monkeypatch):
    """A bad config (or misshaped weight) is refused before the staging folder is made."""
    import builder.build as build_module
    from builder.build import BuildOptions, build
    from builder.errors import BuilderError

    made = []
    real = build_module.tempfile.mkdtemp
    monkeypatch.setattr(build_module.tempfile, "mkdtemp", lambda *a, **k: made.append(1) or real(*a, **k))
    edit_config(hf, rms_norm_eps="abc")
    with pytest.raises(BuilderError, match="rms_norm_eps"):
        build(BuildOptions(output=tmp_path / "repo", model=str(hf)))
    edit_config(hf, rms_norm_eps=1e-5)
    replace_tensors(hf, {"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 72)})
    with pytest.raises(BuilderError, match="o_proj"):
        build(BuildOptions(output=tmp_path / "repo", model=str(hf)))
    assert made == []
