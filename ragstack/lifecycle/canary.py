"""Canary rollout: a new engine version beside the current one, judged on live traffic.

:class:`CanaryRouter` splits traffic between the stable and the canary version by a configurable share, keeps
per-version counters (requests, errors, latency) and decides:

* **rollback** as soon as the canary has served at least ``min_requests`` and its error rate is over
  ``max_error_rate`` (2 % by default), or its p95 latency is over ``max_latency_ratio`` times the stable one;
* **promote** once it has served ``promote_after`` requests within both limits;
* **continue** otherwise.

Routing is deterministic (a credit accumulator, not a coin): over any ``n`` routed requests the canary gets
``floor(n * share)`` or one more, so small test runs see exactly the configured share.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Optional

from ragstack.contracts.errors import InvalidInput

PROMOTE = "promote"
ROLLBACK = "rollback"
CONTINUE = "continue"


@dataclasses.dataclass
class VersionStats:
    """Requests, errors and recent latencies of one version."""
    requests: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    latencies: deque = dataclasses.field(default_factory=lambda: deque(maxlen=1000))
    last_error: Optional[str] = None

    def record(self, ok: bool, latency_s: Optional[float] = None, error: Optional[str] = None) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
            self.last_error = error or self.last_error
        if latency_s is not None:
            self.latency_sum_s += latency_s
            self.latencies.append(latency_s)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> Optional[float]:
        if not self.latencies:
            return None
        data = sorted(self.latencies)
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]

    def to_dict(self) -> dict:
        p50, p95 = self.quantile(0.5), self.quantile(0.95)
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "latency_p50_ms": None if p50 is None else round(p50 * 1000, 3),
                "latency_p95_ms": None if p95 is None else round(p95 * 1000, 3),
                "last_error": self.last_error}


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str          # promote | rollback | continue
    reason: str


class CanaryRouter:
    def __init__(self, model: str, stable: int, canary: int, share: float = 0.1, min_requests: int = 50,
                 promote_after: int = 200, max_error_rate: float = 0.02,
                 max_latency_ratio: Optional[float] = None):
        if stable == canary:
            raise InvalidInput(f"{model}: canary version {canary} is the stable version")
        if not 0.0 < share < 1.0:
            raise InvalidInput(f"canary share must be in (0, 1), got {share}")
        if min_requests < 1 or promote_after < min_requests:
            raise InvalidInput(f"need 1 <= min_requests ({min_requests}) <= promote_after ({promote_after})")
        if not 0.0 <= max_error_rate < 1.0:
            raise InvalidInput(f"max_error_rate must be in [0, 1), got {max_error_rate}")
        self.model, self.stable, self.canary = model, int(stable), int(canary)
        self.share = float(share)
        self.min_requests, self.promote_after = int(min_requests), int(promote_after)
        self.max_error_rate = float(max_error_rate)
        self.max_latency_ratio = max_latency_ratio
        self.stats = {self.stable: VersionStats(), self.canary: VersionStats()}
        self._credit = 0.0
        self.routed = {self.stable: 0, self.canary: 0}

    # -------------------------------------------------------------------------------------------- route
    def route(self) -> int:
        """The version the next request goes to."""
        self._credit += self.share
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            version = self.canary
        else:
            version = self.stable
        self.routed[version] += 1
        return version

    def record(self, version: int, ok: bool, latency_s: Optional[float] = None,
               error: Optional[str] = None) -> None:
        stats = self.stats.get(int(version))
        if stats is not None:
            stats.record(ok, latency_s, error)

    # ------------------------------------------------------------------------------------------- decide
    def decide(self) -> Decision:
        c, s = self.stats[self.canary], self.stats[self.stable]
        if c.requests < self.min_requests:
            return Decision(CONTINUE, f"canary v{self.canary} has {c.requests} of {self.min_requests} "
                                      "requests needed to judge it")
        if c.error_rate > self.max_error_rate:
            return Decision(ROLLBACK, f"canary v{self.canary} error rate {c.error_rate:.1%} over "
                                      f"{c.requests} requests exceeds {self.max_error_rate:.0%}"
                                      + (f" (last error: {c.last_error})" if c.last_error else ""))
        if self.max_latency_ratio is not None:
            cp95, sp95 = c.quantile(0.95), s.quantile(0.95)
            if cp95 is not None and sp95 is not None and sp95 > 0 and cp95 > self.max_latency_ratio * sp95:
                return Decision(ROLLBACK, f"canary v{self.canary} p95 latency {cp95 * 1000:.1f} ms exceeds "
                                          f"{self.max_latency_ratio:g} x stable v{self.stable} "
                                          f"({sp95 * 1000:.1f} ms)")
        if c.requests >= self.promote_after:
            return Decision(PROMOTE, f"canary v{self.canary} served {c.requests} requests at error rate "
                                     f"{c.error_rate:.1%} (limit {self.max_error_rate:.0%})")
        return Decision(CONTINUE, f"canary v{self.canary} healthy so far ({c.requests} of "
                                  f"{self.promote_after} requests before promotion)")

    def to_dict(self) -> dict:
        return {"model": self.model, "stable": self.stable, "canary": self.canary, "share": self.share,
                "min_requests": self.min_requests, "promote_after": self.promote_after,
                "max_error_rate": self.max_error_rate, "max_latency_ratio": self.max_latency_ratio,
                "routed": {str(k): v for k, v in self.routed.items()},
                "versions": {str(k): v.to_dict() for k, v in self.stats.items()}}
