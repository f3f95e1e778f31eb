"""Shared fixtures: tiny checkpoints, built repositories and running tritonservers (session-scoped, built once)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.models import REGISTRY

sys.path.insert(0, str(Path(__file__).parent))

ARCHITECTURES = tuple(REGISTRY)  # every registered architecture (builder.models.REGISTRY)
# built-in variants of a registered architecture, served like one (builder.models.TINY_MODELS)
VARIANTS = ("tiny-llama3.2",)


UPSTREAM_BUG_ENV = "BUILDER_UPSTREAM_BUG_TESTS"


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "upstream_bug(why): fails intermittently on a known Triton defect; runs only "
                            f"with {UPSTREAM_BUG_ENV}=1")


def pytest_collection_modifyitems(config, items) -> None:
    """Skip (with the reason shown by -rs) the tests marked upstream_bug unless BUILDER_UPSTREAM_BUG_TESTS=1."""
    import os

    if os.environ.get(UPSTREAM_BUG_ENV) == "1":
        return
    for item in items:
        marker = item.get_closest_marker("upstream_bug")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"{marker.args[0]} (run with {UPSTREAM_BUG_ENV}=1)"))


@dataclass
class RunningServer:
    """A tritonserver started by a fixture, with what tests need to reach it."""

    repo: Path
    hf_dir: Path
    grpc_url: str
    metrics_port: int
    max_seq_len: int
    server: Any = None  # the builder.serve.TritonServer

    def alive_and_ready(self) -> bool:
        """True while the tritonserver process runs and answers ready."""
        return self.server.process is not None and self.server.process.poll() is None and self.server.is_ready()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One tiny HF checkpoint folder per supported architecture (its default tiny model) and per variant."""
    from builder.checkpoint.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_model(root / name, name) for name in (*ARCHITECTURES, *VARIANTS)}


def build_repo(hf_dir: Path, output: Path, tp_size: int = 1, **overrides) -> Path:
    """Build a model repository from hf_dir with small test limits."""
    from builder.build import BuildOptions, build
    from builder.config import BuildSettings

    values = dict(dtype="float32", max_batch_size=64, max_input_len=128, max_seq_len=256, max_num_tokens=256,
                  kv_cache_memory_mb=8)
    values.update(overrides)
    build(BuildOptions(output=output, model=str(hf_dir), settings=BuildSettings(**values), tp_size=tp_size))
    return output


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory, tiny_checkpoints):
    """Start (once per architecture) a real tritonserver on free loopback ports; stopped at session end."""
    from builder.serve import TritonServer, free_port

    started: dict[str, RunningServer] = {}
    handles = []

    def start(arch: str) -> RunningServer:
        if arch in started:
            return started[arch]
        repo = build_repo(tiny_checkpoints[arch], tmp_path_factory.mktemp("repo") / arch)
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        server = TritonServer(repo, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                              log_path=tmp_path_factory.mktemp("logs") / f"{arch}.log")
        server.start()
        handles.append(server)
        server.wait_ready(timeout=300)
        started[arch] = RunningServer(repo, tiny_checkpoints[arch], f"127.0.0.1:{grpc_port}", metrics_port, 256,
                                       server)
        return started[arch]

    yield start
    for server in handles:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(server_factory) -> RunningServer:
    """The tiny-llama server."""
    return server_factory("LlamaForCausalLM")
