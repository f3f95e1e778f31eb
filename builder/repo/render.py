"""Render a Triton model repository from model_repo_templates/ and ensembles/ with Jinja2 (StrictUndefined)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from builder.config import EngineConfig
from builder.errors import ConfigError, OutputExistsError
from builder.repo.validate import parse_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = PROJECT_ROOT / "model_repo_templates"
ENSEMBLES_DIR = PROJECT_ROOT / "ensembles"
ENGINE_MODEL = "tensorrt_llm"
MODELS = ("ensemble", "preprocessing", ENGINE_MODEL, "postprocessing", "tensorrt_llm_bls")
VERSION = "1"
BLS_PIPELINE = f"{VERSION}/pipeline.json"  # relative to the tensorrt_llm_bls folder: the steps it runs
ENGINE_SUBDIR = f"{VERSION}/engine"  # relative to the tensorrt_llm folder
TOKENIZER_SUBDIR = f"{VERSION}/tokenizer"  # relative to the preprocessing / postprocessing folders
TEMPLATE_SUFFIX = ".j2"


@dataclass
class ServingOptions:
    """Triton-side choices that are not engine settings (the engine's live in build_config.json)."""

    pipeline: str = "llm"  # ensembles/<pipeline>.yaml
    preprocessing_instances: int = 1
    max_queue_delay_microseconds: int = 0
    batch_scheduler_policy: str = "max_utilization"  # the runtime preempts (recomputes) when KV runs out
    enable_chunked_context: bool = True  # the runtime splits long prompts under max_num_tokens
    exclude_input_in_output: bool = False  # TensorRT-LLM's default; requests may override it
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    max_tokens_in_paged_kv_cache: int | None = None
    cancellation_check_period_ms: int = 100  # TensorRT-LLM's default; 0 checks every engine step
    max_responses_per_second: float = 2000.0  # streamed responses of the engine model, all requests (0: unbounded)
    response_sender_threads: int = 2  # threads of the engine model that send responses
    decoupled_mode: bool = True  # TensorRT-LLM's decoupled_mode: tensorrt_llm and the BLS stream; False: unary models
    accumulate_tokens: bool = False  # tensorrt_llm_bls: streamed text_output is the whole text so far (upstream's)

    def validate(self) -> None:
        """Raise ConfigError for values Triton or the runtime cannot take."""
        if self.preprocessing_instances < 1:
            raise ConfigError(f"preprocessing_instances must be >= 1, got {self.preprocessing_instances}")
        if self.max_queue_delay_microseconds < 0:
            raise ConfigError("max_queue_delay_microseconds must be >= 0")
        if self.batch_scheduler_policy not in ("max_utilization", "guaranteed_no_evict"):
            raise ConfigError(f"batch_scheduler_policy {self.batch_scheduler_policy!r} is not one of "
                              "max_utilization, guaranteed_no_evict")
        if self.cancellation_check_period_ms < 0:
            raise ConfigError("cancellation_check_period_ms must be >= 0")
        if self.max_responses_per_second < 0:
            raise ConfigError("max_responses_per_second must be >= 0 (0: unbounded)")
        if self.response_sender_threads < 1:
            raise ConfigError(f"response_sender_threads must be >= 1, got {self.response_sender_threads}")
        if self.max_tokens_in_paged_kv_cache is not None and self.max_tokens_in_paged_kv_cache <= 0:
            raise ConfigError("max_tokens_in_paged_kv_cache must be > 0 when set")


def _flag(value: bool) -> str:
    """A boolean as the lower-case string that both TensorRT-LLM's C++ and Python parsers accept."""
    return "true" if value else "false"


def tensorrt_llm_parameters(engine_config: EngineConfig, options: ServingOptions) -> dict[str, str]:
    """The tensorrt_llm `parameters` map: TensorRT-LLM's keys where they exist, then ours."""
    build = engine_config.build
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": ENGINE_SUBDIR,
        "batch_scheduler_policy": options.batch_scheduler_policy,
        "enable_chunked_context": _flag(options.enable_chunked_context),
        "exclude_input_in_output": _flag(options.exclude_input_in_output),
        "kv_cache_free_gpu_mem_fraction": str(build.kv_cache_free_gpu_mem_fraction),
        "cancellation_check_period_ms": str(options.cancellation_check_period_ms),
    }
    if options.max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = str(options.max_tokens_in_paged_kv_cache)
    params["kv_cache_memory_mb"] = str(build.kv_cache_memory_mb)
    params["device"] = build.device
    params["max_responses_per_second"] = f"{options.max_responses_per_second:g}"
    params["response_sender_threads"] = str(options.response_sender_threads)
    return params


