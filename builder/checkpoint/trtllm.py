"""HF checkpoint -> TensorRT-LLM names: config.json -> ModelConfig and the conversion plan, both from the family file
of the checkpoint's architecture (builder.models.<family>: its config translation and weight table)."""

from __future__ import annotations

from typing import Any

from builder.config import ModelConfig
from builder.errors import CheckpointError
from builder.models import arch_spec
from builder.models.hf_config import check_hf_config
from builder.models.spec import WeightSpec

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exports still contain


def model_config_from_hf(hf_config: dict[str, Any], dtype: str) -> ModelConfig:
    """The engine's ModelConfig (TensorRT-LLM's PretrainedConfig) for an HF config.json dict: the fields every family
    reads checked first (check_hf_config), then translated by the architecture's family file."""
    check_hf_config(hf_config)
    return arch_spec(hf_config["architectures"][0], "config.json").model_config(hf_config, dtype)


def plan_weights(cfg: ModelConfig, hf_shapes: dict[str, list[int]]) -> list[WeightSpec]:
    """The family's weight table checked against the HF tensor shapes; CheckpointError on missing / extra /
    misshaped tensors."""
    plan = arch_spec(cfg.architecture).weights(cfg)
    used = {hf for row in plan for hf in row.hf}
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints still store it; the embedding is used
    extra = sorted(n for n in hf_shapes if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"unexpected tensors for {cfg.architecture}: {', '.join(extra[:5])}"
                              f"{' ...' if len(extra) > 5 else ''}; the checkpoint does not match its config.json")
    for row in plan:
        missing = [s for s in row.hf if s not in hf_shapes]
        if missing:
            raise CheckpointError(f"checkpoint lacks {', '.join(missing)}; download the complete checkpoint")
        for source, want in zip(row.hf, row.hf_shapes, strict=True):
            if tuple(hf_shapes[source]) != want:
                raise CheckpointError(f"{source} has shape {list(hf_shapes[source])}, but config.json "
                                      f"({row.fields}) implies {list(want)}; the weights do not "
                                      "match config.json: restore the original config.json and weights")
    return plan
