"""The build pipeline: HF folder -> engine (TensorRT-LLM checkpoint) -> Triton repository, renamed into place at the end.

Everything that can be checked is checked before anything is written: the options, the --output path (a file in
the way, a name too long, the --model folder itself, a folder --force must not replace) and the checkpoint
(config.json fields, every weight's shape, every file inside the --model folder). The build is then staged beside
the output in `.NAME.building-OWNER-XXXXXXXX` and renamed into place when complete and validated; the repository it
replaces goes to `.NAME.old-OWNER-XXXXXXXX` and is deleted. OWNER (owner_tag) identifies the building process, so the
next build of NAME deletes the folders of builds that died (SIGKILL, power loss) and leaves live builds' alone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.checkpoint.convert import check_quant_options, convert_checkpoint, plan_checkpoint
from builder.checkpoint.hf import HFCheckpoint, check_tokenizer_files, checkpoint_roots, copy_tokenizer
from builder.config import BUILD_CONFIG, BuildSettings, EngineConfig, QuantOptions
from builder.errors import BuilderError, ConfigError, OutputExistsError, OutputPathError
from builder.models import TINY_MODELS
from builder.accuracy import EvalOptions, check_eval_options, evaluate_build
from builder.repo.render import MODELS, ServingOptions, render_repository
from builder.repo.trtllm_backend import build_trtllm_target, precheck_backend
from builder.repo.validate import validate_repository
from builder.trtllm_build import BUILD_LOG, BUILD_SCRIPT, CHECKPOINT_SUBDIR, ENGINE_MODEL, ENGINE_SUBDIR, LAUNCH_SCRIPT

STAGING_MARK = "building"  # .NAME.building-OWNER-XXXXXXXX: a build in progress
TRASH_MARK = "old"  # .NAME.old-OWNER-XXXXXXXX: a replaced repository being deleted
SUFFIX_LEN = 8  # the random part mkdtemp / uuid adds after OWNER-
# What builder writes at a repository's root, for every backend (the models, the TensorRT-LLM targets' scripts, and
# the log of build_engine.sh when `builder build` ran it): --force replaces a folder holding nothing else.
REPOSITORY_ENTRIES = frozenset(MODELS) | {BUILD_SCRIPT, LAUNCH_SCRIPT, BUILD_LOG}


@dataclass
class BuildOptions:
    """What `builder build` was asked to do."""

    output: Path
    model: str = "tiny-llama"
    force: bool = False
    settings: BuildSettings = field(default_factory=BuildSettings)
    tp_size: int = 1  # tensor parallelism: rank{0..tp_size-1}.safetensors, mapping.world_size = tp_size
    quant: QuantOptions = field(default_factory=QuantOptions)  # --quant, --kv-cache-dtype, --group-size, --calib-*
    evaluation: EvalOptions = field(default_factory=EvalOptions)  # --eval, --eval-data, --max-ppl-increase
    backend: str = "portable"  # --backend: portable | tensorrtllm | trtllm-pytorch (builder.repo.trtllm_backend)
    serving: ServingOptions = field(default_factory=ServingOptions)  # --preprocessing-instances, ... (Triton side)


def local_model_dir(model: str) -> Path | None:
    """The real path of a local --model folder, None for a built-in tiny model; ConfigError for anything else."""
    if model in TINY_MODELS:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {model!r} is neither a local folder nor a built-in model "
                          f"({', '.join(TINY_MODELS)}); pass the path of a Hugging Face checkpoint folder")
    return path.resolve()


def resolve_model_dir(model: str, scratch: Path) -> Path:
    """Return an HF folder for `model`: a built-in tiny model made under `scratch`, or a local folder."""
    if model in TINY_MODELS:
        from builder.checkpoint.tiny import make_tiny_model  # transformers' model classes: only for tiny models

        return make_tiny_model(scratch / model, model)
    return local_model_dir(model)


def precheck_settings(settings: BuildSettings) -> None:
    """Validate the options as given, before any work (limits left at 0 are filled from the checkpoint later)."""
    seq_len = settings.max_seq_len or max(settings.max_input_len, 1)
    replace(settings, max_seq_len=seq_len, max_input_len=settings.max_input_len or 1).validate()


def resolve_settings(settings: BuildSettings, hf_config: dict) -> BuildSettings:
    """Fill settings left at 0 from the checkpoint (max_seq_len from max_position_embeddings) and validate.

    hf_config has passed builder.checkpoint.trtllm.check_hf_config (positive integer sizes)."""
    if settings.max_seq_len <= 0:
        settings.max_seq_len = int(hf_config.get("max_position_embeddings") or 2048)
        window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
        if window:  # the runtime attends to the whole sequence: stay inside the window the model was trained with
            settings.max_seq_len = min(settings.max_seq_len, int(window))
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
    if window and settings.max_seq_len > int(window):
        raise ConfigError(f"--max-seq-len {settings.max_seq_len} exceeds the model's sliding_window ({window}); "
                          "sliding-window attention is not supported yet, so use --max-seq-len <= the window")
    if settings.max_input_len <= 0:
        settings.max_input_len = settings.max_seq_len
    settings.validate()
    return settings


def prepare_checkpoint(hf_dir: Path, options: BuildOptions) -> tuple[HFCheckpoint, BuildSettings]:
    """Read and check a checkpoint, writing nothing: config.json fields, every weight's shape against them, every
    file (weights, tokenizer) inside the folder; then the settings left at 0 filled from it."""
    checkpoint = HFCheckpoint(hf_dir)
    plan_checkpoint(checkpoint, options.settings.dtype)
    check_tokenizer_files(hf_dir)
    return checkpoint, resolve_settings(options.settings, checkpoint.config)


# ---- the --output path ---------------------------------------------------------------------------------------------

def os_error_message(exc: OSError, doing: str) -> str:
    """One line for an OSError met while `doing` something: the system's reason, the path, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    hints = {errno.ENOSPC: "free some disk space or choose an --output on another disk",
             errno.EDQUOT: "free some disk space or choose an --output on another disk",
             errno.EACCES: "choose an --output in a folder you can write to",
             errno.EPERM: "choose an --output in a folder you can write to",
             errno.EROFS: "choose an --output on a writable file system",
             errno.ENAMETOOLONG: "choose a shorter --output path",
             errno.ENOTDIR: "a part of the path is a file: choose an --output whose parent folders are folders",
             errno.EEXIST: "a part of the path is a file: choose an --output whose parent folders are folders"}
    hint = hints.get(exc.errno, "check the --output path and the disk")
    return f"{doing} failed: {exc.strerror or exc}{where}; {hint}"


