"""The build pipeline: HF folder -> engine (TensorRT-LLM checkpoint) -> Triton repository, renamed into place at the end."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from builder.config import BuildSettings, EngineConfig, QuantOptions
from builder.errors import BuilderError, ConfigError, OutputExistsError
from builder.quantize.accuracy import EvalOptions
from builder.repo.render import ServingOptions

TINY_MODELS = {
    "tiny-llama": "LlamaForCausalLM",
    "tiny-mistral": "MistralForCausalLM",
    "tiny-qwen2": "Qwen2ForCausalLM",
}


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


def resolve_model_dir(model: str, scratch: Path) -> Path:
    """Return an HF folder for `model`: a built-in tiny model made under `scratch`, or a local folder."""
    if model in TINY_MODELS:
        from builder.checkpoint.tiny import make_tiny_model

        return make_tiny_model(scratch / model, architecture=TINY_MODELS[model])
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--model {model!r} is neither a local folder nor a built-in model "
                          f"({', '.join(TINY_MODELS)}); pass the path of a Hugging Face checkpoint folder")
    return path


def precheck_settings(settings: BuildSettings) -> None:
    """Validate the options as given, before any work (limits left at 0 are filled from the checkpoint later)."""
    seq_len = settings.max_seq_len or max(settings.max_input_len, 1)
    replace(settings, max_seq_len=seq_len, max_input_len=settings.max_input_len or 1).validate()


def resolve_settings(settings: BuildSettings, hf_config: dict) -> BuildSettings:
    """Fill settings left at 0 from the checkpoint (max_seq_len from max_position_embeddings) and validate."""
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


def check_output(output: Path, force: bool) -> None:
    """Refuse to overwrite an existing output folder unless forced."""
    if output.exists() and not force:
        raise OutputExistsError(f"output folder {output} already exists; pass --force to replace it "
                                "or choose another --output")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a folder; remove it or choose another --output")


def build(options: BuildOptions) -> EngineConfig:
    """Run the whole build; the output folder appears only when complete and validated."""
    from builder.checkpoint.convert import check_quant_options, convert_checkpoint
    from builder.checkpoint.hf import HFCheckpoint, copy_tokenizer
    from builder.repo.render import render_repository
    from builder.quantize.accuracy import check_eval_options, evaluate_build
    from builder.repo.validate import validate_repository

    output = options.output.expanduser().resolve()
    check_output(output, options.force)
    precheck_settings(options.settings)
    check_quant_options(options.quant)
    check_eval_options(options.evaluation)
    options.serving.validate()
    from builder.repo.trtllm_backend import build_trtllm_target, precheck_backend

    precheck_backend(options)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        hf_dir = resolve_model_dir(options.model, staging / "hf")
        checkpoint = HFCheckpoint(hf_dir)
        settings = resolve_settings(options.settings, checkpoint.config)
        copy_tokenizer(hf_dir, staging / "tokenizer")
        def evaluate(engine_dir: Path, config: EngineConfig) -> None:
            """Accuracy report (engine_dir/accuracy.json) and --max-ppl-increase gate (AccuracyGateError)."""
            evaluate_build(options.evaluation, hf_dir, staging / "tokenizer", engine_dir, config, settings, staging)

        if options.backend != "portable":  # TensorRT-LLM targets: checkpoint + repository + scripts
            engine_config = build_trtllm_target(options, hf_dir, staging, settings, output, evaluate)
            validate_repository(staging / "repository")
            _move_into_place(staging / "repository", output)
            return engine_config
        engine_config = convert_checkpoint(hf_dir, staging / "engine", settings, tp_size=options.tp_size,
                                           quant=options.quant)
        evaluate(staging / "engine", engine_config)
        repo = staging / "repository"
        render_repository(repo, engine_config, staging / "engine", staging / "tokenizer", options.serving)
        validate_repository(repo)
        _move_into_place(repo, output)
        return engine_config
    except BuilderError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise BuilderError(f"build failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(repo: Path, output: Path) -> None:
    """Atomically replace `output` with the finished repository."""
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(trash)
        repo.rename(output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        repo.rename(output)
