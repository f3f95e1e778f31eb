"""The committed trained reference model: small, loads offline, is a supported Llama, and is genuinely trained."""

from __future__ import annotations

import pytest

from builder.checkpoint.reference import (TEST_MAX_TOKENS, heldout_documents, heldout_perplexity, heldout_text,
                                          load_reference, reference_model_dir, train_log)

SIZE_LIMIT = 5_000_000  # bytes: the whole committed folder


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_folder_is_small_and_complete():
    folder = reference_model_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt",
            "train_log.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) < SIZE_LIMIT


def test_builder_reads_it():
    from builder.checkpoint.hf import HFCheckpoint, check_tokenizer

    checkpoint = HFCheckpoint(reference_model_dir())  # raises unless the architecture and weights are supported
    check_tokenizer(reference_model_dir())
    config = checkpoint.config
    assert checkpoint.architecture == "LlamaForCausalLM"
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    # every linear's input width is a multiple of the default int4 group size (128)
    assert config["hidden_size"] % 128 == 0 and config["intermediate_size"] % 128 == 0
    assert config["num_attention_heads"] * config["head_dim"] % 128 == 0


def test_heldout_text():
    docs = heldout_documents()
    assert len(docs) >= 10
    text = heldout_text()
    assert 50_000 < len(text.encode("utf-8")) < 200_000
    assert "\f" not in text


def test_heldout_perplexity_shows_a_trained_model(reference):
    model, tokenizer = reference
    vocab = model.config.vocab_size
    ppl = heldout_perplexity(model, tokenizer)
    recorded = train_log()["final"]
    assert recorded["test_slice_tokens"] == TEST_MAX_TOKENS
    # Same number as training measured (other torch/transformers versions move it slightly), and far below
    # the vocabulary size that an untrained model scores.
    assert ppl == pytest.approx(recorded["test_slice_perplexity"], rel=0.05)
    assert ppl < 0.02 * vocab
    assert recorded["heldout_perplexity"] < 0.01 * vocab


def test_tokenizer_round_trips_and_adds_bos(reference):
    _, tokenizer = reference
    text = "The --verbose option prints each file name as it is copied."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text) / 2  # a trained BPE, not bytes
