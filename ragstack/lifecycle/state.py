"""One engine's lifecycle state, and the rules of how it may change (the manager's state machine).

A managed model is in one of six states::

    UNLOADED --load planned--> LOADING --loaded--> READY --unload/evict planned--> UNLOADING --gone--> UNLOADED
    UNLOADED --adopted (loaded behind the manager's back, e.g. at server start)--> READY
    READY --a stub died--> DEAD --heal planned--> LOADING
    LOADING --load failed--> FAILED --retry planned--> LOADING
    UNLOADED/FAILED --does not fit the budget at all--> FAILED
    READY --unloaded behind the manager's back--> UNLOADED
    READY --a rollout reloads it in place (new versions)--> READY, or FAILED when that load fails, and back to
          READY when that was a canary's load (Triton keeps serving the versions it had)

:meth:`ModelState.move` is the only way the manager changes a state, and it refuses any other change
(:class:`IllegalTransition`: a bug in the manager, never a request error). Everything else a model carries
(reference count, demand, pre-warm, cooldown stamps, the rollout in progress) is bookkeeping around the state.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Callable, Optional

from ragstack.lifecycle.canary import CanaryRouter

# model states
UNLOADED, LOADING, READY, UNLOADING, DEAD, FAILED = "unloaded", "loading", "ready", "unloading", "dead", "failed"
CO_RESIDENT, SEQUENTIAL = "co_resident", "sequential"
MODES = (CO_RESIDENT, SEQUENTIAL)
DEFAULT_PHASES = ("embed", "rerank", "generate")

# acquire outcomes
ACQ_READY, ACQ_LOADING, ACQ_WAITING, ACQ_FAILED, ACQ_UNMANAGED = "ready", "loading", "waiting", "failed", "unmanaged"

# what a request error says when the model's stub is gone (Triton 2.51's message)
DEAD_STUB_MARKERS = ("is not healthy", "Stub process", "died while serving this request")


# state -> the states it may move to
TRANSITIONS = {
    UNLOADED: {LOADING, READY, FAILED},
    LOADING: {READY, FAILED},
    READY: {UNLOADING, DEAD, UNLOADED, READY, FAILED},
    UNLOADING: {UNLOADED},
    DEAD: {LOADING},
    FAILED: {LOADING, FAILED, READY},
}


class IllegalTransition(RuntimeError):
    """The manager tried a state change its state machine does not have (a bug)."""


class LifecycleError(ValueError):
    """A request the manager cannot honour as asked (unknown mode, no canary running, ...)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    seed_bytes: int               # footprint estimate before the first measurement
    engine_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Lease:
    id: str
    model: str
    version: int                  # -1: whichever version Triton serves
    acquired_at: float
    expires_at: float


@dataclasses.dataclass(frozen=True)
class AcquireResult:
    status: str
    lease: Optional[Lease] = None
    detail: str = ""

    @property
    def version(self) -> int:
        return self.lease.version if self.lease else -1

    def to_dict(self) -> dict:
        out = {"status": self.status, "detail": self.detail}
        if self.lease:
            out.update(lease=self.lease.id, version=self.lease.version)
        return out


@dataclasses.dataclass
class VersionJob:
    kind: str                     # canary_start | promote | rollback
    versions: tuple               # what to serve afterwards
    reason: str = ""
    trigger: str = ""             # auto | manual
    from_version: int = -1
    to_version: int = -1
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ModelState:
    spec: ModelSpec
    state: str = UNLOADED
    footprint: int = 0
    per_version: Optional[int] = None
    measured: bool = False
    footprint_source: str = "seed"            # seed | process (probe, refreshed) | device (loader: NVML delta)
    refcount: int = 0
    version_refs: Counter = dataclasses.field(default_factory=Counter)
    last_used: float = float("-inf")
    loaded_at: Optional[float] = None
    unloaded_at: Optional[float] = None
    load_seconds: Optional[float] = None
    warmup_ms: Optional[float] = None
    loads: int = 0
    unloads: int = 0
    evictions: int = 0
    heals: int = 0
    versions: tuple = ()
    slots: frozenset = frozenset()
    error: Optional[str] = None
    failed_at: float = float("-inf")
    dead_since: Optional[float] = None
    demand_since: Optional[float] = None
    demand_until: float = float("-inf")
    prewarm_until: float = float("-inf")
    unload_wanted: Optional[str] = None
    suspect: bool = False                     # a request failed on a dead stub: no leases until checked
    busy: bool = False
    loading_for: Optional[str] = None         # why the load in flight began: demand | prewarm | heal
    blocked: Optional[str] = None
    load_times: deque = dataclasses.field(default_factory=lambda: deque(maxlen=64))
    last_oscillation_alert: float = float("-inf")
    canary: Optional[CanaryRouter] = None
    canary_state: Optional[str] = None        # starting | running | promoting | rolling_back
    job: Optional[VersionJob] = None
    last_canary: Optional[dict] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resident(self) -> bool:
        return self.state in (LOADING, READY, UNLOADING, DEAD)

    def move(self, state: str) -> None:
        """Change the state, by the rules of :data:`TRANSITIONS`."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.spec.name}: {self.state} -> {state} is not a lifecycle transition")
        self.state = state

    def estimate(self, n_versions: int = 1) -> int:
        per = self.per_version if self.per_version is not None else self.spec.seed_bytes
        return per * max(1, n_versions)


@dataclasses.dataclass(frozen=True)
class LoadJob:
    """A planned load (demand, pre-warm or heal): what the worker may run on a thread of its own."""
    model: str
    run: Callable[[], object]

    def __call__(self):
        return self.run()
