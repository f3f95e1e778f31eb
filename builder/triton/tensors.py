"""Helpers for the Triton models (numpy only, importable outside Triton): word lists, scalars, tensorrt_llm request
parsing, error responses."""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from builder.errors import BuilderError, RequestError
from builder.runtime.sampling_params import SamplingParams
from builder.triton.detokenizer import context_ids

# Everything parse_engine_request reads. decoder_input_ids / decoder_input_lengths (TensorRT-LLM's encoder-decoder
# inputs, wired from preprocessing's DECODER_INPUT_ID / REQUEST_DECODER_INPUT_LEN) are accepted and ignored: for a
# decoder-only model TensorRT-LLM's C++ backend ignores them too.
ENGINE_INPUTS = ("input_ids", "input_lengths", "request_output_len", "streaming", "end_id", "pad_id", "beam_width",
                 "runtime_top_k", "runtime_top_p", "temperature", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "min_tokens", "seed", "stop_words_list", "bad_words_list",
                 "exclude_input_in_output", "num_return_sequences", "decoder_input_ids", "decoder_input_lengths")
# SamplingParams field -> how tensorrt_llm's errors name it (its input, and the ensemble's where that differs)
ENGINE_LABELS = {"max_tokens": "request_output_len (ensemble: max_tokens)", "top_k": "runtime_top_k (ensemble: top_k)",
                 "top_p": "runtime_top_p (ensemble: top_p)", "stop_words": "stop_words_list (ensemble: stop_words)",
                 "bad_words": "bad_words_list (ensemble: bad_words)"}
TRUE_STRINGS = ("true", "1", "t", "y", "yes")
FALSE_STRINGS = ("false", "0", "f", "n", "no")


def read_inputs(request, names: Sequence[str], get_tensor) -> dict[str, np.ndarray]:
    """The named input tensors `request` carries, as numpy arrays; absent optional inputs are left out.

    get_tensor is pb_utils.get_input_tensor_by_name (passed in so this module stays importable outside Triton)."""
    inputs = {}
    for name in names:
        tensor = get_tensor(request, name)
        if tensor is not None:
            inputs[name] = tensor.as_numpy()
    return inputs


def error_response(pb_utils: Any, exc: Exception, model: str) -> Any:
    """A python-backend error response for exc (pb_utils passed in, as in read_inputs): INVALID_ARG with its
    message for a BuilderError (the request is at fault), else INTERNAL with one line; the traceback goes to the
    server log, never to the client."""
    if isinstance(exc, BuilderError):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    pb_utils.Logger.log_error(f"{model} failed on a request: {''.join(traceback.format_exception(exc))}")
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
        f"{model} failed ({type(exc).__name__}: {exc}); the server log has the details",
        pb_utils.TritonError.INTERNAL))


def parse_bool(value: str | None, default: bool) -> bool:
    """A config parameter as a boolean (TensorRT-LLM's spellings); default when unset or unparsable."""
    if value is None:
        return default
    text = value.strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    return default


