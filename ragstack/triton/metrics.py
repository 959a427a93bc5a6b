"""The stack's own metrics on Triton's metrics port (Python backend custom metrics API).

Names, kinds, labels and buckets are those of ``monitoring/metrics.json`` (which the alert rules and the
dashboard read); a unit test checks the two agree. Families and metrics are created once per process and kept
referenced (a collected family makes ``observe()`` fail with "MetricFamily has been deleted").
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

QUEUE_DELAY_BUCKETS = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000]
STAGE_BUCKETS = [100, 500, 1000, 5000, 10000, 50000, 100000, 500000, 1000000, 5000000, 30000000]
OUTCOMES = ("ok", "invalid_input", "identity_rejected", "token_budget_overrun", "cost_budget_exceeded",
            "internal_error")

# name: (kind, help, label names)
FAMILIES = {
    "llm_queue_delay_us": ("HISTOGRAM", "Time a generate request waited before it was scheduled", ("model",)),
    "llm_stage_latency_us": ("HISTOGRAM", "Per-request latency of each pipeline stage", ("stage",)),
    "llm_tokens_in": ("COUNTER", "Prompt tokens", ("model", "task")),
    "llm_tokens_out": ("COUNTER", "Completion tokens", ("model", "task")),
    "llm_cost_usd": ("COUNTER", "Cost from the engine manifest's per-1k-token prices", ("model", "task")),
    "llm_requests": ("COUNTER", "RAG requests by outcome", ("task", "outcome")),
}
# The engines' view of priorities (ragstack/governance/priority.py) and of adaptive batching (ragstack/governance/adaptive.py).
PRIORITY_FAMILIES = {
    "llm_engine_requests": ("COUNTER", "Engine requests by the priority level they carried", ("model", "priority")),
}


class _Serialized:
    """A Python-backend Metric whose calls hold the registry's lock. Each call is an IPC round trip to the
    server, and tritonserver 2.51 crashes (SIGSEGV in libtriton_python) when threads of one stub make them at
    once: seen after ~40-120 identity-rejected requests from two clients, each counted on its own thread."""

    __slots__ = ("_metric", "_lock")

    def __init__(self, metric, lock):
        self._metric, self._lock = metric, lock

    def increment(self, value):
        with self._lock:
            self._metric.increment(value)

    def set(self, value):
        with self._lock:
            self._metric.set(value)

    def observe(self, value):
        with self._lock:
            self._metric.observe(value)

    def value(self):
        with self._lock:
            return self._metric.value()


# How long the recorder waits after a request asks for its metrics before it records them: the response goes out
# first (the stub-to-server messages of the metric calls otherwise compete with its delivery).
RECORD_DELAY_S = 0.005
_STOP = object()


class Recorder:
    """Makes metric calls on one thread of its own, in the order they were submitted, RECORD_DELAY_S after the
    first of a burst: each call is an IPC round trip to the server (~0.1 ms, a request's ten ~1 ms), which a
    request's thread then no longer waits for. A failing call is logged and the next one runs."""

    def __init__(self, delay_s: float = RECORD_DELAY_S, name: str = "ragstack-metrics"):
        self.delay_s = delay_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> None:
        self._queue.put((fn, args))

    def close(self, timeout: float = 10.0) -> None:
        """Record what is pending, then stop (a stub's finalize: no metric call may outlive the model)."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is not _STOP and self.delay_s > 0:
                time.sleep(self.delay_s)
            while True:
                if item is _STOP:
                    return
                fn, args = item
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - a metric is never worth a thread
                    log.exception("recording a metric failed")
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break


class MetricRegistry:
    """Families created once per process and kept referenced; one Metric per label set, made on first use.
    Thread-safe: execute threads and workers report at once, and every metric call is serialized.
    :meth:`later` runs a recording off the caller's thread (:class:`Recorder`)."""

    def __init__(self, pb, families: dict):
        kinds = {"COUNTER": pb.MetricFamily.COUNTER, "GAUGE": pb.MetricFamily.GAUGE,
                 "HISTOGRAM": pb.MetricFamily.HISTOGRAM}
        self._families = {name: pb.MetricFamily(name=name, description=desc, kind=kinds[kind])
                          for name, (kind, desc, _) in families.items()}
        self._metrics = {}
        self._lock = threading.RLock()
        self._recorder: Optional[Recorder] = None

    def later(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on the recorder's thread, shortly (the registry's own calls, or any that make them)."""
        with self._lock:
            if self._recorder is None:
                self._recorder = Recorder()
        self._recorder.submit(fn, *args)

    def close(self) -> None:
        """Record what is pending and stop the recorder (call from the model's finalize)."""
        with self._lock:
            recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()

    def metric(self, name: str, buckets=None, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                kwargs = {"labels": {k: str(v) for k, v in labels.items()}}
                if buckets is not None:
                    kwargs["buckets"] = buckets
                metric = self._metrics[key] = self._families[name].Metric(**kwargs)
        return _Serialized(metric, self._lock)


class StackMetrics(MetricRegistry):
    """The RAG endpoint's metrics (FAMILIES above)."""

    def __init__(self, pb):
        super().__init__(pb, FAMILIES)

    def request(self, task: str, outcome: str) -> None:
        self.metric("llm_requests", task=task, outcome=outcome).increment(1)

    def stages(self, timings_ms: dict) -> None:
        for stage, ms in timings_ms.items():
            if stage != "total" and ms > 0:
                self.metric("llm_stage_latency_us", STAGE_BUCKETS, stage=stage).observe(ms * 1000.0)

    def tokens(self, model: str, task: str, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        self.metric("llm_tokens_in", model=model, task=task).increment(tokens_in)
        self.metric("llm_tokens_out", model=model, task=task).increment(tokens_out)
        if cost_usd:
            self.metric("llm_cost_usd", model=model, task=task).increment(cost_usd)

    def queue_delay(self, model: str, delay_us: float) -> None:
        self.metric("llm_queue_delay_us", QUEUE_DELAY_BUCKETS, model=model).observe(delay_us)


class PriorityMetrics(MetricRegistry):
    """Counts each engine request under the level its ``x-priority`` parameter names (urgent when none)."""

    def __init__(self, pb, model: str):
        super().__init__(pb, PRIORITY_FAMILIES)
        self.model = model

    def count(self, requests) -> None:
        from collections import Counter

        from ragstack.governance import priority
        from ragstack.governance.identity import request_headers

        levels = Counter()
        for request in requests:
            try:
                levels[priority.of_parameters(request_headers(request.parameters()))] += 1
            except Exception:  # noqa: BLE001 - a bad parameter is the request's own error, reported elsewhere
                continue
        if levels:
            # recorded off the batch's path: the engine computes the batch meanwhile
            self.later(self._increment, {priority.name(level): n for level, n in levels.items()})

    def _increment(self, counts: dict) -> None:
        for level, n in counts.items():
            self.metric("llm_engine_requests", model=self.model, priority=level).increment(n)