def render_context(engine_config: EngineConfig, options: ServingOptions) -> dict[str, Any]:
    """Every value the templates may use."""
    return {
        "max_batch_size": engine_config.build.max_batch_size,
        "max_queue_delay_microseconds": options.max_queue_delay_microseconds,
        "preprocessing_instances": options.preprocessing_instances,
        "tensorrt_llm_parameters": tensorrt_llm_parameters(engine_config, options),
        "preprocessing_parameters": {"tokenizer_dir": TOKENIZER_SUBDIR,
                                     "add_special_tokens": _flag(options.add_special_tokens),
                                     "max_input_len": str(engine_config.build.max_input_len)},
        "postprocessing_parameters": {"tokenizer_dir": TOKENIZER_SUBDIR,
                                      "skip_special_tokens": _flag(options.skip_special_tokens),
                                      "tensorrt_llm_model_name": ENGINE_MODEL,
                                      "vocab_size": str(engine_config.model.vocab_size)},
        "pipeline": load_pipeline(options.pipeline),
        "decoupled": options.decoupled_mode,
        "bls_parameters": {"accumulate_tokens": _flag(options.accumulate_tokens),
                           "tensorrt_llm_model_name": ENGINE_MODEL, "pipeline": BLS_PIPELINE},
    }


def load_pipeline(name: str, ensembles_dir: Path = ENSEMBLES_DIR) -> dict[str, Any]:
    """ensembles/<name>.yaml as a dict, with its basic shape checked (wiring is checked by validate)."""
    path = ensembles_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in ensembles_dir.glob("*.yaml"))) or "none"
        raise ConfigError(f"no pipeline {name!r}: {path} does not exist (known: {known})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}); fix the file") from exc
    missing = [key for key in ("name", "description", "inputs", "outputs", "steps") if key not in (data or {})]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}; see ensembles/llm.yaml for the layout")
    for tensor in data["inputs"] + data["outputs"]:
        tensor.setdefault("optional", False)
    for step in data["steps"]:
        step.setdefault("inputs", {})
        step.setdefault("outputs", {})
        step.setdefault("engine", False)
    if sum(1 for step in data["steps"] if step["engine"]) != 1:
        raise ConfigError(f"{path} must mark exactly one step `engine: true` (the engine model, whose responses the "
                          "later steps handle one by one); see ensembles/llm.yaml")
    data["source"] = path.name
    return data


def pipeline_for_engine(pipeline: dict[str, Any], engine_model: str, engine_outputs: set[str]) -> dict[str, Any]:
    """The ensemble pipeline for an engine model that declares `engine_outputs`.

    Outputs of the engine step that the engine lacks are dropped when the step lists them in `optional_outputs`,
    with the ensemble outputs they feed and the later step inputs that read them when those steps list them in
    `optional_inputs` (ensembles/llm.yaml: detok_context_ids and is_final exist only in builder's runtime; log
    probs, logits and perf metrics only in TensorRT-LLM's C++ backend). Anything else missing is a ConfigError.
    """
    data = copy.deepcopy(pipeline)
    dropped: set[str] = set()
    for step in data["steps"]:
        if step["model"] != engine_model:
            continue
        for key in list(step["outputs"]):
            if key in engine_outputs:
                continue
            if key not in step.get("optional_outputs", []):
                raise ConfigError(f"pipeline {data.get('source')}: {engine_model} output {key!r} is not declared by "
                                  f"this engine model and is not listed in the step's optional_outputs")
            dropped.add(step["outputs"].pop(key))
    for step in data["steps"]:
        for key, tensor in list(step["inputs"].items()):
            if tensor not in dropped:
                continue
            if key not in step.get("optional_inputs", []):
                raise ConfigError(f"pipeline {data.get('source')}: {step['model']} input {key!r} reads {tensor!r}, "
                                  f"which {engine_model} does not produce, and is not listed in optional_inputs")
            del step["inputs"][key]
    data["outputs"] = [t for t in data["outputs"] if t["name"] not in dropped]
    return data


