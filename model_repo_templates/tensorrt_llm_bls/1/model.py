"""Triton python-backend entry point of the `tensorrt_llm_bls` model; the code lives in builder.triton.bls."""

try:
    from builder.triton.bls import TritonPythonModel  # noqa: F401  (Triton looks this name up)
except ImportError as exc:  # the stub runs the first python on PATH: it must be the builder environment's
    raise ImportError(f"{exc}; the python backend stub cannot import the builder package: start tritonserver "
                      "with the builder environment's bin first on PATH (`builder serve` does this)") from exc