def parameters(model_config: Mapping) -> dict[str, str]:
    """The string `parameters` of a model config (as Triton passes it to initialize, parsed from JSON)."""
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def to_word_list(words: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM word-list format [2, L]: row 0 the flat ids, row 1 the end offsets, padded (0 / -1)."""
    flat = [int(t) for word in words for t in word]
    offsets = np.cumsum([len(word) for word in words]).tolist()
    length = max(1, len(flat))
    array = np.zeros((2, length), dtype=np.int32)
    array[1, :] = -1
    array[0, :len(flat)] = flat
    array[1, :len(offsets)] = offsets
    return array


def batch_word_lists(batch: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    """One [2, L] word list per batch item, padded to a common L: shape [B, 2, L]."""
    lists = [to_word_list(words) for words in batch]
    length = max(a.shape[1] for a in lists)
    out = np.zeros((len(lists), 2, length), dtype=np.int32)
    out[:, 1, :] = -1
    for i, array in enumerate(lists):
        out[i, :, :array.shape[1]] = array
    return out


def from_word_list(array: np.ndarray, name: str = "word list") -> list[list[int]]:
    """Inverse of to_word_list for one [2, L] (or [1, 2, L]) array; negative offsets are padding.

    RequestError naming `name` when the array is not [2, L] or its offsets do not cut its ids into words."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[0] != 2:
        raise RequestError(f"{name} has shape {list(array.shape)}; send TensorRT-LLM's word-list format [2, L] "
                           "per request (row 0 the ids, row 1 the end offsets padded with -1)")
    flat, offsets = array[0].tolist(), [int(o) for o in array[1] if o >= 0]
    words, start = [], 0
    for end in offsets:
        if end < start or end > len(flat):
            raise RequestError(f"{name} offsets {offsets} are not increasing end positions within the "
                               f"{len(flat)} ids; send [ids, end offsets] as TensorRT-LLM's word-list format")
        if end > start:
            words.append([int(t) for t in flat[start:end]])
        start = end
    return words


def scalar(inputs: Mapping[str, np.ndarray], name: str, default=None):
    """The single value of a [1] / [1, 1] request tensor, or default when the tensor is absent."""
    if name not in inputs:
        return default
    values = np.asarray(inputs[name]).reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold one value per request, got {values.size}; send batch size 1")
    return values[0].item()


def required_scalar(inputs: Mapping[str, np.ndarray], name: str, what: str):
    """scalar() of an input the request must carry; RequestError naming it (and saying what it is) when absent."""
    if name not in inputs:
        raise RequestError(f"{name} is missing; send {what}")
    return scalar(inputs, name)


@dataclass
class EngineRequest:
    """A parsed tensorrt_llm request."""

    prompt: list[int]
    params: SamplingParams
    streaming: bool
    exclude_input_in_output: bool


def _prompt(inputs: Mapping[str, np.ndarray]) -> list[int]:
    """The prompt ids of a batch-1 request, cut to input_lengths."""
    if "input_ids" not in inputs:
        raise RequestError("input_ids is missing; send the prompt's token ids as input_ids [1, n]")
    ids = np.asarray(inputs["input_ids"])
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    if ids.ndim != 2:
        raise RequestError(f"input_ids has shape {list(ids.shape)}; send the prompt's token ids as [1, n]")
    if ids.shape[0] != 1:
        raise RequestError(f"input_ids holds a batch of {ids.shape[0]} sequences (from the ensemble: text_input "
                           "with several prompts); tensorrt_llm takes one per request, send each as its own request")
    length = scalar(inputs, "input_lengths", ids.shape[1])
    if not 0 < length <= ids.shape[1]:
        raise RequestError(f"input_lengths {length} does not fit input_ids of length {ids.shape[1]}; send the "
                           f"number of prompt ids, 1 to {ids.shape[1]}")
    return [int(t) for t in ids[0, :length]]


def _words(inputs: Mapping[str, np.ndarray], name: str) -> list[list[int]]:
    """A word-list input as lists of ids ([] when absent)."""
    if name not in inputs:
        return []
    array = np.asarray(inputs[name])
    if array.ndim == 3 and array.shape[0] != 1:
        raise RequestError(f"{name} must hold one word list per request, got {array.shape[0]}")
    return from_word_list(array, name)


def parse_engine_request(inputs: Mapping[str, np.ndarray], default_exclude: bool) -> EngineRequest:
    """tensorrt_llm request tensors -> prompt and SamplingParams; RequestError naming the bad input.

    Reads ENGINE_INPUTS; decoder_input_ids / decoder_input_lengths are ignored (decoder-only engine)."""
    prompt = _prompt(inputs)
    for name in ("beam_width", "num_return_sequences"):
        value = scalar(inputs, name, 1)
        if value != 1:
            raise RequestError(f"{name} {value} is not supported: this engine decodes one sequence per request; "
                               f"send {name} 1 or leave it out")
    max_tokens = required_scalar(inputs, "request_output_len",
                                 "the number of tokens to generate (ensemble: max_tokens)")
    streaming = bool(scalar(inputs, "streaming", False))
    exclude = bool(scalar(inputs, "exclude_input_in_output", default_exclude))
    seed = scalar(inputs, "seed")
    params = SamplingParams(
        max_tokens=int(max_tokens),
        temperature=float(scalar(inputs, "temperature", 1.0)),
        top_k=int(scalar(inputs, "runtime_top_k", 0)),
        top_p=float(scalar(inputs, "runtime_top_p", 0.0)),
        seed=None if seed is None else int(seed),
        repetition_penalty=float(scalar(inputs, "repetition_penalty", 1.0)),
        presence_penalty=float(scalar(inputs, "presence_penalty", 0.0)),
        frequency_penalty=float(scalar(inputs, "frequency_penalty", 0.0)),
        min_tokens=int(scalar(inputs, "min_tokens", 0)),
        end_id=_optional_int(scalar(inputs, "end_id")),
        pad_id=_optional_int(scalar(inputs, "pad_id")),
        stop_words=_words(inputs, "stop_words_list"),
        bad_words=_words(inputs, "bad_words_list"),
        streaming=streaming,
        exclude_input_in_output=exclude,
    )
    params.validate(ENGINE_LABELS)
    return EngineRequest(prompt, params, streaming, exclude)


def _optional_int(value) -> int | None:
    """int(value), or None for an absent value."""
    return None if value is None else int(value)


def decode_strings(array: np.ndarray, name: str) -> list[str]:
    """A STRING tensor's items as text; RequestError when an item is not UTF-8."""
    out = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RequestError(f"{name} is not valid UTF-8 ({exc}); send UTF-8 text") from exc
        out.append(str(item))
    return out


def engine_response(prompt: Sequence[int], generated: Sequence[int], num_new: int, request: EngineRequest,
                    final: bool) -> dict[str, np.ndarray] | None:
    """tensorrt_llm output tensors after a step that added `num_new` of the `generated` ids (None: send nothing).

    Streaming sends only the new ids; otherwise the single final response holds the prompt (unless excluded)
    and every generated id. detok_context_ids are the ids that precede output_ids in the sequence.
    """
    sequence = list(prompt) + list(generated)
    if request.streaming:
        start = len(sequence) - num_new
    elif final:
        start = len(prompt) if request.exclude_input_in_output else 0
    else:
        return None
    tokens = sequence[start:]
    return {
        "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens)),
        "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
        "detok_context_ids": np.array(context_ids(sequence, start), dtype=np.int32).reshape(1, -1),
        "is_final": np.array([[final]], dtype=bool),
    }
