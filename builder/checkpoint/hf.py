"""Read and validate a Hugging Face checkpoint folder: config, safetensors shards (streamed), tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from builder.config import SUPPORTED_ARCHITECTURES
from builder.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja")
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")  # at least one must exist
TOKENIZER_EXTRA = ("config.json", "generation_config.json")  # copied along: AutoTokenizer may consult config.json


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """Load <hf_dir>/config.json and check that its architecture is supported."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {hf_dir} does not exist; pass the folder of a Hugging Face model")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a Hugging Face checkpoint folder needs its config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the original model") from exc
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        found = archs[0] if archs else "no `architectures` entry"
        raise UnsupportedArchitectureError(
            f"{path}: architecture {found!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return config


class HFCheckpoint:
    """A validated HF checkpoint folder whose tensors are read one at a time through mmap'ed safetensors."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self.architecture: str = self.config["architectures"][0]
        self.weight_map = self._weight_map()  # tensor name -> file name
        self._headers = {f: self._read_header(f) for f in sorted(set(self.weight_map.values()))}
        self._check_index_matches_files()

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index or the single model.safetensors."""
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); "
                                      "restore it from the original model") from exc
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard(s) missing from {self.dir}: {', '.join(missing)}; "
                                      "download the complete checkpoint")
            return dict(weight_map)
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return {name: SINGLE_FILE for name in self._read_header(SINGLE_FILE)}
        others = sorted(p.name for p in self.dir.glob("*.safetensors"))
        hint = (f"found {', '.join(others)} but no {INDEX_FILE}; restore the index" if others else
                "only safetensors weights are supported; re-save the model with "
                "`model.save_pretrained(dir, safe_serialization=True)`")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}: {hint}")

    def _read_header(self, file: str) -> dict[str, tuple[str, list[int]]]:
        """Tensor name -> (safetensors dtype, shape) from one file's header; CheckpointError if unreadable."""
        path = self.dir / file
        try:
            with safe_open(path, framework="pt") as f:
                return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / OSError for truncated or corrupt files
            raise CheckpointError(f"cannot read {path} ({exc}); the file is corrupt or truncated, "
                                  "download it again") from exc

    def _check_index_matches_files(self) -> None:
        """Every tensor the index names must be present in the shard it points to."""
        for name, file in self.weight_map.items():
            if name not in self._headers[file]:
                raise CheckpointError(f"{INDEX_FILE} says {name} is in {file}, but it is not; "
                                      "the index and shards come from different downloads, fetch them again")

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, in a stable order."""
        return sorted(self.weight_map)

    def shape(self, name: str) -> list[int]:
        """Shape of a tensor, from the safetensors header (no data read)."""
        return self._headers[self._file(name)][name][1]

    def dtype(self, name: str) -> str:
        """safetensors dtype string ("F32", "BF16", ...) of a tensor, from the header."""
        return self._headers[self._file(name)][name][0]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard (mmap; only this tensor is materialized).

        The shard is opened per read and unmapped right after: a handle kept open leaves every page read so far
        mapped, and those pages count in the process RSS (15 GiB for Llama-3-8B, docs/performance.md)."""
        file = self._file(name)
        try:
            with safe_open(self.dir / file, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name} from {self.dir / file} ({exc}); "
                                  "the file is corrupt, download it again") from exc

    def get_part(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """name[start:stop] along dim (0 or 1), reading only that slice; the whole tensor when dim is None."""
        if dim is None:
            return self.get(name)
        file = self._file(name)
        try:
            with safe_open(self.dir / file, framework="pt") as f:  # unmapped after the read, as in get()
                part = f.get_slice(name)
                return part[start:stop] if dim == 0 else part[:, start:stop]
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name} from {self.dir / file} ({exc}); "
                                  "the file is corrupt, download it again") from exc

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, file by file."""
        for name in sorted(self.weight_map, key=lambda n: (self.weight_map[n], n)):
            yield name, self.get(name)

    def _file(self, name: str) -> str:
        """Shard file that holds `name`; CheckpointError when the tensor does not exist."""
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.dir}; "
                                  "the checkpoint is incomplete or not a supported model") from None


def check_tokenizer(hf_dir: Path) -> None:
    """Raise TokenizerError unless hf_dir has tokenizer files that AutoTokenizer loads offline."""
    hf_dir = Path(hf_dir)
    if not any((hf_dir / f).is_file() for f in TOKENIZER_CORE):
        raise TokenizerError(f"no tokenizer files in {hf_dir}; copy tokenizer.json/tokenizer_config.json "
                             "from the original model")
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:
        raise TokenizerError(f"the tokenizer in {hf_dir} does not load ({type(exc).__name__}: {exc}); "
                             "copy tokenizer.json/tokenizer_config.json from the original model") from exc


def copy_tokenizer(hf_dir: Path, dest_dir: Path) -> list[str]:
    """Copy the tokenizer files of hf_dir into dest_dir, check they load there, and return the copied names."""
    hf_dir, dest_dir = Path(hf_dir), Path(dest_dir)
    if not any((hf_dir / f).is_file() for f in TOKENIZER_CORE):
        raise TokenizerError(f"no tokenizer files in {hf_dir}; copy tokenizer.json/tokenizer_config.json "
                             "from the original model")
    dest_dir.mkdir(parents=True, exist_ok=True)
    copied = [f for f in TOKENIZER_FILES + TOKENIZER_EXTRA if (hf_dir / f).is_file()]
    for name in copied:
        shutil.copy2(hf_dir / name, dest_dir / name)
    check_tokenizer(dest_dir)
    return copied
