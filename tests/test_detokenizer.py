"""Exact incremental detokenization: random token sequences in random chunks join to the non-streamed text."""

from __future__ import annotations

import random

import pytest

from builder.triton.detokenizer import (
    REPLACEMENT_CHAR, context_ids, hold_back, local_byte_fallback, make_detokenizer, text_delta)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text must keep its spaces, its punctuation and its accents: café, naïve, über.",
    "Tokens arrive one by one; the server decodes them with a little context.",
    "東京 東京 東京 の 天気 は 晴れ です。 日本語 の テキスト。",
    "Emoji 🚀🚀 and symbols → ← ≠ ≤ appear too, as do numbers 12345 and 67890.",
    "  Leading spaces,\ttabs and\nnew lines\n\nmatter.",
] * 4
SAMPLES = [
    "Hello world",
    " a leading space",
    "café ünïcödé 東京の天気は晴れ 🚀 ok",
    "rare: 龘 𝔘𝔫𝔦 ∮ 🦜🦜 end",
    "tabs\tand\nnew lines  and  double  spaces",
]


def _wrap(tok, bos: str, eos: str, unk: str | None = None):
    """A transformers fast tokenizer around a tokenizers.Tokenizer."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"unk_token": unk} if unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   clean_up_tokenization_spaces=False, **kwargs)


def byte_level_bpe():
    """GPT-2 / Llama-3 style byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(["<s>", "</s>"])
    return _wrap(tok, "<s>", "</s>")


def sentencepiece_bpe(decoder: str):
    """Llama-2 / Mistral style: Metaspace pre-tokenizer, BPE with byte fallback tokens <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = meta
    alphabet = sorted(set("".join(CORPUS).replace(" ", "▁")) - set("龘𝔘𝔫𝔦∮🦜→←"))
    draft.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=alphabet, limit_alphabet=len(alphabet)))
    trained = draft.get_vocab()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    import json
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(draft.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    if decoder == "llama2":
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens(specials)
    return _wrap(tok, "<s>", "</s>", "<unk>")


TOKENIZERS = {"byte_level": byte_level_bpe, "sp_llama2": lambda: sentencepiece_bpe("llama2"),
              "sp_metaspace": lambda: sentencepiece_bpe("metaspace")}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer_name(request) -> str:
    """Each tokenizer flavour."""
    return request.param


@pytest.fixture()
def tokenizer(tokenizer_name):
    """A freshly trained tokenizer of each flavour (cheap: the corpus is tiny)."""
    return TOKENIZERS[tokenizer_name]()


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    """Chunk sizes (1..4) summing to n, sometimes followed by an empty final chunk (end_id step)."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(rng.randint(1, 4), n - sum(sizes)))
    if not sizes or rng.random() < 0.3:
        sizes.append(0)
    return sizes


def _stream(det, prompt: list[int], output: list[int], sizes: list[int]) -> list[str]:
    """Deltas for `output` sent in chunks of `sizes`, each with its context as the engine model sends it."""
    sequence, start, deltas = prompt + output, len(prompt), []
    for i, size in enumerate(sizes):
        deltas.append(det.delta(context_ids(sequence, start), sequence[start:start + size], i == len(sizes) - 1))
        start += size
    return deltas


def test_random_sequences_in_random_chunks_join_exactly(tokenizer):
    """Joined deltas == the non-streamed text, for random ids (invalid UTF-8 and special tokens included)."""
    det = make_detokenizer(tokenizer)
    specials = set(tokenizer.all_special_ids)
    plain = [i for i in range(len(tokenizer)) if i not in specials]
    rng = random.Random(1234)
    for _ in range(400):
        prompt = ([tokenizer.bos_token_id] if rng.random() < 0.5 else []) + rng.choices(plain, k=rng.randint(1, 12))
        output = rng.choices(range(len(tokenizer)), k=rng.randint(0, 40))
        whole = det.delta(context_ids(prompt + output, len(prompt)), output, True)
        joined = "".join(_stream(det, prompt, output, _random_chunks(rng, len(output))))
        assert joined == whole, (prompt, output)
        assert det.decode(prompt + output) == hold_back(det.decode(prompt)) + whole, (prompt, output)


def test_real_text_streams_token_by_token(tokenizer):
    """Encoded text streamed one token at a time rebuilds the text, spaces and split characters included."""
    det = make_detokenizer(tokenizer)
    for prompt_text in SAMPLES:
        for output_text in SAMPLES:
            prompt = tokenizer(prompt_text).input_ids
            both = tokenizer(prompt_text + output_text).input_ids
            output = both[len(prompt):] if both[:len(prompt)] == prompt else tokenizer(
                output_text, add_special_tokens=False).input_ids
            deltas = _stream(det, prompt, output, [1] * len(output) + [0])
            whole = det.delta(context_ids(prompt + output, len(prompt)), output, True)
            assert "".join(deltas) == whole
            assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas
            assert det.decode(prompt + output) == det.decode(prompt) + whole


def test_valid_text_decodes_as_the_original_tokenizer(tokenizer_name):
    """The local byte-fallback decoder changes nothing for valid UTF-8."""
    original = TOKENIZERS[tokenizer_name]()
    det = make_detokenizer(TOKENIZERS[tokenizer_name]())
    for text in SAMPLES + CORPUS[:6]:
        ids = original(text).input_ids
        assert det.decode(ids) == original.decode(ids, skip_special_tokens=True)


def test_byte_fallback_is_made_local():
    """One invalid byte no longer turns a whole run of byte tokens (valid characters too) into U+FFFD."""
    tokenizer = sentencepiece_bpe("llama2")
    ids = tokenizer.convert_tokens_to_ids(["<0x38>", "<0xE4>", "<0xB8>", "<0xAD>", "<0x83>"])
    assert tokenizer.decode(ids) == REPLACEMENT_CHAR * 5  # tokenizers' ByteFallback
    assert local_byte_fallback(tokenizer.backend_tokenizer)
    assert tokenizer.decode(ids) == "8中" + REPLACEMENT_CHAR
    assert not local_byte_fallback(byte_level_bpe().backend_tokenizer)


def test_leading_space_and_incomplete_character():
    """The context keeps a SentencePiece leading space; an incomplete character waits for its last byte."""
    det = make_detokenizer(sentencepiece_bpe("llama2"))
    tok = det.tokenizer
    prompt = tok("Hello").input_ids
    world = tok("Hello world").input_ids[len(prompt):]
    assert det.delta(prompt, world, False) == " world"
    e4, b8, ad = tok.convert_tokens_to_ids(["<0xE4>", "<0xB8>", "<0xAD>"])
    assert det.delta(prompt, [e4, b8], False) == ""
    assert det.delta(prompt + [e4], [b8], False) == ""
    assert det.delta(prompt + [e4, b8], [ad], False) == "中"
    assert det.delta(prompt, [e4, b8], True) == REPLACEMENT_CHAR


def test_non_prefix_stable_decode_falls_back():
    """A decoder that rewrites earlier text yields the text after the common prefix, never an exception."""
    def decode(ids):
        return "ab" if len(ids) < 3 else "aXcd"

    assert text_delta(decode, [1, 2], [3], True) == "Xcd"
    assert text_delta(decode, [], [1, 2], False) == "ab"
    assert context_ids(list(range(20)), 15) == list(range(7, 15))
    assert context_ids([1, 2], 1) == [1]
    assert hold_back("a" + REPLACEMENT_CHAR * 2) == "a" + REPLACEMENT_CHAR
