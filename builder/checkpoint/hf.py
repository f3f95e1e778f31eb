"""Read and validate a Hugging Face checkpoint folder: config, safetensors shards (streamed), tokenizer files.

Every file is opened through checkpoint_file, which refuses a path that resolves (symlinks followed) outside the
folder; transformers only ever loads a tokenizer from a copy of the checked files (copy_tokenizer, staged_tokenizer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from builder.errors import CheckpointError, OutsideCheckpointError, TokenizerError
from builder.models import family

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja")
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")  # at least one must exist
TOKENIZER_EXTRA = ("config.json", "generation_config.json")  # copied along: AutoTokenizer may consult config.json
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # transformers loads <dir>/*.jinja from a local folder
HUB_BLOBS = "blobs"  # HF hub cache: models--ORG--NAME/{blobs,snapshots/REV}; snapshot files are symlinks to ../../blobs


def checkpoint_roots(hf_dir: Path) -> tuple[Path, ...]:
    """The real folders a checkpoint's files may resolve into: the folder itself and, when it is an HF hub cache
    snapshot (models--*/snapshots/REV), that model's own blobs/ folder (docs/decisions.md)."""
    root = Path(hf_dir).resolve()
    model_repo = root.parent.parent
    blobs = model_repo / HUB_BLOBS
    if root.parent.name == "snapshots" and model_repo.name.startswith("models--") and blobs.is_dir() \
            and not blobs.is_symlink():
        return root, blobs.resolve()
    return (root,)


