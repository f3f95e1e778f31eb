"""Responses of the tensorrt_llm model, sent by sender threads instead of the engine thread.

Each response is an IPC round trip to the Triton server (about 0.15-0.26 ms), and in the ensemble every response
becomes one `postprocessing` execute. Sent from the engine thread, one response per request per step made a step
of N streams cost N round trips (ITL through Triton = step + N x 0.26 ms on an H200 host). Here the engine thread
only records what each request produced; sender threads deliver it:
  - a request's tokens produced while its previous response is still queued or in flight go out together in one
    response (streamed chunks of several tokens, as vLLM's and SGLang's stream_interval make);
  - responses stay in order per request (one sender handles a request at a time);
  - `max_responses_per_s` bounds the total rate of non-final responses: with N streams, each gets at most one
    response per N / max_responses_per_s seconds, so postprocessing's queue cannot grow without end. A request's
    first and final responses are never held back.
Other threads reach a request's Triton objects only through visit(), which owns each stream it probes the way a
sender does: no response goes out meanwhile, so nothing is asked of a request after its final response.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Stream:
    """One request's output on its way to the client: what the engine produced and what has been sent."""

    sender: Any  # the Triton response sender (opaque here)
    streaming: bool  # False: only the final response is sent
    request: Any = None  # what deliver needs to build responses (opaque here)
    generated: list[int] = field(default_factory=list)  # every id the engine produced for this request
    sent: int = 0  # how many of them went out
    finished: bool = False  # the engine produced its last id
    error: tuple[str, Any] | None = None  # (message, code): close the request with this error instead
    due: float | None = None  # when it is queued: the time.monotonic() it may be sent at
    sending: bool = False  # a sender thread, or visit(), owns it now (no other thread sends or probes it)
    closed: bool = False  # its final response (or error) went out
    last_send: float = float("-inf")  # time.monotonic() of its last response

    def has_news(self) -> bool:
        """True when there is something left to send."""
        if self.closed:
            return False
        if self.error is not None or self.finished:
            return True
        return self.streaming and len(self.generated) > self.sent


# deliver(stream, upto, final): send stream.generated[stream.sent:upto] (final: with the FINAL flag)
Deliver = Callable[[Stream, int, bool], None]
DeliverError = Callable[[Stream, str, Any], None]


