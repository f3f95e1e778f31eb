"""Client cancellation of the tensorrt_llm model's requests, polled on a thread of its own.

In Triton's python backend `request.is_cancelled()` is an IPC round trip to the server (it releases the GIL).
Polled from the engine thread every `cancellation_check_period_ms` (100 ms, TensorRT-LLM's default), each running
request made the engine thread wait for one round trip per period, between steps. Here a watcher thread polls the
streams through ResponseStreamer.visit (so a request is never asked after its final response) and hands the
cancelled ones to the engine thread, which aborts them. Measured on an H200 with 256 streams: inter-token p50
through Triton 16.1 ms before, 14.4-15.7 ms after (docs/performance.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from builder.triton.streamer import ResponseStreamer, Stream

MIN_ROUND_GAP_S = 0.001  # period 0 ("every step"): rounds back to back, this far apart at least


class CancelWatcher:
    """A thread that asks every open stream's request whether its client cancelled it, once per period."""

    def __init__(self, streamer: ResponseStreamer, is_cancelled: Callable[[Stream], bool],
                 on_cancelled: Callable[[Stream], None], period_s: float) -> None:
        """Start polling: is_cancelled(stream) asks Triton; on_cancelled(stream) is told once per cancelled one."""
        self.streamer = streamer
        self.is_cancelled = is_cancelled
        self.on_cancelled = on_cancelled
        self.period_s = max(period_s, MIN_ROUND_GAP_S)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="builder-cancel-watch", daemon=True)
        self.thread.start()

    def poll_once(self) -> list[Stream]:
        """One round over the open streams; returns the cancelled ones after telling on_cancelled of each (a stream
        stays open until the engine thread closes it, so a later round may report it again)."""
        cancelled = self.streamer.visit(self.is_cancelled)
        for stream in cancelled:
            self.on_cancelled(stream)
        return cancelled

    def _run(self) -> None:
        """Poll a round every period until close()."""
        while not self.stopping.is_set():
            started = time.monotonic()
            self.poll_once()
            self.stopping.wait(max(MIN_ROUND_GAP_S, self.period_s - (time.monotonic() - started)))

    def close(self, timeout: float) -> None:
        """Stop polling (waits for the round under way, up to timeout seconds)."""
        self.stopping.set()
        self.thread.join(timeout)