def checkpoint_file(hf_dir: Path, name: str, named_by: str | None = None) -> Path:
    """The real path of `name` in the checkpoint folder; OutsideCheckpointError when it resolves outside it.

    `name` may be a symlink, a relative path with `..` or an absolute path (an index entry, a tokenizer_file):
    whatever it resolves to must lie inside checkpoint_roots(hf_dir). `named_by` says where the name came from.
    """
    hf_dir = Path(hf_dir)
    try:
        real = (hf_dir / name).resolve()
    except (OSError, ValueError) as exc:  # a symlink loop, a NUL byte in an index entry
        origin = f"{named_by} entry {name!r}" if named_by else str(hf_dir / name)
        raise CheckpointError(f"{origin} cannot be resolved ({exc}); restore it from the original model") from exc
    roots = checkpoint_roots(hf_dir)
    if any(real.is_relative_to(root) for root in roots):
        return real
    source = f"{named_by} names {name!r}, which" if named_by else str(hf_dir / name)
    raise OutsideCheckpointError(
        f"{source} resolves to {real}, outside the checkpoint folder {roots[0]}; builder reads only files inside "
        "--model: copy that file into the folder (symlinks within the folder, or an HF hub cache snapshot, are fine)")


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """Load <hf_dir>/config.json and check that its architecture is supported (its fields: trtllm.check_hf_config)."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {hf_dir} does not exist; pass the folder of a Hugging Face model")
    path = hf_dir / "config.json"
    if not checkpoint_file(hf_dir, path.name).is_file():
        raise CheckpointError(f"{path} is missing; a Hugging Face checkpoint folder needs its config.json")
    try:
        config = json.loads(checkpoint_file(hf_dir, path.name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the original model") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; restore it from the original model")
    archs = config.get("architectures") or []
    family(str(archs[0]) if archs else "no `architectures` entry", str(path))
    return config


class HFCheckpoint:
    """A validated HF checkpoint folder whose tensors are read one at a time through mmap'ed safetensors."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.config = read_hf_config(self.dir)
        self.architecture: str = self.config["architectures"][0]
        self._paths: dict[str, Path] = {}  # shard file name (as the index names it) -> checked real path
        self.weight_map = self._weight_map()  # tensor name -> file name
        self._headers = {f: self._read_header(f) for f in sorted(set(self.weight_map.values()))}
        self._check_index_matches_files()

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file name, from the index or the single model.safetensors."""
        index = checkpoint_file(self.dir, INDEX_FILE)
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index ({exc}); "
                                      "restore it from the original model") from exc
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                           for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names; "
                                      "restore it from the original model")
            for file in sorted(set(weight_map.values())):
                self._paths[file] = checkpoint_file(self.dir, file, named_by=f"{INDEX_FILE}'s weight_map")
            missing = sorted(f for f, path in self._paths.items() if not path.is_file())
            if missing:
                raise CheckpointError(f"{index} names shard(s) missing from {self.dir}: {', '.join(missing)}; "
                                      "download the complete checkpoint")
            return dict(weight_map)
        single = checkpoint_file(self.dir, SINGLE_FILE)
        if single.is_file():
            self._paths[SINGLE_FILE] = single
            return {name: SINGLE_FILE for name in self._read_header(SINGLE_FILE)}
        others = sorted(p.name for p in self.dir.glob("*.safetensors"))
        hint = (f"found {', '.join(others)} but no {INDEX_FILE}; restore the index" if others else
                "only safetensors weights are supported; re-save the model with "
                "`model.save_pretrained(dir, safe_serialization=True)`")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}: {hint}")

    def _read_header(self, file: str) -> dict[str, tuple[str, list[int]]]:
        """Tensor name -> (safetensors dtype, shape) from one file's header; CheckpointError if unreadable."""
        try:
            with safe_open(self._paths[file], framework="pt") as f:
                return {name: (f.get_slice(name).get_dtype(), list(f.get_slice(name).get_shape())) for name in f.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / OSError for truncated or corrupt files
            raise CheckpointError(f"cannot read {self.dir / file} ({exc}); the file is corrupt or truncated, "
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
            with safe_open(self._paths[file], framework="pt") as f:
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
            with safe_open(self._paths[file], framework="pt") as f:  # unmapped after the read, as in get()
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


def check_tokenizer_files(hf_dir: Path) -> list[str]:
    """The tokenizer files (and config.json / generation_config.json) of hf_dir, each checked to lie inside it.

    Also checked: every `*_file` path that tokenizer_config.json names (older transformers open tokenizer_file as
    given) and additional_chat_templates/*.jinja. TokenizerError when there is no tokenizer at all.
    """
    hf_dir = Path(hf_dir)
    if not any((hf_dir / f).is_file() for f in TOKENIZER_CORE):
        raise TokenizerError(f"no tokenizer files in {hf_dir}; copy tokenizer.json/tokenizer_config.json "
                             "from the original model")
    present = [f for f in TOKENIZER_FILES + TOKENIZER_EXTRA if (hf_dir / f).is_file()]
    for name in present:
        checkpoint_file(hf_dir, name)
    if TOKENIZER_CONFIG in present:
        for key, value in _file_keys(hf_dir).items():
            checkpoint_file(hf_dir, value, named_by=f"{TOKENIZER_CONFIG}'s {key}")
    templates = hf_dir / CHAT_TEMPLATES_DIR
    if templates.is_dir():
        for template in sorted(templates.glob("*.jinja")):
            checkpoint_file(hf_dir, f"{CHAT_TEMPLATES_DIR}/{template.name}")
    return present


def _read_tokenizer_config(hf_dir: Path) -> Any:
    """The parsed tokenizer_config.json of hf_dir (checked to lie inside it); TokenizerError when it is not JSON."""
    path = checkpoint_file(hf_dir, TOKENIZER_CONFIG)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{Path(hf_dir) / TOKENIZER_CONFIG} is not valid JSON ({exc}); restore it from the "
                             "original model") from exc


def _file_keys(hf_dir: Path) -> dict[str, str]:
    """The `*_file` paths tokenizer_config.json names (tokenizer_file, vocab_file, ...): save_pretrained never writes
    them, transformers finds the files by their standard names, and older versions open such a path as given."""
    config = _read_tokenizer_config(hf_dir)
    items = config.items() if isinstance(config, dict) else ()
    return {key: value for key, value in items if key.endswith("_file") and isinstance(value, str) and value}


def check_tokenizer(hf_dir: Path) -> None:
    """Raise TokenizerError unless hf_dir has tokenizer files that AutoTokenizer loads offline."""
    hf_dir = Path(hf_dir)
    check_tokenizer_files(hf_dir)
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as exc:
        raise TokenizerError(f"the tokenizer in {hf_dir} does not load ({type(exc).__name__}: {exc}); "
                             "copy tokenizer.json/tokenizer_config.json from the original model") from exc


def copy_tokenizer(hf_dir: Path, dest_dir: Path) -> list[str]:
    """Copy the tokenizer files of hf_dir into dest_dir, check they load there, and return the copied names.

    Symlinks are copied as the files they point to, after check_tokenizer_files has checked where they lead.
    tokenizer_config.json loses its `*_file` paths, which would name files of hf_dir rather than of the copy."""
    hf_dir, dest_dir = Path(hf_dir), Path(dest_dir)
    copied = check_tokenizer_files(hf_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy2(checkpoint_file(hf_dir, name), dest_dir / name)
    paths = _file_keys(hf_dir) if TOKENIZER_CONFIG in copied else {}
    if paths:
        kept = {key: value for key, value in _read_tokenizer_config(hf_dir).items() if key not in paths}
        (dest_dir / TOKENIZER_CONFIG).write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
    check_tokenizer(dest_dir)
    return copied


@contextmanager
def staged_tokenizer(hf_dir: Path) -> Iterator[Path]:
    """A temporary folder holding copy_tokenizer's copy of hf_dir's tokenizer, for transformers to load from:
    AutoTokenizer on hf_dir itself could open files that builder never checked."""
    with tempfile.TemporaryDirectory(prefix="builder-tokenizer-") as scratch:
        copy_tokenizer(hf_dir, Path(scratch))
        yield Path(scratch)
