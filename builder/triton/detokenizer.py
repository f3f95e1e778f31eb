"""Exact incremental detokenization for streamed token chunks (pure functions, no Triton needed).

Each streamed chunk of `new` token ids arrives with up to CONTEXT_TOKENS ids that precede it in the sequence
(`detok_context_ids`) and an `is_final` flag. Its text is

    decode(context + new)[len(hold_back(decode(context))):]

where `hold_back` drops one trailing U+FFFD (the mark of a possibly incomplete UTF-8 character) unless the
chunk is final. Decoding the context together with the new ids keeps leading spaces (SentencePiece) and
multi-byte characters split over tokens exact, so the joined chunks equal the non-streamed text.

This needs a *local* decoder: the text of a token must not depend on tokens far before or after it.
Byte-level BPE (GPT-2, Llama-3, Qwen2) is local. The `ByteFallback` decoder of SentencePiece-style tokenizers
(Llama-2, Mistral) is not: one invalid byte anywhere in a run of byte tokens turns the whole run, valid
characters included, into U+FFFD. `local_byte_fallback` swaps it for a decoder that replaces only the invalid
bytes (UTF-8 "maximal subpart" replacement, as Python's and Rust's lossy decoders do); text that is valid UTF-8
decodes exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import TokenizerError

CONTEXT_TOKENS = 8
REPLACEMENT_CHAR = "\ufffd"
PER_TOKEN_DECODERS = ("Replace", "Strip")  # decoders that map each token on its own

Decode = Callable[[Sequence[int]], str]


def context_ids(sequence: Sequence[int], start: int, size: int = CONTEXT_TOKENS) -> list[int]:
    """The up-to-`size` token ids of `sequence` that precede position `start`."""
    return [int(t) for t in sequence[max(0, start - size):start]]


def hold_back(text: str) -> str:
    """`text` without one trailing U+FFFD (an incomplete UTF-8 character may still be completed)."""
    return text[:-1] if text.endswith(REPLACEMENT_CHAR) else text


def common_prefix_length(a: str, b: str) -> int:
    """Number of leading characters that a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def text_delta(decode: Decode, context: Sequence[int], new: Sequence[int], is_final: bool) -> str:
    """Text that the `new` ids add after `context`; see the module docstring.

    If decoding is not prefix-stable (decode(context + new) does not start with the decoded context), the text
    after the longest common prefix is returned: nothing is lost, at worst a few characters are repeated.
    """
    context, new = list(context), list(new)
    prefix = hold_back(decode(context)) if context else ""
    full = decode(context + new)
    if not is_final:
        full = hold_back(full)
    if full.startswith(prefix):
        return full[len(prefix):]
    return full[common_prefix_length(prefix, full):]


def _byte_value(token: str) -> int | None:
    """The byte of a SentencePiece byte-fallback token such as "<0xE4>", else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def lossy_byte_runs(tokens: Sequence[str]) -> list[str]:
    """Merge each run of byte tokens into its UTF-8 text, replacing only invalid bytes with U+FFFD."""
    out: list[str] = []
    run = bytearray()
    for token in tokens:
        value = _byte_value(token)
        if value is not None:
            run.append(value)
            continue
        if run:
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
        out.append(token)
    if run:
        out.append(run.decode("utf-8", "replace"))
    return out


@dataclass
class LocalByteFallbackChain:
    """A tokenizers custom decoder: `pre` per token, byte runs decoded lossily, then `post` on the whole list."""

    pre: Any | None
    post: Any | None

    def decode_chain(self, tokens: list[str]) -> list[str]:
        """tokenizers' Decoder.decode_chain: tokens in, decoded pieces out."""
        if self.pre is not None:
            tokens = [self.pre.decode([token]) for token in tokens]
        pieces = lossy_byte_runs(tokens)
        return [self.post.decode(pieces)] if self.post is not None else pieces

    def decode(self, tokens: list[str]) -> str:
        """tokenizers' Decoder.decode: the joined text."""
        return "".join(self.decode_chain(tokens))


def _decoder_from_json(spec: dict[str, Any]) -> Any:
    """A tokenizers decoder object built from its JSON description."""
    from tokenizers import decoders

    decoder = decoders.Fuse()
    decoder.__setstate__(json.dumps(spec).encode())
    return decoder


def _sequence(specs: list[dict[str, Any]]) -> Any | None:
    """One decoder running `specs` in order (None when empty)."""
    if not specs:
        return None
    return _decoder_from_json({"type": "Sequence", "decoders": specs})


def local_byte_fallback(backend_tokenizer: Any) -> bool:
    """Make a tokenizers.Tokenizer's ByteFallback decoding local (see module docstring); True if changed.

    Handles decoders of the form Sequence[per-token steps..., ByteFallback, any steps...] (Llama-2, Mistral,
    Gemma) and a bare ByteFallback; other decoders are left as they are.
    """
    decoder = backend_tokenizer.decoder
    if decoder is None:
        return False
    spec = json.loads(decoder.__getstate__())
    steps = spec["decoders"] if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if "ByteFallback" not in kinds:
        return False
    at = kinds.index("ByteFallback")
    if any(kind not in PER_TOKEN_DECODERS for kind in kinds[:at]):
        return False
    from tokenizers import decoders

    chain = LocalByteFallbackChain(_sequence(steps[:at]), _sequence(steps[at + 1:]))
    backend_tokenizer.decoder = decoders.Decoder.custom(chain)
    return True


@dataclass
class Detokenizer:
    """A Hugging Face tokenizer's decode, made local, with the incremental `delta` on top."""

    tokenizer: Any
    skip_special_tokens: bool = True

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (no clean-up of tokenization spaces: it would make decoding non-local)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def delta(self, context: Sequence[int], new: Sequence[int], is_final: bool) -> str:
        """Text that `new` adds after `context` (see text_delta)."""
        return text_delta(self.decode, context, new, is_final)


def make_detokenizer(tokenizer: Any, skip_special_tokens: bool = True) -> Detokenizer:
    """Wrap a loaded transformers tokenizer, switching fast tokenizers to local byte-fallback decoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        local_byte_fallback(backend)
    return Detokenizer(tokenizer, skip_special_tokens)


def load_tokenizer(tokenizer_dir: Path) -> Any:
    """AutoTokenizer from a local folder (never downloads); TokenizerError if it cannot be loaded."""
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise TokenizerError(f"tokenizer folder {tokenizer_dir} does not exist; rebuild the repository")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, legacy=False)
    except Exception as exc:  # transformers raises many types here
        raise TokenizerError(f"cannot load the tokenizer in {tokenizer_dir} ({exc}); rebuild the repository "
                             "from a checkpoint whose tokenizer loads with transformers.AutoTokenizer") from exc


def load_detokenizer(tokenizer_dir: Path, skip_special_tokens: bool = True) -> Detokenizer:
    """load_tokenizer + make_detokenizer."""
    return make_detokenizer(load_tokenizer(tokenizer_dir), skip_special_tokens)