def _name_max(folder: Path) -> int:
    """NAME_MAX of the file system that holds `folder` (or its nearest existing parent); 255 when unknown."""
    for candidate in (folder, *folder.parents):
        try:
            return os.pathconf(candidate, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_output_path(output: Path) -> None:
    """OutputPathError when `output` (absolute) cannot become a folder: a parent that is a file, a name too long for
    the staging folder beside it. Nothing is created."""
    limit = _name_max(output.parent) - len(f"..{STAGING_MARK}-{owner_tag()}-") - SUFFIX_LEN
    size = len(os.fsencode(output.name))
    if size > limit:
        raise OutputPathError(f"--output name is too long: {size} bytes, at most {limit} on this file system (the "
                              f"build is staged beside it as .NAME.{STAGING_MARK}-...); choose a shorter name")
    for parent in reversed(output.parents):
        try:
            is_folder = parent.is_dir()
            exists = is_folder or parent.exists()
        except OSError as exc:
            raise OutputPathError(os_error_message(exc, f"checking --output {output}")) from exc
        if not exists:
            return
        if not is_folder:
            raise OutputPathError(f"--output {output}: {parent} is a file, not a folder; choose an --output whose "
                                  f"parent folders are folders, or move {parent} away")


def check_not_model(output: Path, model_dir: Path) -> None:
    """OutputPathError when --output (real path) is the --model folder, lies inside it or contains it: the build
    would write into the checkpoint or, with --force, delete it."""
    for root in checkpoint_roots(model_dir):
        if output == root:
            relation = "is the --model folder"
        elif output.is_relative_to(root):
            relation = "lies inside the --model folder"
        elif root.is_relative_to(output):
            relation = "contains the --model folder"
        else:
            continue
        raise OutputPathError(f"--output {output} {relation} ({root}); builder never writes into or replaces the "
                              "checkpoint, so choose an --output outside it")


def repository_problem(folder: Path) -> str | None:
    """Why --force must not replace `folder` (a real folder), or None: it is empty or a builder repository.

    A builder repository holds only what builder writes at the root (REPOSITORY_ENTRIES), each model folder its
    config.pbtxt, and a tensorrt_llm model builder made: a portable engine (1/engine/build_config.json) or a
    TensorRT-LLM target's checkpoint (1/checkpoint/config.json) beside launch_triton.sh."""
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    foreign = [name for name in entries if name not in REPOSITORY_ENTRIES]
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which builder does not write"
    engine = folder / ENGINE_MODEL
    unconfigured = [name for name in entries if name in MODELS and not (folder / name / "config.pbtxt").is_file()]
    if unconfigured or not (engine / "config.pbtxt").is_file():
        return f"{', '.join(unconfigured) or ENGINE_MODEL} has no config.pbtxt"
    portable = (engine / ENGINE_SUBDIR / BUILD_CONFIG).is_file()
    trtllm = (folder / LAUNCH_SCRIPT).is_file() and (engine / CHECKPOINT_SUBDIR / "config.json").is_file()
    if not (portable or trtllm):
        return (f"its {ENGINE_MODEL} model holds neither a builder engine ({ENGINE_SUBDIR}/{BUILD_CONFIG}) nor a "
                f"builder TensorRT-LLM checkpoint ({CHECKPOINT_SUBDIR}/config.json beside {LAUNCH_SCRIPT})")
    return None


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output unless forced, and with --force anything but an empty folder or a builder
    repository (a user's files are never deleted)."""
    if not (output.exists() or output.is_symlink()):
        return
    if not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a folder; remove it or choose another --output")
    problem = repository_problem(output)
    if problem is not None:
        raise OutputExistsError(f"{output} is not a builder repository ({problem}); --force replaces only a "
                                "repository builder wrote or an empty folder: move those files away or choose "
                                "another --output")
    if not force:
        raise OutputExistsError(f"output folder {output} already exists; pass --force to replace it "
                                "or choose another --output")


def make_parents(output: Path) -> list[Path]:
    """Create output's missing parent folders; return those created (outermost first). OutputPathError on failure."""
    missing = [p for p in reversed(output.parents) if not p.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(os_error_message(exc, f"creating the folder of --output {output}")) from exc
    return missing


def _remove_created(folders: list[Path]) -> None:
    """Remove folders make_parents created, innermost first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


# ---- staging and trash folders, and who owns them ----------------------------------------------------------------

def _proc_start_time(pid: int) -> str | None:
    """Start time of process pid in clock ticks since boot (/proc/PID/stat field 22), None when there is no such
    process; "Z" for a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state is fields[0], starttime fields[19]
    return "Z" if fields[0] in ("Z", "X") else fields[19]


def _host_id() -> str:
    """8 hex digits naming this host and PID namespace: only processes with the same id can be judged alive or dead."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def _boot_id() -> str:
    """8 hex digits of this boot (/proc/sys/kernel/random/boot_id), "0" where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8] or "0"
    except OSError:
        return "0"


def owner_tag(pid: int | None = None) -> str:
    """HOST-BOOT-PID-START of a live process (default: this one), as staging and trash folder names record it."""
    pid = os.getpid() if pid is None else pid
    start = _proc_start_time(pid)
    return f"{_host_id()}-{_boot_id()}-{pid}-{start if start and start != 'Z' else 0}"


OWNER_RE = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<boot>[0-9a-f]{1,8})-(?P<pid>\d+)-(?P<start>\d+)-.+")


def owner_is_dead(tag_and_suffix: str) -> bool:
    """Whether the owner of a folder named ...-HOST-BOOT-PID-START-XXXX is certainly dead: on this host and PID
    namespace, and the machine rebooted since, or no process PID runs, or it is a zombie, or PID now belongs to a
    process started at another time (reused). False for names without a tag and for other hosts' folders."""
    match = OWNER_RE.fullmatch(tag_and_suffix)
    if match is None or match["host"] != _host_id():
        return False
    boot = _boot_id()
    if boot != "0" and match["boot"] != "0" and match["boot"] != boot:
        return True
    pid = int(match["pid"])
    start = _proc_start_time(pid)
    if start is None and Path("/proc/self/stat").exists():
        return True
    if start is None:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return start == "Z" or (match["start"] != "0" and start != match["start"])


def remove_stale_folders(output: Path) -> list[Path]:
    """Delete the staging and trash folders of `output` that builds which died left beside it; return them."""
    removed = []
    try:
        siblings = list(output.parent.iterdir())
    except OSError:
        return removed
    for mark in (STAGING_MARK, TRASH_MARK):
        prefix = f".{output.name}.{mark}-"
        for path in siblings:
            if path.name.startswith(prefix) and not path.is_symlink() and path.is_dir() \
                    and owner_is_dead(path.name[len(prefix):]):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def make_staging(output: Path) -> Path:
    """The staging folder beside output, named after this process (owner_tag)."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.{STAGING_MARK}-{owner_tag()}-", dir=output.parent))
    except OSError as exc:
        raise OutputPathError(os_error_message(exc, f"creating the staging folder beside --output {output}")) from exc


# ---- the build ------------------------------------------------------------------------------------------------------

def build(options: BuildOptions) -> EngineConfig:
    """Run the whole build; the output folder appears only when complete and validated."""
    output = Path(os.path.abspath(options.output.expanduser()))
    check_output_path(output)
    output = output.resolve()  # symlinks followed: the folder that would really be replaced
    model_dir = local_model_dir(options.model)
    if model_dir is not None:
        check_not_model(output, model_dir)
    check_output(output, options.force)
    precheck_settings(options.settings)
    check_quant_options(options.quant)
    check_eval_options(options.evaluation)
    options.serving.validate()
    precheck_backend(options)
    settings = prepare_checkpoint(model_dir, options)[1] if model_dir is not None else None
    created = make_parents(output)
    remove_stale_folders(output)
    done = False
    staging = make_staging(output)
    try:
        hf_dir = model_dir or resolve_model_dir(options.model, staging / "hf")
        if settings is None:
            settings = prepare_checkpoint(hf_dir, options)[1]
        copy_tokenizer(hf_dir, staging / "tokenizer")

        def evaluate(engine_dir: Path, config: EngineConfig) -> None:
            """Accuracy report (engine_dir/accuracy.json) and --max-ppl-increase gate (AccuracyGateError)."""
            evaluate_build(options.evaluation, hf_dir, staging / "tokenizer", engine_dir, config, settings, staging)

        if options.backend != "portable":  # TensorRT-LLM targets: checkpoint + repository + scripts
            engine_config = build_trtllm_target(options, hf_dir, staging, settings, output, evaluate)
        else:
            engine_config = convert_checkpoint(hf_dir, staging / "engine", settings, tp_size=options.tp_size,
                                               quant=options.quant)
            evaluate(staging / "engine", engine_config)
            render_repository(staging / "repository", engine_config, staging / "engine", staging / "tokenizer",
                              options.serving)
        validate_repository(staging / "repository")
        _move_into_place(staging / "repository", output)
        done = True
        return engine_config
    except BuilderError:
        raise
    except OSError as exc:
        raise BuilderError(os_error_message(exc, "build")) from exc
    except (ValueError, RuntimeError) as exc:
        raise BuilderError(f"build failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            _remove_created(created)


def _move_into_place(repo: Path, output: Path) -> None:
    """Atomically replace `output` with the finished repository (the old one is renamed to a trash folder that a
    later build removes if this process dies before deleting it)."""
    if output.exists():
        trash = output.with_name(f".{output.name}.{TRASH_MARK}-{owner_tag()}-{uuid.uuid4().hex[:SUFFIX_LEN]}")
        output.rename(trash)
        repo.rename(output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        repo.rename(output)
