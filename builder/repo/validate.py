"""Validate a rendered model repository the way Triton will read it: configs, ensemble wiring, files on disk.

The tensorrt_llm_bls model runs the same wiring as the ensemble from its 1/pipeline.json (BLS requests instead of
ensemble steps): that wiring is checked as if it were an ensemble with the BLS's inputs and outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.errors import RepositoryValidationError
from builder.repo.trtllm_validate import check_trtllm_target, is_llmapi_model
from builder.repo.trtllm_validate import data_dirs as trtllm_data_dirs
from builder.triton.tensors import FALSE_STRINGS, TRUE_STRINGS

PLACEHOLDER = b"${"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # one of them, plus tokenizer_config.json
ENGINE_FILES = ("config.json", "build_config.json")


@dataclass(frozen=True)
class Tensor:
    """One declared input or output of a model."""

    name: str
    data_type: str
    optional: bool = False


@dataclass
class Model:
    """A parsed model folder."""

    folder: Path
    config: model_config_pb2.ModelConfig
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The folder name (Triton's model name)."""
        return self.folder.name

    @property
    def decoupled(self) -> bool:
        """model_transaction_policy { decoupled: true }."""
        return self.config.model_transaction_policy.decoupled


def _dtype(value: int) -> str:
    """DataType enum value -> its name (TYPE_INT32, ...)."""
    return model_config_pb2.DataType.Name(value)


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt exactly as Triton does (text-format ModelConfig); ParseError if invalid."""
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def load_model(folder: Path, problems: list[str]) -> Model | None:
    """Parse folder/config.pbtxt into a Model, or record why it cannot be read."""
    path = folder / "config.pbtxt"
    if not path.is_file():
        problems.append(f"{folder.name}: config.pbtxt is missing")
        return None
    try:
        config = parse_config(path)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        problems.append(f"{folder.name}/config.pbtxt does not parse as a Triton ModelConfig: {exc}")
        return None
    model = Model(folder, config)
    model.inputs = {t.name: Tensor(t.name, _dtype(t.data_type), t.optional) for t in config.input}
    model.outputs = {t.name: Tensor(t.name, _dtype(t.data_type)) for t in config.output}
    if config.name != folder.name:
        problems.append(f"{folder.name}/config.pbtxt: name {config.name!r} differs from its folder "
                        f"{folder.name!r}; Triton requires them equal")
    return model


def load_models(repo_dir: Path, problems: list[str]) -> dict[str, Model]:
    """Every model folder of the repository that parses."""
    models = {}
    for folder in sorted(p for p in repo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model = load_model(folder, problems)
        if model is not None:
            models[model.name] = model
    if not models and not problems:
        problems.append(f"{repo_dir} holds no model folders")
    return models


def _parameter(model: Model, key: str) -> str | None:
    """A string parameter of the model, or None when absent."""
    if key not in model.config.parameters:
        return None
    return model.config.parameters[key].string_value


def _version_dirs(model: Model) -> list[Path]:
    """The numeric version folders of a model."""
    return [p for p in model.folder.iterdir() if p.is_dir() and p.name.isdigit()]


def check_model_files(model: Model) -> list[str]:
    """Version folder, model.py for python models, and the folders named by parameters."""
    problems = []
    versions = _version_dirs(model)
    if not versions:
        problems.append(f"{model.name}: no version folder (e.g. {model.name}/1)")
    if model.config.backend == "python" and not any((v / "model.py").is_file() for v in versions) \
            and not is_llmapi_model(model):  # TensorRT-LLM's llmapi model.py comes with TensorRT-LLM (launch_triton.sh)
        problems.append(f"{model.name}: python backend model without {model.name}/1/model.py")
    if not model.config.backend and not model.config.platform:
        problems.append(f"{model.name}: config.pbtxt names neither a backend nor a platform")
    tokenizer = _parameter(model, "tokenizer_dir")
    if tokenizer is not None:
        problems += check_tokenizer_dir(model, model.folder / tokenizer)
    engine = _parameter(model, "gpt_model_path")
    if engine is not None and model.config.backend != "tensorrtllm":  # the C++ backend's engine is built later
        problems += check_engine_dir(model, model.folder / engine)
    problems += check_trtllm_target(model)  # TensorRT-LLM engine models (--backend tensorrtllm / trtllm-pytorch)
    return problems


def check_tokenizer_dir(model: Model, path: Path) -> list[str]:
    """The tokenizer folder holds a loadable set of files."""
    if not path.is_dir():
        return [f"{model.name}: tokenizer_dir {path} does not exist"]
    problems = []
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{model.name}: tokenizer_dir {path} has neither {' nor '.join(TOKENIZER_FILES)}")
    if not (path / "tokenizer_config.json").is_file():
        problems.append(f"{model.name}: tokenizer_dir {path} lacks tokenizer_config.json")
    return problems


def check_engine_dir(model: Model, path: Path) -> list[str]:
    """The engine folder holds config.json, build_config.json and one rank{N}.safetensors per rank."""
    if not path.is_dir():
        return [f"{model.name}: gpt_model_path {path} does not exist"]
    problems = [f"{model.name}: engine folder {path} lacks {name}" for name in ENGINE_FILES
                if not (path / name).is_file()]
    world_size = 1
    if (path / "config.json").is_file():
        try:
            world_size = int(json.loads((path / "config.json").read_text()).get("mapping", {}).get("world_size", 1))
        except (ValueError, TypeError, AttributeError) as exc:
            problems.append(f"{model.name}: engine config.json is not valid ({exc})")
    problems += [f"{model.name}: engine folder {path} lacks rank{rank}.safetensors"
                 for rank in range(world_size) if not (path / f"rank{rank}.safetensors").is_file()]
    return problems


def _data_dirs(models: dict[str, Model]) -> list[Path]:
    """Folders of copied data (tokenizers, engines) that placeholders are not searched in."""
    dirs = []
    for model in models.values():
        for key in ("tokenizer_dir", "gpt_model_path"):
            value = _parameter(model, key)
            if value:
                dirs.append((model.folder / value).resolve())
        dirs += trtllm_data_dirs(model)
    return dirs


def check_placeholders(repo_dir: Path, models: dict[str, Model]) -> list[str]:
    """No unfilled `${...}` in any rendered file (copied tokenizer files and engine weights are data)."""
    skip = _data_dirs(models)
    problems = []
    for path in sorted(p for p in repo_dir.rglob("*") if p.is_file()):
        inside_data = any(parent in skip for parent in path.resolve().parents)
        if inside_data and path.name not in ENGINE_FILES:
            continue
        if PLACEHOLDER in path.read_bytes():
            problems.append(f"{path.relative_to(repo_dir)} still holds an unfilled '${{...}}' placeholder")
    return problems


def _tensor_types(ensemble: Model, models: dict[str, Model]) -> tuple[dict[str, str], list[str]]:
    """dtype of every tensor an ensemble step produces (ensemble inputs included), and duplicate producers."""
    types = {name: t.data_type for name, t in ensemble.inputs.items()}
    problems = []
    for step in ensemble.config.ensemble_scheduling.step:
        model = models.get(step.model_name)
        for key, value in step.output_map.items():
            if value in types:
                problems.append(f"{ensemble.name}: tensor {value!r} is produced more than once")
            if model is not None and key in model.outputs:
                types[value] = model.outputs[key].data_type
    return types, problems


def _check_step(ensemble: Model, index: int, step, models: dict[str, Model], types: dict[str, str]) -> list[str]:
    """One ensemble step: model exists, keys are its tensors, dtypes match, required inputs are fed."""
    where = f"{ensemble.name} step {index} ({step.model_name})"
    model = models.get(step.model_name)
    if model is None:
        return [f"{where}: no model folder {step.model_name!r} in the repository"]
    problems = []
    for key, value in step.input_map.items():
        if key not in model.inputs:
            problems.append(f"{where}: {key!r} is not an input of {model.name}")
        elif value not in types:
            problems.append(f"{where}: input {key!r} reads {value!r}, which no ensemble input or step produces")
        elif types[value] != model.inputs[key].data_type:
            problems.append(f"{where}: input {key!r} is {model.inputs[key].data_type} but ensemble tensor "
                            f"{value!r} is {types[value]}")
    for key in step.output_map:
        if key not in model.outputs:
            problems.append(f"{where}: {key!r} is not an output of {model.name}")
    problems += [f"{where}: required input {name!r} is not mapped" for name, tensor in model.inputs.items()
                 if not tensor.optional and name not in step.input_map]
    return problems


def check_decoupled_sources(ensemble: Model, models: dict[str, Model]) -> list[str]:
    """No step takes inputs that come from different decoupled models, or from a decoupled model and from outside
    it (Triton refuses such an ensemble: a decoupled step's responses cannot be matched with other tensors).

    Each tensor's source is the last decoupled model upstream of it (None: none, e.g. an ensemble input); steps are
    followed in order, as ensembles/ lists them."""
    sources: dict[str, str | None] = {name: None for name in ensemble.inputs}
    problems = []
    for index, step in enumerate(ensemble.config.ensemble_scheduling.step):
        found = {sources[value] for value in step.input_map.values() if value in sources}
        if len(found) > 1:
            named = ", ".join(sorted(s or "outside any decoupled model" for s in found))
            problems.append(f"{ensemble.name} step {index} ({step.model_name}): its inputs come from different "
                            f"decoupled sources ({named}); Triton refuses such an ensemble, so feed this step only "
                            "from one decoupled model's outputs")
        model = models.get(step.model_name)
        source = step.model_name if model is not None and model.decoupled else next(iter(found), None)
        for value in step.output_map.values():
            sources[value] = source
    return problems


def check_ensemble(ensemble: Model, models: dict[str, Model]) -> list[str]:
    """Steps name existing models and real tensors; dtypes match; every ensemble input/output is wired; no step
    mixes decoupled sources."""
    steps = list(ensemble.config.ensemble_scheduling.step)
    if not steps:
        return [f"{ensemble.name}: platform ensemble without ensemble_scheduling steps"]
    types, problems = _tensor_types(ensemble, models)
    for index, step in enumerate(steps):
        problems += _check_step(ensemble, index, step, models, types)
    problems += check_decoupled_sources(ensemble, models)
    consumed = {value for step in steps for value in step.input_map.values()}
    produced = {value for step in steps for value in step.output_map.values()}
    problems += [f"{ensemble.name}: input {name!r} is not used by any step" for name in ensemble.inputs
                 if name not in consumed]
    for name, tensor in ensemble.outputs.items():
        if name not in produced:
            problems.append(f"{ensemble.name}: output {name!r} is not produced by any step")
        elif types.get(name) not in (None, tensor.data_type):
            problems.append(f"{ensemble.name}: output {name!r} is {tensor.data_type} but its step produces "
                            f"{types[name]}")
    return problems


def bls_pipeline(model: Model) -> tuple[dict | None, list[str]]:
    """The step list a BLS model runs (its `pipeline` parameter names the JSON file), or why it cannot be read;
    (None, []) for a model without that parameter."""
    relative = _parameter(model, "pipeline")
    if relative is None:
        return None, []
    path = model.folder / relative
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, [f"{model.name}: pipeline {relative} cannot be read as JSON ({exc})"]
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("model"), str)
                                              and isinstance(s.get("inputs"), dict)
                                              and isinstance(s.get("outputs"), dict) for s in steps):
        return None, [f"{model.name}: pipeline {relative} has no list of steps (each with model, inputs, outputs)"]
    if sum(1 for s in steps if s.get("engine")) != 1:
        return None, [f"{model.name}: pipeline {relative} must mark exactly one step as the engine (engine: true)"]
    return data, []


def check_bls(model: Model, models: dict[str, Model]) -> list[str]:
    """A tensorrt_llm_bls model: its pipeline's wiring checked as an ensemble with the BLS's inputs and outputs (the
    engine step calls tensorrt_llm_model_name), its parameters parse, and it is decoupled exactly when its engine
    model is (streaming needs both; a unary BLS over a decoupled engine would refuse stream=true that the ensemble
    accepts)."""
    data, problems = bls_pipeline(model)
    if data is None:
        return problems
    params = {key: value.string_value for key, value in model.config.parameters.items()}
    if params.get("accumulate_tokens", "false").strip().lower() not in TRUE_STRINGS + FALSE_STRINGS:
        problems.append(f"{model.name}: parameter accumulate_tokens = {params['accumulate_tokens']!r} is not a boolean")
    engine_name = params.get("tensorrt_llm_model_name") or "tensorrt_llm"
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(model.config)
    for step in data["steps"]:
        entry = config.ensemble_scheduling.step.add(model_name=engine_name if step.get("engine") else step["model"],
                                                    model_version=-1)
        entry.input_map.update(step["inputs"])
        entry.output_map.update(step["outputs"])
    problems += check_ensemble(Model(model.folder, config, model.inputs, model.outputs), models)
    engine = models.get(engine_name)
    if engine is not None and engine.decoupled != model.decoupled:
        problems.append(f"{model.name}: decoupled is {str(model.decoupled).lower()} but its engine model "
                        f"{engine_name} has {str(engine.decoupled).lower()}; build with one --decoupled-mode for both")
    return problems


def find_problems(repo_dir: Path) -> list[str]:
    """Every problem validate_repository would report (empty when the repository is valid)."""
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        return [f"repository folder {repo_dir} does not exist"]
    problems: list[str] = []
    models = load_models(repo_dir, problems)
    for model in models.values():
        problems += check_model_files(model)
        if model.config.platform == "ensemble":
            problems += check_ensemble(model, models)
        elif model.config.backend == "python":
            problems += check_bls(model, models)
    problems += check_placeholders(repo_dir, models)
    return problems


def validate_repository(repo_dir: Path) -> None:
    """Raise RepositoryValidationError (with .problems) listing everything wrong with the repository."""
    problems = find_problems(repo_dir)
    if problems:
        error = RepositoryValidationError(f"model repository {repo_dir} is invalid ({len(problems)} problem"
                                          f"{'s' if len(problems) > 1 else ''}): " + "; ".join(problems)
                                          + "; rebuild it with `builder build`")
        error.problems = problems
        raise error
