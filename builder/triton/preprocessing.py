"""The `preprocessing` model: text -> token ids (+ stop/bad word lists, end/pad ids) with the HF tokenizer.

Prompts are checked against the engine's max_input_len (the `max_input_len` parameter) twice: by their UTF-8
length before tokenizing (a prompt longer than max_input_len * bytes_per_token bytes cannot fit, whatever its
text; see max_bytes_per_token), so that a huge prompt is refused at once instead of holding this instance for
seconds, and by their token count after.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import RequestError
from builder.triton.detokenizer import load_tokenizer
from builder.triton.tensors import (
    batch_word_lists, decode_strings, error_response, parameters, parse_bool, read_inputs)
from builder.triton.watchdog import StubWatchdog

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's python backend (unit tests use Preprocessor directly)
    pb_utils = None

INPUTS = ("QUERY", "DECODER_QUERY", "REQUEST_OUTPUT_LEN", "BAD_WORDS_DICT", "STOP_WORDS_DICT", "END_ID", "PAD_ID")
# preprocessing input -> the ensemble input wired to it: errors name both, clients of the ensemble know the latter
ENSEMBLE_NAMES = {"QUERY": "text_input", "DECODER_QUERY": "decoder_text_input", "REQUEST_OUTPUT_LEN": "max_tokens",
                  "BAD_WORDS_DICT": "bad_words", "STOP_WORDS_DICT": "stop_words", "END_ID": "end_id",
                  "PAD_ID": "pad_id"}
MAX_CHAR_BYTES = 4  # UTF-8 bytes of one character
# normalizers that never shrink text, or shrink it at most MAX_CHAR_BYTES times (one character -> at least one byte)
NORMALIZER_SHRINK = {"Prepend": 1, "NFC": MAX_CHAR_BYTES, "NFD": MAX_CHAR_BYTES, "NFKC": MAX_CHAR_BYTES,
                     "NFKD": MAX_CHAR_BYTES, "Lowercase": MAX_CHAR_BYTES}
# pre-tokenizers that keep every byte of their input (Split / Punctuation unless their behaviour is "Removed")
KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation", "Sequence")


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """An upper bound on the UTF-8 bytes of prompt text one token can stand for; None when there is none.

    The longest token of the vocabulary (added tokens included) in UTF-8 bytes (at least MAX_CHAR_BYTES: an
    unknown character becomes one unk token): byte-level and SentencePiece vocabularies spell each token with at
    least as many bytes as the text it covers. Times MAX_CHAR_BYTES behind a Unicode or lowercasing normalizer
    (they can shrink text, never more). None when text can vanish or collapse into one token without bound:
    a normalizer or pre-tokenizer that deletes text (Strip, StripAccents, whitespace splitting, ...), added
    tokens that swallow the whitespace next to them (lstrip/rstrip), runs of unknown characters fused into
    one unk token, WordPiece / WordLevel models, or a tokenizer without a tokenizers backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    factor = _normalizer_shrink(spec.get("normalizer"))
    pre = spec.get("pre_tokenizer")
    if factor is None or not _keeps_text(pre) or not _model_bounded(spec.get("model") or {}, pre):
        return None
    if any(token.get("lstrip") or token.get("rstrip") for token in spec.get("added_tokens", [])):
        return None
    longest = max(len(token.encode("utf-8")) for token in backend.get_vocab(with_added_tokens=True))
    return max(longest, MAX_CHAR_BYTES) * factor


def _normalizer_shrink(spec: dict | None) -> int | None:
    """How many times a normalizer can shrink text at most (1: never); None when without bound or unknown."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factors = [_normalizer_shrink(part) for part in spec.get("normalizers", [])]
        return None if None in factors else math.prod(factors)
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:  # a regex, or a deletion
            return None
        return max(1, math.ceil(len(pattern.encode()) / len(content.encode())))
    return NORMALIZER_SHRINK.get(kind)


def _keeps_text(spec: dict | None) -> bool:
    """True when a pre-tokenizer passes every byte of its input on."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind not in KEEPING_PRE_TOKENIZERS or str(spec.get("behavior", "")).lower() == "removed":
        return False
    return all(_keeps_text(part) for part in spec.get("pretokenizers", []))


def _model_bounded(model: dict, pre_tokenizer: dict | None) -> bool:
    """True when the tokenization model gives at least one token per MAX_CHAR_BYTES bytes it cannot match."""
    if model.get("byte_fallback"):
        return True
    if model.get("type") == "BPE":  # a byte-level alphabet matches everything; else each unknown char is one unk
        return "ByteLevel" in json.dumps(pre_tokenizer) or bool(model.get("unk_token") and not model.get("fuse_unk"))
    return False


def _byte_length(item: Any) -> int:
    """UTF-8 length of one STRING tensor item (bytes from Triton; str in unit tests)."""
    return len(item) if isinstance(item, (bytes, bytearray)) else len(str(item).encode("utf-8"))


