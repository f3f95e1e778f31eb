"""Model repository: render it from templates and pipeline data, then validate it as Triton will read it."""
