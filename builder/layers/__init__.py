"""Layers shared by every model family (issue #12): rotary embeddings so far; linear, attention, norms,
activations and embeddings move here as the model files are split by family."""