def _label(name: str) -> str:
    """How errors name a preprocessing input: the ensemble's name, then ours."""
    return f"{ENSEMBLE_NAMES[name]} ({name})"


@dataclass
class Preprocessor:
    """Tokenizes a batch of requests into the tensors tensorrt_llm takes.

    max_input_len: the engine's (None: prompts are not checked here, the engine still checks them);
    bytes_per_token: max_bytes_per_token(tokenizer) (None: no check before tokenizing)."""

    tokenizer: Any
    add_special_tokens: bool = True
    max_input_len: int | None = None
    bytes_per_token: int | None = None

    @property
    def end_id(self) -> int:
        """The tokenizer's eos id (-1, never matched, when it has none)."""
        eos = self.tokenizer.eos_token_id
        return -1 if eos is None else int(eos)

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id, else its eos id."""
        pad = self.tokenizer.pad_token_id
        return self.end_id if pad is None else int(pad)

    @property
    def max_text_bytes(self) -> int | None:
        """The most UTF-8 bytes a text of max_input_len tokens can have (None: unknown)."""
        if self.max_input_len is None or self.bytes_per_token is None:
            return None
        return self.max_input_len * self.bytes_per_token

    def encode(self, text: str, name: str = "text_input") -> list[int]:
        """Token ids of one prompt; RequestError when it is empty or longer than max_input_len tokens."""
        if not text:
            raise RequestError(f"{name} is empty; send at least one character")
        ids = list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))
        if self.max_input_len is not None and len(ids) > self.max_input_len:
            raise RequestError(f"{name} is {len(ids)} tokens long, more than the engine's max_input_len "
                               f"({self.max_input_len}); shorten it or rebuild with a larger --max-input-len")
        return ids

    def word_ids(self, words: list[str]) -> list[list[int]]:
        """Token ids of each stop/bad word (empty words are skipped)."""
        return [ids for ids in (self.tokenizer.encode(w, add_special_tokens=False) for w in words if w) if ids]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Request tensors (batch B) -> output tensors, prompts right-padded with the pad id.

        RequestError naming the input (the ensemble's name and ours) for a missing or malformed one."""
        texts = self._texts(inputs, "QUERY")
        batch = len(texts)
        output_len = self._per_item(inputs, "REQUEST_OUTPUT_LEN", batch, required=True)
        end_ids = self._per_item(inputs, "END_ID", batch, default=self.end_id)
        pad_ids = self._per_item(inputs, "PAD_ID", batch, default=self.pad_id)
        stop_words = self._words(inputs, "STOP_WORDS_DICT", batch)  # their byte checks before any tokenizing
        bad_words = self._words(inputs, "BAD_WORDS_DICT", batch)
        prompts = [self.encode(text) for text in texts]
        decoder_ids, decoder_lengths = self._decoder(inputs, batch, pad_ids)
        return {
            "INPUT_ID": self._padded(prompts, self.pad_id),
            "REQUEST_INPUT_LEN": np.array([[len(p)] for p in prompts], dtype=np.int32),
            "DECODER_INPUT_ID": decoder_ids,
            "REQUEST_DECODER_INPUT_LEN": decoder_lengths,
            "REQUEST_OUTPUT_LEN": output_len,
            "STOP_WORDS_IDS": stop_words,
            "BAD_WORDS_IDS": bad_words,
            "OUT_END_ID": end_ids,
            "OUT_PAD_ID": pad_ids,
        }

    def _texts(self, inputs: Mapping[str, np.ndarray], name: str) -> list[str]:
        """A STRING [B, 1] input's B texts, each checked against max_text_bytes before it is decoded."""
        if name not in inputs:
            raise RequestError(f"{_label(name)} is missing; send the prompt text as {ENSEMBLE_NAMES[name]}")
        array = np.asarray(inputs[name], dtype=object)
        array = array.reshape(-1, 1) if array.ndim < 2 else array
        if array.ndim != 2 or array.shape[1] != 1:
            raise RequestError(f"{_label(name)} has shape {list(array.shape)}; send one text per request, "
                               "shape [1, 1]")
        limit = self.max_text_bytes
        for item in array[:, 0]:
            size = _byte_length(item)
            if limit is not None and size > limit:
                raise RequestError(
                    f"{ENSEMBLE_NAMES[name]} is {size} bytes; a prompt of the engine's max_input_len "
                    f"({self.max_input_len}) tokens has at most {limit} bytes with this tokenizer (at most "
                    f"{self.bytes_per_token} bytes per token), so it cannot fit: shorten it or rebuild with a larger "
                    "--max-input-len")
        return decode_strings(array, ENSEMBLE_NAMES[name])

    def _decoder(self, inputs: Mapping[str, np.ndarray], batch: int,
                 pad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DECODER_INPUT_ID [B, n] and REQUEST_DECODER_INPUT_LEN [B, 1], as TensorRT-LLM's preprocessing makes them:
        the pad id and length 1 without a DECODER_QUERY (or for an empty one), else its tokens. tensorrt_llm ignores
        both for a decoder-only model (TensorRT-LLM's C++ backend does too)."""
        pads = [[int(p)] for p in pad_ids[:, 0]]
        if "DECODER_QUERY" not in inputs:
            return np.array(pads, dtype=np.int32), np.ones((batch, 1), dtype=np.int32)
        texts = self._texts(inputs, "DECODER_QUERY")
        if len(texts) != batch:
            raise RequestError(f"{_label('DECODER_QUERY')} holds {len(texts)} texts for {batch} prompts; send one "
                               "per prompt")
        ids = [self.encode(text, "decoder_text_input") if text else pad for text, pad in zip(texts, pads)]
        return self._padded(ids, self.pad_id), np.array([[len(i)] for i in ids], dtype=np.int32)

    @staticmethod
    def _padded(rows: list[list[int]], pad_id: int) -> np.ndarray:
        """Id lists as one INT32 [B, longest] array, right-padded with pad_id."""
        out = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    @staticmethod
    def _per_item(inputs: Mapping[str, np.ndarray], name: str, batch: int, default: int | None = None,
                  required: bool = False) -> np.ndarray:
        """An INT32 [B, 1] input (REQUEST_OUTPUT_LEN, END_ID, PAD_ID), default where the request has none."""
        if name not in inputs:
            if required:
                raise RequestError(f"{_label(name)} is missing; send it with each request")
            return np.full((batch, 1), default, dtype=np.int32)
        values = np.asarray(inputs[name])
        if values.size != batch:
            raise RequestError(f"{_label(name)} holds {values.size} values for {batch} prompts; send one per prompt")
        return values.astype(np.int32).reshape(batch, 1)

    def _words(self, inputs: Mapping[str, np.ndarray], name: str, batch: int) -> np.ndarray:
        """A STRING [B, n] word input as a [B, 2, L] id word list; each row's bytes checked like a prompt's."""
        if name not in inputs:
            return batch_word_lists([[] for _ in range(batch)])
        rows = np.asarray(inputs[name], dtype=object)
        if rows.ndim > 2 or (rows.ndim == 2 and rows.shape[0] != batch) or rows.size == 0:
            raise RequestError(f"{_label(name)} has shape {list(rows.shape)} for {batch} prompts; send a list of "
                               "words per prompt, shape [1, n]")
        rows = rows.reshape(batch, -1)
        limit, label = self.max_text_bytes, ENSEMBLE_NAMES[name]
        for row in rows:
            size = sum(_byte_length(item) for item in row)
            if limit is not None and size > limit:
                raise RequestError(f"{label} holds {size} bytes of words, more than the {limit} bytes that the "
                                   f"engine's max_input_len ({self.max_input_len}) tokens can hold; send fewer or "
                                   "shorter words")
        return batch_word_lists([self.word_ids(decode_strings(row, label)) for row in rows])


def load_preprocessor(model_dir: Path, params: Mapping[str, str]) -> Preprocessor:
    """The Preprocessor for a model folder from its config parameters (max_input_len: the engine's, optional)."""
    tokenizer = load_tokenizer(model_dir / params.get("tokenizer_dir", "1/tokenizer"))
    max_input_len = params.get("max_input_len") or None
    return Preprocessor(tokenizer, parse_bool(params.get("add_special_tokens"), True),
                        int(max_input_len) if max_input_len else None, max_bytes_per_token(tokenizer))


class TritonPythonModel:
    """Triton python-backend model wrapping Preprocessor."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the tokenizer from the model folder (local files only)."""
        config = json.loads(args["model_config"])
        self.watchdog = StubWatchdog(args["model_name"], pb_utils.Logger.log_error)
        self.preprocessor = load_preprocessor(Path(args["model_repository"]), parameters(config))
        if self.preprocessor.max_text_bytes is None:
            pb_utils.Logger.log_warn(
                "preprocessing: prompts are not length-checked before tokenizing (no max_input_len parameter, or "
                "a tokenizer without a bound on the bytes per token); the engine still checks their token count")

    def execute(self, requests: list) -> list:
        """One response per request; a bad request gets an error response, the others are unaffected."""
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        """Run one request."""
        try:
            outputs = self.preprocessor.run(read_inputs(request, INPUTS, pb_utils.get_input_tensor_by_name))
        except Exception as exc:  # noqa: BLE001  answered as an error response; never a traceback to the client
            return error_response(pb_utils, exc, "preprocessing")
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def finalize(self) -> None:
        """Stop the stub watchdog."""
        self.watchdog.close()
