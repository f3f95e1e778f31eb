"""Client cancellation from postprocessing to the engine model, outside Triton: a local datagram socket.

Why: Triton 2.51 cancels an ensemble's *next* step requests, never the engine request that is already streaming,
so postprocessing, which sees the cancelled chunk, must tell tensorrt_llm to stop it. It used to do so with a
decoupled BLS request (stop=true) issued from its execute(); under load with client cancellations that BLS path
corrupted tritonserver's heap ("malloc(): unaligned tcache chunk detected", signal 6) within a few hundred
cancellations, while the same load with the BLS call left out, or sent straight to tensorrt_llm, never did
(docs/decisions.md). The message now travels on a Unix datagram socket that the engine model binds, named after
the tritonserver process (both python-backend stubs are its children) and the engine model's name, in a folder
only this user can enter. Sending never blocks and never fails a request: with no listener (another engine
backend, or the engine gone) the message is dropped and the engine request runs to its end as before.
`builder serve` sends a second kind of message on the same socket before it stops the server: drain, which ends
every running request with an UNAVAILABLE error at once, so that Triton's shutdown finds nothing in flight (with
streams still running when its exit timeout expires, tritonserver 2.51 exits while the engine is still sending and
its heap is corrupted on the way out).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

MAX_TAIL = 256  # ids of the cancelled chunk's sequence sent along: enough to tell requests with one id apart
MAX_DATAGRAM = 65536
POLL_S = 0.5  # how often the listener thread looks at its stop flag


def socket_path(model_name: str, server_pid: int | None = None) -> Path:
    """The socket of the engine model `model_name` under the tritonserver process server_pid (default: our parent,
    which for a python-backend stub is the server)."""
    pid = os.getppid() if server_pid is None else server_pid
    folder = Path(tempfile.gettempdir()) / f"builder-{os.getuid()}"
    return folder / f"stop-{pid}-{model_name}.sock"


def encode(request_id: str, tail: list[int]) -> bytes:
    """One stop message: the Triton request id and the last MAX_TAIL ids the cancelled chunk knew of."""
    return json.dumps({"id": request_id, "tail": [int(t) for t in tail[-MAX_TAIL:]]}).encode()


DRAIN = b'{"drain": true}'


def decode(data: bytes) -> tuple[str, list[int]] | None:
    """(request id, tail) of a stop message; None for anything malformed (and for DRAIN)."""
    try:
        message = json.loads(data)
        request_id, tail = message["id"], message["tail"]
        if isinstance(request_id, str) and request_id and all(isinstance(t, int) for t in tail):
            return request_id, tail
    except (ValueError, KeyError, TypeError):
        pass
    return None


def send(path: Path, message: bytes) -> bool:
    """Send one datagram without blocking (False: nobody listens, or its queue is full)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(message, str(path))
        except OSError:
            return False
    return True


def send_stop(model_name: str, request_id: str, tail: list[int]) -> bool:
    """Ask engine model `model_name` to stop request_id (False: nobody listens; the request runs to its end)."""
    return send(socket_path(model_name), encode(request_id, tail))


def send_drain(model_name: str, server_pid: int) -> bool:
    """Ask engine model `model_name` of the tritonserver server_pid to end every running request now."""
    return send(socket_path(model_name, server_pid), DRAIN)


class StopListener:
    """The engine model's end: a thread that hands each (request id, tail) received to on_stop."""

    def __init__(self, model_name: str, on_stop: Callable[[str, list[int]], None],
                 on_drain: Callable[[], None]) -> None:
        """Bind the socket (replacing a stale one of a dead server with the same pid) and start listening."""
        self.path = socket_path(model_name)
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(POLL_S)
        self.on_stop = on_stop
        self.on_drain = on_drain
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="builder-stop-listener", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        """Receive until close()."""
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            if data == DRAIN:
                self.on_drain()
                continue
            message = decode(data)
            if message is not None:
                self.on_stop(*message)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self.stopping.set()
        self.thread.join(POLL_S * 4)
        self.sock.close()
        self.path.unlink(missing_ok=True)
