"""Honest health: when a python-backend stub of this tritonserver dies, the server shuts itself down.

Triton 2.51's python backend does not restart a stub that died (killed, out of memory, crashed): the model stays
loaded and READY while every request to it fails with "Stub process ... is not healthy", so /v2/health/ready keeps
answering 200 and a load balancer keeps sending traffic to a server that can only fail. Every builder model runs
a StubWatchdog thread that watches the stubs of its server (the processes of the python-backend stub binary whose
parent is the same tritonserver). When one it has seen disappears while the server is not stopping, the watchdog
logs the reason to the server log and sends the server SIGTERM: Triton then stops reporting ready, finishes what it
can within its exit timeout and exits, so a supervisor (Kubernetes liveness/readiness probes, `builder serve`)
restarts it. Exactly one watchdog per server acts (an exclusive marker file).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
PERIOD_S = 1.0
GRACE_S = 2.0  # a vanished stub is acted on only if this model is still not finalizing this long after


def model_name(model_path: str) -> str:
    """The model a stub runs, from the model.py path it was started with (REPO/<model>/<version>/model.py)."""
    path = Path(model_path)
    return path.parent.parent.name if path.name.endswith(".py") else path.name


def stub_processes(server_pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """{pid: model name} of the python-backend stubs whose parent is server_pid."""
    stubs = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != server_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
        if argv and argv[0].decode(errors="replace").endswith(STUB_BINARY):
            stubs[int(entry.name)] = model_name(argv[1].decode(errors="replace")) if len(argv) > 1 else "?"
    return stubs


def start_time(pid: int, proc: Path = Path("/proc")) -> str:
    """The process's start time in clock ticks since boot (with the pid, it names one process, not a reused pid)."""
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def claim_shutdown(server_pid: int) -> bool:
    """True for the first caller for this server (creates the marker file), False for every later one."""
    folder = Path(tempfile.gettempdir()) / f"builder-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    marker = folder / f"shutdown-{server_pid}-{start_time(server_pid)}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


class StubWatchdog:
    """A thread that shuts the server down when one of its stubs dies (see the module docstring)."""

    def __init__(self, model_name: str, log_error: Callable[[str], None], period_s: float = PERIOD_S,
                 grace_s: float = GRACE_S) -> None:
        """Start watching the stubs of our parent, the tritonserver; log_error writes to the server log."""
        self.model_name = model_name
        self.log_error = log_error
        self.server_pid = os.getppid()
        self.period_s, self.grace_s = period_s, grace_s
        self.seen: dict[int, str] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="builder-stub-watchdog", daemon=True)
        self.thread.start()

    def check(self) -> list[str]:
        """One look: the models whose stubs were seen before and are gone now (the new ones are remembered)."""
        alive = stub_processes(self.server_pid)
        gone = [path for pid, path in self.seen.items() if pid not in alive]
        self.seen = alive
        return gone

    def _run(self) -> None:
        """Watch until close(); on a dead stub, after the grace period, claim the shutdown and signal the server."""
        while not self.stopping.wait(self.period_s):
            gone = self.check()
            if not gone or self.stopping.wait(self.grace_s):
                continue  # nothing gone, or this model is being unloaded too (the server is stopping)
            if os.getppid() != self.server_pid or not claim_shutdown(self.server_pid):
                return
            self.log_error(f"builder watchdog: stub died: {', '.join(gone)}: the python backend stub of that model "
                           "died and Triton 2.51 cannot restart it; shutting the server down so that it stops "
                           f"reporting ready and its supervisor restarts it (noticed by {self.model_name})")
            os.kill(self.server_pid, signal.SIGTERM)
            return

    def close(self) -> None:
        """Stop watching (the model is being unloaded)."""
        self.stopping.set()
