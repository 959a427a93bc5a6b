"""Per-stage spans from Triton's own traces (``--trace-config triton,file=F``, see tools/serve_triton.sh).

Triton writes one JSON list per flush to ``F.0``, ``F.1``, …: a record naming each traced request (id, model,
parent_id — BLS children carry their parent's trace) and records holding its timestamps. Put together they are
a span tree per client request: rag → rag_orchestrator → embed / vector_index (search) / rerank / generate.
"""
from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Optional

STAGE_OF_MODEL = {"embed": "embed", "vector_index": "search", "rerank": "rerank", "generate": "generate"}


@dataclasses.dataclass
class Span:
    id: int
    model: str
    parent_id: Optional[int]
    start_ns: Optional[int] = None
    end_ns: Optional[int] = None
    children: list = dataclasses.field(default_factory=list)

    @property
    def duration_ms(self) -> Optional[float]:
        if self.start_ns is None or self.end_ns is None:
            return None
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def stage(self) -> Optional[str]:
        return STAGE_OF_MODEL.get(self.model)


def load_records(trace_file: Path) -> list:
    """Every record of ``trace_file`` and its numbered flushes, in flush order (a file being written is skipped)."""
    paths = [p for p in glob.glob(f"{trace_file}*") if p == str(trace_file) or p.rsplit(".", 1)[-1].isdigit()]
    records = []
    for path in sorted(paths, key=lambda p: (p != str(trace_file), int(p.rsplit(".", 1)[-1])
                                             if p.rsplit(".", 1)[-1].isdigit() else 0)):
        try:
            records += json.loads(Path(path).read_text() or "[]")
        except json.JSONDecodeError:
            continue
    return records


def build_spans(records: list) -> list:
    """The root spans (client requests), each with its children attached."""
    spans = {}
    for r in records:
        if "model_name" in r:
            spans[r["id"]] = Span(r["id"], r["model_name"], r.get("parent_id"))
    for r in records:
        span = spans.get(r.get("id"))
        for ts in r.get("timestamps", ()):
            if span is None:
                continue
            if ts["name"] == "REQUEST_START":
                span.start_ns = ts["ns"]
            elif ts["name"] == "REQUEST_END":
                span.end_ns = ts["ns"]
    roots = []
    for span in spans.values():
        parent = spans.get(span.parent_id) if span.parent_id is not None else None
        (parent.children if parent else roots).append(span)
    for span in spans.values():
        span.children.sort(key=lambda s: s.start_ns or 0)
    return sorted(roots, key=lambda s: s.start_ns or 0)


def walk(span: Span, depth: int = 0):
    yield depth, span
    for child in span.children:
        yield from walk(child, depth + 1)


def to_chrome_trace(roots: list) -> list:
    """Chrome / Perfetto trace events (complete events, µs) — open in ui.perfetto.dev or chrome://tracing."""
    events = []
    for root in roots:
        for _, span in walk(root):
            if span.duration_ms is not None:
                events.append({"name": span.stage or span.model, "cat": span.model, "ph": "X", "pid": root.id,
                               "tid": span.id, "ts": span.start_ns / 1000, "dur": span.duration_ms * 1000,
                               "args": {"model": span.model, "parent": span.parent_id}})
    return events
