"""config.json of a Hugging Face decoder: the fields every family reads, checked before anything is written (one
line naming the field and the fix), and the RoPE parameters in both spellings (transformers 5 `rope_parameters`,
older `rope_scaling`)."""

from __future__ import annotations

import math
from typing import Any

from builder.config import DTYPES
from builder.errors import CheckpointError

# Bound on config.json's max_position_embeddings (4M tokens; the longest supported models have ~1M): `builder build`
# takes max_seq_len from it by default, and an absurd value would otherwise fail only when the server allocates.
MAX_POSITION_EMBEDDINGS = 2**22
REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "sliding_window")  # absent or null: derived / unused
ROPE_SIZES = ("original_max_position_embeddings",)
ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                   "original_max_position_embeddings"), "yarn": ("factor",)}


def hf_dtype(hf_config: dict[str, Any]) -> str | None:
    """The checkpoint dtype named in an HF config (`dtype` or `torch_dtype`), or None if absent."""
    value = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if value is None:
        return None
    value = str(value).removeprefix("torch.")
    if value not in DTYPES:
        raise CheckpointError(f"config.json dtype {value!r} is not supported; pass --dtype with one of "
                              f"{', '.join(DTYPES)}")
    return value


def _rope_dicts(hf_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rope dicts an HF config may carry: transformers 5 `rope_parameters`, older `rope_scaling`."""
    return [d for d in (hf_config.get("rope_parameters"), hf_config.get("rope_scaling")) if isinstance(d, dict)]


def rope_theta(hf_config: dict[str, Any]) -> float:
    """RoPE base: top-level `rope_theta`, else the one inside rope_parameters/rope_scaling, else 10000."""
    if hf_config.get("rope_theta") is not None:
        return float(hf_config["rope_theta"])
    for d in _rope_dicts(hf_config):
        if d.get("rope_theta") is not None:
            return float(d["rope_theta"])
    return 10000.0


def rope_scaling(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """HF rope scaling (minus rope_theta) when it is a real scaling, None for plain/default RoPE."""
    for d in _rope_dicts(hf_config):
        kind = d.get("rope_type", d.get("type"))
        if kind not in (None, "default"):
            return {k: v for k, v in d.items() if k != "rope_theta"}
    return None


def _require(hf_config: dict[str, Any], key: str) -> Any:
    """hf_config[key], or CheckpointError saying which field config.json lacks."""
    if hf_config.get(key) is None:
        raise CheckpointError(f"config.json lacks {key!r}; restore the config.json of the original model")
    return hf_config[key]


def _bad_field(key: str, value: Any, want: str) -> CheckpointError:
    """The one-line error for a config.json field of the wrong type or value."""
    return CheckpointError(f"config.json: {key} must be {want}, got {value!r} ({type(value).__name__}); "
                           "restore the config.json of the original model or correct that field")


def _positive_int(key: str, value: Any) -> int:
    """value when it is an int >= 1 (JSON true/false and 64.0 are not), else CheckpointError naming key."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad_field(key, value, "a positive integer")
    return value


def _positive_number(key: str, value: Any) -> float:
    """value as a float when it is a finite number > 0 (not a bool or a string), else CheckpointError naming key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad_field(key, value, "a finite number > 0")
    return float(value)


def _check_rope_dict(key: str, rope: Any) -> None:
    """A rope_scaling / rope_parameters dict: numbers finite, factors > 0, the keys the rope type needs present."""
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise _bad_field(key, rope, "an object such as {\"rope_type\": \"linear\", \"factor\": 2.0}, or null")
    kind = rope.get("rope_type", rope.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise _bad_field(f"{key}.rope_type", kind, "a string")
    for name in ROPE_REQUIRED.get(kind, ()):
        if rope.get(name) is None:
            raise CheckpointError(f"config.json: {key} of rope_type {kind!r} lacks {name!r}; restore the "
                                  "config.json of the original model")
    for name, value in rope.items():
        if name in ROPE_SIZES and value is not None:
            _positive_int(f"{key}.{name}", value)
        elif (name == "factor" or name.endswith("_factor")) and isinstance(value, list):
            for item in value:  # longrope's short_factor / long_factor
                _positive_number(f"{key}.{name}", item)
        elif name == "factor" or name.endswith("_factor") or name == "rope_theta":
            if value is not None:
                _positive_number(f"{key}.{name}", value)
        elif isinstance(value, float) and not math.isfinite(value):  # beta_fast, mscale, ...
            raise _bad_field(f"{key}.{name}", value, "a finite number")
    if kind == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise CheckpointError(f"config.json: {key}.high_freq_factor ({rope['high_freq_factor']}) must exceed "
                              f"low_freq_factor ({rope['low_freq_factor']}); restore the config.json of the "
                              "original model")


def check_hf_config(hf_config: dict[str, Any]) -> None:
    """Check the config.json fields the conversion uses, before anything is written: CheckpointError naming the field.

    Sizes are positive integers (not strings, floats or booleans), heads divide as attention needs them
    (hidden_size by num_attention_heads when head_dim is absent, num_attention_heads by num_key_value_heads),
    max_position_embeddings is at most MAX_POSITION_EMBEDDINGS, rope_theta and rms_norm_eps are finite and > 0,
    and rope scaling factors are finite and positive.
    """
    for key in REQUIRED_SIZES:
        _positive_int(key, _require(hf_config, key))
    for key in OPTIONAL_SIZES:
        if hf_config.get(key) is not None:
            _positive_int(key, hf_config[key])
    hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads") or heads
    if hf_config.get("head_dim") is None and hidden % heads:
        raise CheckpointError(f"config.json: hidden_size ({hidden}) is not a multiple of num_attention_heads "
                              f"({heads}) and there is no head_dim; restore the config.json of the original model")
    if heads % kv_heads:
        raise CheckpointError(f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                              f"({kv_heads}); restore the config.json of the original model")
    positions = hf_config["max_position_embeddings"]
    if positions > MAX_POSITION_EMBEDDINGS:
        raise CheckpointError(f"config.json: max_position_embeddings {positions} is beyond {MAX_POSITION_EMBEDDINGS} "
                              "(builder's bound; --max-seq-len defaults to it); restore the config.json of the "
                              "original model or correct that field")
    for key in ("rope_theta", "rms_norm_eps"):
        if hf_config.get(key) is not None:
            _positive_number(key, hf_config[key])
    for key in ("rope_scaling", "rope_parameters"):
        _check_rope_dict(key, hf_config.get(key))
    for key in ("tie_word_embeddings", "mlp_bias", "attention_bias", "use_sliding_window"):
        if hf_config.get(key) is not None and not isinstance(hf_config[key], bool):
            raise _bad_field(key, hf_config[key], "true or false")
