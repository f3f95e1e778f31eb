"""Deterministic, offline tiny random-init Hugging Face checkpoints for tests and demos: the built-in models of
builder.models.TINY_MODELS (tiny-llama, tiny-mistral, tiny-qwen2, tiny-qwen3, tiny-llama3.2)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.models import arch_spec, tiny_model

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
MAX_SHARD_SIZE = "200KB"  # the tiny model is ~0.7 MB, so this gives several shards plus an index


@dataclass(frozen=True)
class TinySpec:
    """Per-architecture choices for a tiny model: HF model type, tokenizer flavour, special tokens and defaults."""

    model_type: str
    byte_level: bool  # True: Llama-3/Qwen byte-level BPE; False: Llama-2/Mistral SentencePiece-style BPE
    bos: str | None
    eos: str
    unk: str | None
    pad: str
    tie_word_embeddings: bool
    vocab_size: int


TINY_VOCAB = 768


def tiny_spec(architecture: str) -> TinySpec:
    """The tiny-model choices of `architecture`, from its family file (ArchSpec.tiny_layout)."""
    return TinySpec(*arch_spec(architecture).tiny_layout[architecture], TINY_VOCAB)


SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
WEIGHT_STD = 0.2  # linear layers
EMBED_STD = 0.5  # embeddings / lm_head: logits std ~4, so greedy top-1 rarely sits near a tie


def make_tiny_model(dest_dir: Path, model: str = "tiny-llama", seed: int = 0) -> Path:
    """Write the built-in tiny model `model` (a builder.models.TINY_MODELS name, or an architecture name for its
    default tiny model) as an HF folder (sharded safetensors + index, config, tokenizer) into dest_dir; return it."""
    tiny = tiny_model(model)
    spec = tiny_spec(tiny.architecture)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    hf_model = _build_model(tiny.architecture, spec, tokenizer, seed, tiny.config)
    _save_quietly(hf_model, dest_dir)
    tokenizer.save_pretrained(dest_dir)
    return dest_dir


def _save_quietly(model, dest_dir: Path) -> None:
    """save_pretrained without transformers' shard progress bar (the CLI keeps stderr for errors)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(dest_dir, max_shard_size=MAX_SHARD_SIZE)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tokenizer(spec: TinySpec):
    """Train the tokenizer for `spec` on the bundled corpus and wrap it as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(spec) if spec.byte_level else _sentencepiece_bpe(spec)
    if spec.bos is not None:  # add_bos like Llama/Mistral: "<bos> text"
        from tokenizers import processors
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)])
    kwargs = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=SHAPES["max_position_embeddings"],
                                   **{k: v for k, v in kwargs.items() if v is not None})


def _corpus_lines() -> list[str]:
    """The training text, one paragraph per item."""
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def _common_chars(min_count: int) -> list[str]:
    """Characters seen at least min_count times in the corpus (with "▁" for spaces), sorted: a deterministic alphabet."""
    text = CORPUS.read_text(encoding="utf-8").replace(" ", "▁").replace("\n", "")
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    return sorted(ch for ch, n in counts.items() if n >= min_count)


def _byte_level_bpe(spec: TinySpec):
    """Llama-3/Qwen style: ByteLevel pre-tokenizer and decoder, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in (spec.bos, spec.eos) if t is not None]
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    tok.add_special_tokens(specials)  # appended after the BPE vocab, like Llama-3/Qwen
    return tok


def _sentencepiece_bpe(spec: TinySpec):
    """Llama-2/Mistral style: Metaspace "▁", byte fallback tokens <0x00>..<0xFF>, <unk>=0 <s>=1 </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = [spec.unk, spec.bos, spec.eos]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    alphabet = _common_chars(min_count=3)  # rarer characters go through byte fallback
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size - len(specials) - len(byte_tokens), show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), special_tokens=[])
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = meta
    draft.train_from_iterator(_corpus_lines(), trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
    for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    return tok


def _build_model(architecture: str, spec: TinySpec, tokenizer, seed: int, overrides: dict | None = None):
    """Instantiate the HF model from config (the spec's defaults, then overrides) and fill it with seeded,
    well-separated random weights."""
    import transformers

    config_cls = transformers.AutoConfig.for_model(spec.model_type).__class__
    fields = dict(SHAPES, vocab_size=len(tokenizer), tie_word_embeddings=spec.tie_word_embeddings,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, architectures=[architecture], dtype="float32")
    if spec.model_type == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides or {})
    config = config_cls(**fields)
    model = getattr(transformers, architecture)(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_((EMBED_STD if "embed" in name or "lm_head" in name else WEIGHT_STD) * noise)
    return model.eval()
