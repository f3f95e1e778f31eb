"""`builder serve` and `builder generate` as a user runs them: ready line, streamed text, clean Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import build_repo

from builder.serve import free_port

pytestmark = pytest.mark.server
BUILDER = [sys.executable, "-m", "builder.cli"]


def _children(pid: int) -> list[int]:
    """Pids of every descendant of pid (from /proc)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    pairs = list(zip(map(int, out[0::2]), map(int, out[1::2])))
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in pairs if pp == parent]
        found += kids
        frontier += kids
    return found


def _wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    """Read stdout lines until one contains needle."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} in output: {''.join(lines)}")


def test_serve_generate_and_ctrl_c(tiny_checkpoints, tmp_path):
    """serve prints endpoints when ready; generate streams text; SIGINT stops the server and its stubs."""
    repo = build_repo(tiny_checkpoints["LlamaForCausalLM"], tmp_path / "repo")
    grpc = free_port()
    serve = subprocess.Popen(BUILDER + ["serve", str(repo), "--grpc-port", str(grpc), "--http-port", str(free_port()),
                                        "--metrics-port", str(free_port())],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = _wait_for_line(serve, "builder: ready")
        assert any(f":{grpc}" in line for line in lines + [serve.stdout.readline()])
        descendants = _children(serve.pid)
        assert descendants, "tritonserver runs as a child of builder serve"
        streamed = subprocess.run(BUILDER + ["generate", "--url", f"127.0.0.1:{grpc}", "--stream", "--max-tokens", "12",
                                             "Hello there"], capture_output=True, text=True, timeout=120)
        assert streamed.returncode == 0 and streamed.stdout.strip(), streamed.stderr
        whole = subprocess.run(BUILDER + ["generate", "--url", f"127.0.0.1:{grpc}", "--max-tokens", "12", "Hello there"],
                               capture_output=True, text=True, timeout=120)
        assert whole.returncode == 0 and whole.stdout.startswith("Hello there"), whole.stdout
        bad = subprocess.run(BUILDER + ["generate", "--url", f"127.0.0.1:{grpc}", "--max-tokens", "0", "Hello"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "max_tokens" in bad.stderr and "Traceback" not in bad.stderr
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=120) == 0
        time.sleep(1)
        alive = [pid for pid in descendants if os.path.exists(f"/proc/{pid}") and
                 "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
        assert not alive, f"left running after Ctrl-C: {alive}"
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)


def test_generate_without_server_is_one_line_error():
    """A client pointed at nothing says so in one line."""
    result = subprocess.run(BUILDER + ["generate", "--url", f"127.0.0.1:{free_port()}", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


def test_serve_refuses_a_port_in_use(tmp_path):
    """A port another server holds is one line and exit 2 (a BuilderError) before tritonserver starts: the other server would
    otherwise answer the readiness probe and `builder serve` would report ready for a server that is not its own."""
    import socket

    repo = tmp_path / "repo"
    (repo / "ensemble").mkdir(parents=True)
    (repo / "ensemble" / "config.pbtxt").write_text('name: "ensemble"\n')
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        taken = other.getsockname()[1]
        for flags in (["--grpc-port", str(taken), "--http-port", str(free_port()), "--metrics-port", str(free_port())],
                      ["--grpc-port", str(free_port()), "--http-port", str(taken), "--metrics-port", str(free_port())]):
            result = subprocess.run(BUILDER + ["serve", str(repo), *flags], capture_output=True, text=True, timeout=60)
            assert result.returncode == 2, result.stdout + result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and f"port {taken}" in lines[0] and "already in use" in lines[0], result.stderr
    same = free_port()
    result = subprocess.run(BUILDER + ["serve", str(repo), "--grpc-port", str(same), "--http-port", str(same)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "must differ" in result.stderr, result.stderr
