"""Adaptive batch sizing: start small, ramp with queue depth, back off on p95 or memory headroom.

A controller per engine walks a bounded ladder of dynamic-batching settings (preferred batch sizes and queue
delay), one rung at a time:

* **up** when requests queue (queue depth at or over the current largest preferred size) while the recent p95
  is comfortably under its target and memory headroom is above the floor plus a margin, for ``up_after``
  consecutive samples;
* **down** when the p95 is over its target or headroom under the floor, for ``down_after`` consecutive samples
  (memory pressure acts on the first sample: ``down_after`` is 1 by default);
* never within ``cooldown_s`` of the previous change, never off the ends of the ladder.

The gaps between the up and down conditions (p95 under ``up_p95_fraction`` of the target to go up, over the
target to go down; a headroom margin) and the consecutive-sample counts are the hysteresis: a measurement
hovering at one threshold cannot make the setting oscillate. Each change is returned as an event (what, why, the
measurements) for the event log, and :meth:`Controller.gauges` gives the current setting for metrics.

The measurements are ones the stack already exports on Triton's metrics port: ``nv_inference_pending_request_count``
(queue depth), ``llm_stage_latency_us`` (a histogram per pipeline stage, for the p95) and the lifecycle manager's
``llm_memory_headroom_bytes`` / ``llm_memory_budget_bytes``; :func:`parse_prometheus` and :func:`histogram_p95`
read them. Applying a setting means reloading the model with a config override (tools/adaptive_batching.py).
Nothing here imports Triton.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Rung:
    preferred: tuple
    delay_us: int

    @property
    def largest(self) -> int:
        return max(self.preferred) if self.preferred else 1


# Each ladder starts small (at most 8 per batch) and ramps; its top rungs are the GPU profile's batching presets
# (model_config.EMBED_BATCHING / RERANK_BATCHING) and one above them, within each engine's max_batch_size
# (docs/design-notes.md#batching).
LADDERS = {
    "embed": (Rung((4, 8), 0), Rung((4, 8, 16), 2000), Rung((8, 16, 32), 3000)),
    "rerank": (Rung((2, 4, 8), 0), Rung((2, 4, 8), 5000), Rung((4, 8, 16), 5000)),
}


@dataclasses.dataclass(frozen=True)
class Sample:
    queue_depth: float                 # requests waiting in the model's queue
    p95_ms: Optional[float]            # recent p95 of the model's stage latency (None: no requests lately)
    headroom: Optional[float]          # memory headroom as a fraction of the budget (None: not known)


@dataclasses.dataclass
class Controller:
    model: str
    ladder: tuple
    p95_target_ms: float
    min_headroom: float = 0.10         # below this fraction of the budget free: smaller batches
    headroom_margin: float = 0.05      # going up needs min_headroom + this
    up_p95_fraction: float = 0.8       # going up needs the p95 under this fraction of the target
    up_after: int = 3
    down_after: int = 2
    memory_down_after: int = 1
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    step: int = 0
    changes: int = 0

    def __post_init__(self):
        if not self.ladder:
            raise ValueError("a ladder needs at least one rung")
        self.step = max(0, min(self.step, len(self.ladder) - 1))
        self._up = self._down = self._memory = 0
        self._last_change = -math.inf

    @property
    def rung(self) -> Rung:
        return self.ladder[self.step]

    def observe(self, s: Sample) -> Optional[dict]:
        """Feed one sample; returns the change event when the setting changes, else None."""
        low_memory = s.headroom is not None and s.headroom < self.min_headroom
        slow = s.p95_ms is not None and s.p95_ms > self.p95_target_ms
        roomy = s.headroom is None or s.headroom >= self.min_headroom + self.headroom_margin
        fast = s.p95_ms is None or s.p95_ms < self.up_p95_fraction * self.p95_target_ms
        queued = s.queue_depth >= self.rung.largest
        self._memory = self._memory + 1 if low_memory else 0
        self._down = self._down + 1 if slow else 0
        self._up = self._up + 1 if (queued and fast and roomy) else 0
        if self.clock() - self._last_change < self.cooldown_s:
            return None
        if self._memory >= self.memory_down_after and self.step > 0:
            return self._move(-1, "memory_headroom", s)
        if self._down >= self.down_after and self.step > 0:
            return self._move(-1, "p95_over_target", s)
        if self._up >= self.up_after and self.step < len(self.ladder) - 1:
            return self._move(+1, "queue_depth", s)
        return None

    def _move(self, delta: int, reason: str, s: Sample) -> dict:
        before = self.rung
        self.step += delta
        self.changes += 1
        self._up = self._down = self._memory = 0
        self._last_change = self.clock()
        return {"event": "adaptive_batching", "model": self.model, "direction": "up" if delta > 0 else "down",
                "reason": reason, "from": {"preferred": list(before.preferred), "delay_us": before.delay_us},
                "to": {"preferred": list(self.rung.preferred), "delay_us": self.rung.delay_us},
                "queue_depth": s.queue_depth, "p95_ms": s.p95_ms, "headroom": s.headroom}

    def gauges(self) -> dict:
        return {"step": self.step, "max_preferred_batch": self.rung.largest, "queue_delay_us": self.rung.delay_us,
                "changes": self.changes}


def config_override(config: dict, rung: Rung) -> dict:
    """A model's config (Triton's JSON form, as from the model-config API) with the rung's batching, the rest
    (priority levels and queue policies included) kept."""
    out = dict(config)
    batching = dict(out.get("dynamic_batching") or {})
    batching["preferred_batch_size"] = list(rung.preferred)
    batching["max_queue_delay_microseconds"] = rung.delay_us
    out["dynamic_batching"] = batching
    return out


# ------------------------------------------------------------------------------ reading the metrics port
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list:
    """[(name, {label: value}, float)] for every sample line of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def value(samples: list, name: str, **labels) -> Optional[float]:
    """Sum of the samples of ``name`` whose labels include ``labels`` (None when there is none)."""
    found = [v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())]
    return sum(found) if found else None


def buckets(samples: list, name: str, **labels) -> dict:
    """{upper bound: cumulative count} of a histogram."""
    out = {}
    for n, lab, v in samples:
        if n == f"{name}_bucket" and all(lab.get(k) == w for k, w in labels.items()):
            le = lab.get("le")
            bound = math.inf if le in ("+Inf", "inf") else float(le)
            out[bound] = out.get(bound, 0.0) + v
    return out


def histogram_p95(before: dict, after: dict, q: float = 0.95) -> Optional[float]:
    """The q-quantile (the bucket's upper bound) of the observations between two histogram readings."""
    bounds = sorted(after)
    deltas = [(b, after[b] - before.get(b, 0.0)) for b in bounds]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    for bound, cumulative in deltas:
        if cumulative >= q * total:
            return bound
    return bounds[-1]
