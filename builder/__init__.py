"""builder: Hugging Face checkpoint -> TensorRT-LLM checkpoint + portable engine -> Triton model repository."""

__version__ = "0.1.0"
