"""Hugging Face checkpoint reading, TensorRT-LLM checkpoint conversion, and tiny test models."""
