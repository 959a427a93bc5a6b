"""A costly yes/no question asked at most every so often (Triton's ``is_cancelled()`` is an IPC round trip)."""
from __future__ import annotations

import time
from typing import Callable

CANCEL_POLL_S = 0.05   # how often a running request's is_cancelled() is asked (the first time: at once)


class Throttled:
    """``fn()`` asked at the first call, then at most once every ``every_s`` seconds; False in between.
    ``every_s=0`` asks at every call."""

    def __init__(self, fn: Callable[[], bool], every_s: float = CANCEL_POLL_S, clock=time.monotonic):
        self._fn, self._every, self._clock = fn, float(every_s), clock
        self._next = float("-inf")

    def __call__(self) -> bool:
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self._every
        return bool(self._fn())