class ResponseStreamer:
    """Sender threads that drain Streams in order, coalescing tokens and bounding the response rate."""

    def __init__(self, deliver: Deliver, deliver_error: DeliverError, on_send_failed: Callable[[Stream], None],
                 threads: int = 2, max_responses_per_s: float = 0.0) -> None:
        """deliver / deliver_error do the sending (called on a sender thread); on_send_failed(stream) is told when
        deliver raised (the stream is then closed). max_responses_per_s 0: no bound."""
        self.deliver = deliver
        self.deliver_error = deliver_error
        self.on_send_failed = on_send_failed
        self.max_responses_per_s = max_responses_per_s
        self.lock = threading.Condition()
        self.ready: list[tuple[float, int, Stream]] = []  # heap of (due time, tie-break, stream)
        self.order = itertools.count()
        self.streams: set[Stream] = set()  # streams not yet closed (their number is the N of the rate bound)
        self.busy = 0  # streams being sent right now
        self.stopping = False
        self.threads = [threading.Thread(target=self._run, name=f"builder-sender-{i}", daemon=True)
                        for i in range(max(1, threads))]
        for thread in self.threads:
            thread.start()

    def open(self, sender: Any, streaming: bool, request: Any = None) -> Stream:
        """A new stream for a request the engine accepted."""
        stream = Stream(sender, streaming, request)
        with self.lock:
            self.streams.add(stream)
        return stream

    @property
    def open_streams(self) -> int:
        """How many streams are not yet closed."""
        return len(self.streams)

    def visit(self, probe: Callable[[Stream], bool]) -> list[Stream]:
        """Call probe on each open stream no sender is sending, owning it meanwhile; the streams probe said True of.

        Runs on the caller's thread (the probe may block, e.g. on IPC). A stream being sent is skipped this time.
        """
        with self.lock:
            streams = list(self.streams)
        hits = []
        for stream in streams:
            with self.lock:
                if stream.closed or stream.sending:
                    continue
                stream.sending = True
                self.busy += 1
            try:
                hit = probe(stream)
            except Exception:  # noqa: BLE001  a probe that cannot answer says nothing about the stream
                hit = False
            with self.lock:
                stream.sending = False
                self.busy -= 1
                self._schedule(stream)  # what was posted while it was owned here
                self.lock.notify_all()
            if hit:
                hits.append(stream)
        return hits

    def post(self, stream: Stream, new_ids: list[int], finished: bool) -> None:
        """The engine produced new_ids for stream (finished: its last ones). Engine thread; never blocks on IPC."""
        with self.lock:
            stream.generated.extend(new_ids)
            stream.finished = stream.finished or finished
            self._schedule(stream)

    def fail(self, stream: Stream, message: str, code: Any) -> None:
        """Close stream with an error (after the responses already queued for it)."""
        with self.lock:
            if stream.error is None and not stream.finished:
                stream.error = (message, code)
                self._schedule(stream)

    def close(self, timeout: float) -> None:
        """Send what is queued (up to timeout seconds), then stop the sender threads."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while (self.ready or self.busy) and time.monotonic() < deadline:
                self.lock.wait(0.01)
            self.stopping = True
            self.lock.notify_all()
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _schedule(self, stream: Stream) -> None:
        """Queue stream when it has news (lock held): due now, or after its rate interval. A stream already queued
        for later is queued again for now when it became urgent (finished, failed); the later entry goes stale."""
        if stream.sending or not stream.has_news():
            return
        due = time.monotonic()
        urgent = stream.error is not None or stream.finished or stream.sent == 0
        if not urgent and self.max_responses_per_s > 0:
            due = max(due, stream.last_send + self.open_streams / self.max_responses_per_s)
        if stream.due is not None and stream.due <= due:
            return
        stream.due = due
        heapq.heappush(self.ready, (due, next(self.order), stream))
        self.lock.notify()

    def _next(self) -> Stream | None:
        """Wait for the next stream that is due (None when stopping)."""
        with self.lock:
            while not self.stopping:
                if self.ready:
                    due, _, stream = self.ready[0]
                    if stream.due != due:  # stale: queued again for an earlier time, or already sent
                        heapq.heappop(self.ready)
                        continue
                    if stream.sending:  # owned by visit(), which queues it again when it lets go
                        heapq.heappop(self.ready)
                        stream.due = None
                        continue
                    wait = due - time.monotonic()
                    if wait <= 0:
                        heapq.heappop(self.ready)
                        stream.due, stream.sending = None, True
                        self.busy += 1
                        return stream
                    self.lock.wait(wait)
                else:
                    self.lock.wait()
            return None

    def _run(self) -> None:
        """Sender thread: send the due streams one response each, until close()."""
        while (stream := self._next()) is not None:
            self._send(stream)

    def _send(self, stream: Stream) -> None:
        """One response for stream: an error, or every id produced since the last one (final when finished)."""
        with self.lock:
            upto, final, error = len(stream.generated), stream.finished, stream.error
        try:
            if error is not None:
                self.deliver_error(stream, *error)
            else:
                self.deliver(stream, upto, final)
            failed = False
        except Exception:  # noqa: BLE001  the client went away or the server is stopping
            failed, final = True, True
        with self.lock:
            stream.sent, stream.last_send = upto, time.monotonic()
            stream.sending = False
            if final or error is not None:
                stream.closed = True
                self.streams.discard(stream)
            else:
                self._schedule(stream)
            self.busy -= 1
            self.lock.notify_all()
        if failed:
            self.on_send_failed(stream)
