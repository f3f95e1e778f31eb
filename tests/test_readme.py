"""The README's first command (scripts/demo.sh) works: build -> serve -> streamed text on tiny-llama."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from builder.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.server


def test_readme_opens_with_the_two_commands():
    """The first two commands in the README are the demo and the tests."""
    commands = re.findall(r"^(scripts/\S+\.sh)", (ROOT / "README.md").read_text(), flags=re.M)
    assert commands[:2] == ["scripts/demo.sh", "scripts/test.sh"]


def test_demo_script_streams_text(tmp_path):
    """scripts/demo.sh builds, serves and streams; the server is stopped afterwards."""
    env = {**os.environ, "BUILDER_DEMO_REPO": str(tmp_path / "repo"), "BUILDER_GRPC_PORT": str(free_port()),
           "BUILDER_HTTP_PORT": str(free_port()), "BUILDER_METRICS_PORT": str(free_port())}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "Tell me about GPUs"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    streamed = result.stdout.split("--- streamed text", 1)[1].split("\n", 1)[1]
    assert streamed.strip(), result.stdout
    assert "grpc" in result.stdout.lower()
