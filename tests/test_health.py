"""Health that tells the truth, through `builder serve` and a real tritonserver: a dead stub shuts the server down
(readiness false, `builder serve` exits non-zero with one line), and SIGTERM with open streams stops promptly and
leaves no shared memory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import build_repo
from triton_helpers import ensemble_inputs, run_stream

from builder.serve import free_port
from builder.triton.watchdog import stub_processes

pytestmark = pytest.mark.server

READY_TIMEOUT_S = 300


def ready(http_port: int) -> bool:
    """True when /v2/health/ready answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Served:
    """`builder serve REPO` as a subprocess on free ports."""

    def __init__(self, repo: Path) -> None:
        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "builder.cli", "serve", str(repo), "--grpc-port", str(self.grpc),
             "--http-port", str(self.http), "--metrics-port", str(self.metrics)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(self.http):
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "builder serve was not ready in time"
            time.sleep(0.5)

    @property
    def server_pid(self) -> int:
        """The tritonserver process (the child of builder serve)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def shm_regions(self) -> list[Path]:
        """The python backend's shared memory regions of this server."""
        return list(Path("/dev/shm").glob(f"builder{self.process.pid}_{self.grpc}_*"))

    def finish(self, timeout: float) -> tuple[int, str]:
        """(exit code, stderr) once builder serve exits."""
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


@pytest.fixture(scope="module")
def repo(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny-llama repository for this module's servers."""
    return build_repo(tiny_checkpoints["LlamaForCausalLM"], tmp_path_factory.mktemp("health") / "repo")


@pytest.mark.parametrize("victim", ["tensorrt_llm", "preprocessing"])
def test_dead_stub_turns_readiness_false_and_serve_exits_nonzero(repo, victim):
    """SIGKILL of a model's stub: within seconds the server stops answering ready and builder serve exits with one
    `error:` line naming the stub."""
    served = Served(repo)
    try:
        stubs = stub_processes(served.server_pid)
        pid = next(p for p, model in stubs.items() if model == victim)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while ready(served.http) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ready(served.http), "the server still reports ready with a dead stub"
        code, err = served.finish(timeout=60)
        assert code != 0
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: tritonserver stopped by itself"), err
        assert victim in lines[0]
        assert not served.shm_regions()
    finally:
        if served.process.poll() is None:
            served.process.kill()


def test_sigterm_with_open_streams_stops_promptly_and_cleans_shm(repo):
    """SIGTERM while streams are open: builder serve exits 0 within a few seconds, no /dev/shm region left."""
    served = Served(repo)
    url = f"127.0.0.1:{served.grpc}"
    results = []
    threads = [threading.Thread(target=lambda: results.append(run_stream(url, "ensemble", ensemble_inputs(
        text_input=f"open stream {i}", max_tokens=200, stream=True)))) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    assert served.shm_regions()
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    code, err = served.finish(timeout=60)
    took = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=60)
    assert code == 0, err
    assert took < 12, f"builder serve took {took:.1f}s to stop"
    assert not served.shm_regions()
