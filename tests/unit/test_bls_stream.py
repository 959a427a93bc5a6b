"""Decoupled BLS streams end with Python holding the iterator's last reference (triton.adapter.bls_stream).

The 24.10 Python backend erases its own reference to a finished stream's iterator on a C++ thread without the
GIL; if that is the last reference, numpy arrays are freed without the GIL and the stub's heap is corrupted.
These tests drive bls_stream with a fake backend whose iterator records what happens to it, in order.
"""
import threading
import time

import numpy as np
import pytest

from ragstack.triton import adapter as ta


class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)


class FakeIterator:
    """Like the stub's ResponseIterator: yields responses, then StopIteration; records its own destruction."""

    def __init__(self, responses, record, gate=None, gate_after=0):
        self._responses = list(responses)
        self._record = record
        self._gate = gate          # a threading.Event next() waits on (a slow child) ...
        self._gate_after = gate_after   # ... once this many responses were read
        self._read = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._gate is not None and self._read >= self._gate_after:
            self._gate.wait(5)
        self._read += 1
        if not self._responses:
            self._record("exhausted")
            raise StopIteration
        return self._responses.pop(0)

    def __del__(self):
        self._record("released")


class FakeResponse:
    def __init__(self, value, error=None):
        self.value, self._error = value, error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self

    def message(self):
        return self._error


class FakeTensor:
    def __init__(self, value):
        self.value = value

    def as_numpy(self):
        return np.asarray(self.value)


class FakePb:
    def __init__(self, iterator_factory):
        self.iterator_factory = iterator_factory
        pb = self

        class InferenceRequest:
            def __init__(self, **kwargs):
                pass

            def exec(self, decoupled=False):
                assert decoupled
                return pb.iterator_factory()

        self.InferenceRequest = InferenceRequest

    @staticmethod
    def Tensor(name, value):
        return (name, value)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return FakeTensor(response.value)


@pytest.fixture(autouse=True)
def empty_hold(monkeypatch):
    monkeypatch.setattr(ta, "_held", ta.collections.deque())
    yield


def stream(pb, barrier=None):
    return ta.bls_stream(pb, "generate", {"x": np.zeros(1)}, ["out"], barrier=barrier)


def test_finished_stream_is_released_after_the_barrier():
    record = Recorder()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1), FakeResponse(2)], record))
    values = [a["out"].item() for a in stream(pb, barrier=lambda: record("barrier"))]
    assert values == [1, 2]
    assert record.events == ["exhausted", "barrier", "released"]
    assert ta.held_streams() == 0


def test_without_a_barrier_the_iterator_is_held_then_dropped_by_a_later_call(monkeypatch):
    record = Recorder()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1)], record))
    monkeypatch.setattr(ta, "HOLD_S", 0.05)
    assert [a["out"].item() for a in stream(pb)] == [1]
    assert record.events == ["exhausted"]             # not released: the stub's cleanup may still be queued
    assert ta.held_streams() == 1
    time.sleep(0.06)
    ta._hold(None)                                    # any later stream end lets the expired ones go
    assert record.events == ["exhausted", "released"]
    assert ta.held_streams() == 0


def test_a_failing_barrier_falls_back_to_holding():
    record = Recorder()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1)], record))

    def barrier():
        record("barrier")
        raise RuntimeError("the parent request is gone")
    assert [a["out"].item() for a in stream(pb, barrier=barrier)] == [1]
    assert record.events == ["exhausted", "barrier"]
    assert ta.held_streams() == 1


def test_an_abandoned_stream_is_read_to_its_end_on_another_thread_then_held():
    record = Recorder()
    gate = threading.Event()                          # the child is slow: after the first, the rest comes later
    pb = FakePb(lambda: FakeIterator([FakeResponse(i) for i in range(5)], record, gate, gate_after=1))
    gen = stream(pb, barrier=lambda: record("barrier"))
    assert next(gen)["out"].item() == 0
    gen.close()                                       # the consumer goes away mid-stream
    del gen
    assert "released" not in record.events and "exhausted" not in record.events
    gate.set()
    deadline = time.monotonic() + 5
    while ta.held_streams() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.events == ["exhausted"]             # read to the end (no map entry left), not released
    assert ta.held_streams() == 1
    assert "barrier" not in record.events             # never asks a parent that may have answered already


