"""Triton python-backend models (preprocessing, tensorrt_llm, postprocessing) and the incremental detokenizer."""
