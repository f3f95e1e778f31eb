"""ResponseStreamer: in-order, coalescing, rate-bounded delivery of the engine model's responses (no Triton)."""

from __future__ import annotations

import threading
import time

import pytest

from builder.triton.streamer import ResponseStreamer, Stream


class Recorder:
    """deliver callbacks that record what each stream sent (ids per response, final flags, errors)."""

    def __init__(self, send_s: float = 0.0, fail_on: set[int] | None = None) -> None:
        self.send_s = send_s
        self.fail_on = fail_on or set()
        self.responses: dict[int, list[tuple[list[int], bool]]] = {}
        self.errors: dict[int, str] = {}
        self.failed: list[Stream] = []
        self.lock = threading.Lock()
        self.in_flight: set[int] = set()
        self.overlap = False  # two senders on one stream at once

    def deliver(self, stream: Stream, upto: int, final: bool) -> None:
        key = stream.request
        with self.lock:
            self.overlap |= key in self.in_flight
            self.in_flight.add(key)
        time.sleep(self.send_s)
        with self.lock:
            self.in_flight.discard(key)
            if key in self.fail_on:
                raise RuntimeError("client went away")
            self.responses.setdefault(key, []).append((stream.generated[stream.sent:upto], final))

    def deliver_error(self, stream: Stream, message: str, code) -> None:
        with self.lock:
            self.errors[stream.request] = message


def make(recorder: Recorder, **kw) -> ResponseStreamer:
    return ResponseStreamer(recorder.deliver, recorder.deliver_error, recorder.failed.append, **kw)


def test_tokens_in_order_and_coalesced_while_a_send_is_slow():
    """A slow send makes the next response carry every id produced meanwhile; nothing is lost or reordered."""
    rec = Recorder(send_s=0.02)
    streamer = make(rec, threads=3)
    streams = [streamer.open(None, True, key) for key in range(4)]
    for token in range(40):
        for stream in streams:
            streamer.post(stream, [token], finished=token == 39)
        time.sleep(0.001)
    streamer.close(timeout=10)
    for key in range(4):
        sent = rec.responses[key]
        assert [t for ids, _ in sent for t in ids] == list(range(40))
        assert [final for _, final in sent] == [False] * (len(sent) - 1) + [True]
        assert len(sent) < 40  # coalesced: a 20 ms send spans ~20 posts
    assert not rec.overlap


def test_fast_sends_are_one_token_each():
    """When senders keep up, each id goes out in its own response (no added latency at low load)."""
    rec = Recorder()
    streamer = make(rec, threads=1)
    stream = streamer.open(None, True, 0)
    for token in range(10):
        streamer.post(stream, [token], finished=token == 9)
        time.sleep(0.01)
    streamer.close(timeout=10)
    assert [ids for ids, _ in rec.responses[0]] == [[t] for t in range(10)]


def test_rate_bound_spaces_responses_but_not_first_or_final():
    """max_responses_per_s=100 with 2 streams: one response per stream per 20 ms; first and final at once."""
    rec = Recorder()
    streamer = make(rec, threads=2, max_responses_per_s=100)
    streams = [streamer.open(None, True, key) for key in range(2)]
    start = time.monotonic()
    for token in range(50):  # 100 ms of tokens, one per 2 ms
        for stream in streams:
            streamer.post(stream, [token], finished=False)
        time.sleep(0.002)
    for stream in streams:
        streamer.post(stream, [50], finished=True)
    finals_posted = time.monotonic()
    streamer.close(timeout=10)
    for key in range(2):
        sent = rec.responses[key]
        assert sent[0][0] == [0]  # the first id was not held back
        assert [t for ids, _ in sent for t in ids] == list(range(51))
        assert len(sent) <= (finals_posted - start) / 0.02 + 3  # about one per 20 ms, plus first and final
    assert time.monotonic() - finals_posted < 0.5


def test_non_streaming_sends_only_the_final_response():
    """A non-streaming request gets one response with every id."""
    rec = Recorder()
    streamer = make(rec)
    stream = streamer.open(None, False, 0)
    for token in range(5):
        streamer.post(stream, [token], finished=token == 4)
    streamer.close(timeout=10)
    assert rec.responses[0] == [([0, 1, 2, 3, 4], True)]