def test_an_error_response_ends_the_stream_without_dropping_the_iterator():
    record = Recorder()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1), FakeResponse(None, "boom")], record))
    gen = stream(pb, barrier=lambda: record("barrier"))
    assert next(gen)["out"].item() == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(gen)
    deadline = time.monotonic() + 5
    while ta.held_streams() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.events == ["exhausted"]
    assert ta.held_streams() == 1


class FakePids:
    def __init__(self, *answers):
        self.answers = list(answers)

    def of(self, model, fresh=False):
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_child_whose_stub_dies_mid_stream_fails_the_call_fast(monkeypatch):
    """A decoupled child that dies never answers again (Triton 2.51): the parent must not wait forever."""
    record = Recorder()
    never = threading.Event()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1)], record, never))
    monkeypatch.setattr(ta, "STREAM_CHECK_S", 0.02)
    monkeypatch.setattr(ta, "STUB_PIDS", FakePids(frozenset({11, 12}), frozenset({12}), frozenset({12, 13})))
    t0 = time.monotonic()
    with pytest.raises(ta.Unavailable, match=r"model 'generate' died .*stub process 11 exited"):
        list(stream(pb, barrier=lambda: record("barrier")))
    assert time.monotonic() - t0 < 2
    assert "barrier" not in record.events
    never.set()                                       # (let the reader thread finish)


def test_a_slow_child_that_is_alive_is_waited_for(monkeypatch):
    record = Recorder()
    gate = threading.Event()
    pb = FakePb(lambda: FakeIterator([FakeResponse(1)], record, gate))
    monkeypatch.setattr(ta, "STREAM_CHECK_S", 0.02)
    monkeypatch.setattr(ta, "STUB_PIDS", FakePids(frozenset({11})))
    threading.Timer(0.2, gate.set).start()
    assert [a["out"].item() for a in stream(pb, barrier=lambda: record("barrier"))] == [1]
    assert record.events == ["exhausted", "barrier", "released"]


@pytest.mark.parametrize("message,cls", [
    ("invalid input: top_k must be positive", ta.InvalidInput),
    ("unavailable: model 'generate' died", ta.Unavailable),
    ("Failed to process the request(s) for model instance 'embed_0_0', message: Stub process is not healthy.",
     ta.Unavailable),
    ("Request for unknown model: 'embed' is not found", ta.Unavailable),
    ("some engine bug", RuntimeError),
])
def test_child_errors_keep_their_class_across_the_hop(message, cls):
    exc = ta.child_error("embed", message)
    assert type(exc) is cls
    if cls is ta.Unavailable and not message.startswith("unavailable"):
        assert "model 'embed'" in str(exc)


def test_detached_sender_keeps_order_and_never_blocks_the_caller():
    """An engine's batcher must not wait on a send (Triton 2.51: a send to a dead BLS parent never returns)."""
    FINAL = 1
    sent, release = [], threading.Event()

    class Sender:
        def send(self, response=None, flags=0):
            release.wait(5)                                   # the server is slow to deliver (or never does)
            sent.append((response, flags))
    ds = ta.DetachedSender(Sender(), FINAL)
    t0 = time.monotonic()
    for i in range(5):
        ds.send(f"r{i}")
    ds.send(None, flags=FINAL)
    assert time.monotonic() - t0 < 0.5                        # the caller went on
    release.set()
    ds._thread.join(5)
    assert sent == [("r0", 0), ("r1", 0), ("r2", 0), ("r3", 0), ("r4", 0), (None, FINAL)]
    assert not ds._thread.is_alive()                          # ended by the final flag