def pbtxt_string(value: Any) -> str:
    """A protobuf text-format string literal (quoted and escaped)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def make_environment(templates_dir: Path) -> jinja2.Environment:
    """Jinja2 environment: StrictUndefined (a missing value is an error, never a `${...}` left behind)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["pbstr"] = pbtxt_string
    return env


def render_templates(templates_dir: Path, repo_dir: Path, context: dict[str, Any]) -> None:
    """Render every *.j2 under templates_dir into repo_dir (suffix dropped) and copy every other file."""
    env = make_environment(templates_dir)
    for source in sorted(templates_dir.rglob("*")):
        if not source.is_file() or "__pycache__" in source.parts:
            continue
        relative = source.relative_to(templates_dir)
        target = repo_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.name.endswith(TEMPLATE_SUFFIX):
            try:
                text = env.get_template(relative.as_posix()).render(**context)
            except jinja2.TemplateError as exc:
                raise ConfigError(f"cannot render {relative} ({exc}); fix the template or the values given "
                                  "to it") from exc
            target.with_name(source.name[: -len(TEMPLATE_SUFFIX)]).write_text(text, encoding="utf-8")
        else:
            shutil.copy2(source, target)


def _place_engine(engine_dir: Path, target: Path, copy: bool) -> None:
    """Move (or copy) the engine folder to target."""
    if not (engine_dir / "config.json").is_file():
        raise ConfigError(f"engine folder {engine_dir} has no config.json; build the engine first")
    if copy:
        shutil.copytree(engine_dir, target)
    else:
        shutil.move(str(engine_dir), str(target))


def _copy_tokenizer(tokenizer_dir: Path, target: Path) -> None:
    """Copy the tokenizer files (a flat folder) to target."""
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        raise ConfigError(f"tokenizer folder {tokenizer_dir} is missing or empty; copy the checkpoint's "
                          "tokenizer files there first")
    shutil.copytree(tokenizer_dir, target)


def render_repository(repo_dir: Path, engine_config: EngineConfig, engine_dir: Path, tokenizer_dir: Path,
                      options: ServingOptions | None = None, copy_engine: bool = False,
                      templates_dir: Path = TEMPLATES_DIR) -> Path:
    """Write the repository (ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls) into an
    empty repo_dir.

    The engine folder is moved into tensorrt_llm/1/engine (copied when copy_engine); the tokenizer files are
    copied into preprocessing/1/tokenizer and postprocessing/1/tokenizer. Returns repo_dir.
    """
    options = options or ServingOptions()
    options.validate()
    repo_dir = Path(repo_dir)
    if repo_dir.exists() and any(repo_dir.iterdir()):
        raise OutputExistsError(f"repository folder {repo_dir} is not empty; render into a new or empty folder")
    repo_dir.mkdir(parents=True, exist_ok=True)
    context = render_context(engine_config, options)
    render_templates(Path(templates_dir) / ENGINE_MODEL, repo_dir / ENGINE_MODEL, context)
    engine_outputs = {t.name for t in parse_config(repo_dir / ENGINE_MODEL / "config.pbtxt").output}
    context["pipeline"] = pipeline_for_engine(context["pipeline"], ENGINE_MODEL, engine_outputs)
    for model in MODELS:  # only the portable models: templates_dir/engines/ holds the TensorRT-LLM targets' ones
        if model != ENGINE_MODEL:
            render_templates(Path(templates_dir) / model, repo_dir / model, context)
    for model in MODELS:
        (repo_dir / model / VERSION).mkdir(parents=True, exist_ok=True)
    for model in ("preprocessing", "postprocessing"):
        _copy_tokenizer(Path(tokenizer_dir), repo_dir / model / TOKENIZER_SUBDIR)
    _place_engine(Path(engine_dir), repo_dir / "tensorrt_llm" / ENGINE_SUBDIR, copy_engine)
    return repo_dir