def test_fail_closes_with_an_error_after_what_was_sent():
    """fail() ends a stream with its error; later posts are ignored."""
    rec = Recorder()
    streamer = make(rec)
    stream = streamer.open(None, True, 0)
    streamer.post(stream, [1], finished=False)
    streamer.fail(stream, "request cancelled", "CANCELLED")
    streamer.post(stream, [2], finished=False)
    streamer.close(timeout=10)
    assert rec.errors == {0: "request cancelled"}
    assert stream.closed and streamer.open_streams == 0


def test_a_failed_send_is_reported_and_closes_the_stream():
    """deliver raising (the client went away) closes the stream and tells on_send_failed, once."""
    rec = Recorder(fail_on={1})
    streamer = make(rec)
    good, bad = streamer.open(None, True, 0), streamer.open(None, True, 1)
    for token in range(3):
        streamer.post(good, [token], finished=token == 2)
        streamer.post(bad, [token], finished=False)
        time.sleep(0.005)
    streamer.close(timeout=10)
    assert rec.failed == [bad] and bad.closed
    assert [t for ids, _ in rec.responses[0] for t in ids] == [0, 1, 2]


@pytest.mark.parametrize("threads", [1, 4])
def test_many_streams_all_delivered(threads):
    """Every stream of many gets every id and exactly one final response."""
    rec = Recorder(send_s=0.0005)
    streamer = make(rec, threads=threads, max_responses_per_s=5000)
    streams = [streamer.open(None, True, key) for key in range(64)]
    for token in range(20):
        for stream in streams:
            streamer.post(stream, [token], finished=token == 19)
    streamer.close(timeout=30)
    for key in range(64):
        sent = rec.responses[key]
        assert [t for ids, _ in sent for t in ids] == list(range(20))
        assert sum(final for _, final in sent) == 1
    assert streamer.open_streams == 0


def test_visit_owns_each_stream_and_never_probes_after_the_final_response():
    """visit() and the senders never hold one stream at once; a closed stream is not probed; posts made while a
    stream is probed go out afterwards."""
    rec = Recorder(send_s=0.001)
    streamer = make(rec, threads=2)
    streams = [streamer.open(None, True, key) for key in range(8)]
    probed_after_close = []

    def probe(stream: Stream) -> bool:
        with rec.lock:
            rec.overlap |= stream.request in rec.in_flight
        probed_after_close.extend([stream.request] if stream.closed else [])
        time.sleep(0.0005)
        return stream.request % 2 == 1

    hits: list[int] = []
    for token in range(30):
        for stream in streams:
            streamer.post(stream, [token], finished=token == 29)
        hits.extend(s.request for s in streamer.visit(probe))
    streamer.close(timeout=10)
    assert not rec.overlap and not probed_after_close
    assert set(hits) <= {1, 3, 5, 7} and hits
    for key in range(8):
        assert [t for ids, _ in rec.responses[key] for t in ids] == list(range(30))
    assert streamer.visit(probe) == []  # every stream closed


def test_cancel_watcher_reports_cancelled_streams_within_a_period():
    """CancelWatcher polls every open stream once per period off the caller's thread and reports the cancelled."""
    from builder.triton.cancel_watch import CancelWatcher

    rec = Recorder()
    streamer = make(rec)
    streams = [streamer.open(None, True, key) for key in range(4)]
    cancelled_keys: set[int] = set()
    reported: list[Stream] = []
    watcher = CancelWatcher(streamer, lambda s: s.request in cancelled_keys, reported.append, period_s=0.01)
    time.sleep(0.05)
    assert reported == []
    cancelled_keys.add(2)
    deadline = time.monotonic() + 2
    while not reported and time.monotonic() < deadline:
        time.sleep(0.005)
    assert reported and {s.request for s in reported} == {2}
    streamer.fail(streams[2], "request cancelled", "CANCELLED")
    for stream in streams[:2] + streams[3:]:
        streamer.post(stream, [1], finished=True)
    watcher.close(timeout=5)
    streamer.close(timeout=5)
    assert rec.errors == {2: "request cancelled"} and streamer.open_streams == 0
