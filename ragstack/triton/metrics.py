"""The stack's own metrics on Triton's metrics port (Python backend custom metrics API).

Names, kinds, labels and buckets are those of ``monitoring/metrics.json`` (which the alert rules and the
dashboard read); a unit test checks the two agree. Families and metrics are created once per process and kept
referenced (a collected family makes ``observe()`` fail with "MetricFamily has been deleted").
"""
from __future__ import annotations

import threading

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


class MetricRegistry:
    """Families created once per process and kept referenced; one Metric per label set, made on first use.
    Thread-safe: execute threads and workers report at once, and every metric call is serialized."""

    def __init__(self, pb, families: dict):
        kinds = {"COUNTER": pb.MetricFamily.COUNTER, "GAUGE": pb.MetricFamily.GAUGE,
                 "HISTOGRAM": pb.MetricFamily.HISTOGRAM}
        self._families = {name: pb.MetricFamily(name=name, description=desc, kind=kinds[kind])
                          for name, (kind, desc, _) in families.items()}
        self._metrics = {}
        self._lock = threading.RLock()

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
        for level, n in levels.items():
            self.metric("llm_engine_requests", model=self.model, priority=priority.name(level)).increment(n)
