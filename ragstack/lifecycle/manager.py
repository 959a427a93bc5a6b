"""The model lifecycle authority: which engines are loaded, under one memory budget (specs 000, 001, 002).

Pure logic: the loader (what actually loads and unloads), the memory probe (what a loaded model holds, and
whether its processes are alive), the clock and the observer are injected, so the unit tests drive every rule
with fakes and the Triton model (``bls_models/model_manager``) plugs in the real ones.

The rules
---------
* **Budget.** A load proceeds only while the committed memory (every model loaded, loading, unloading or
  dead-but-not-reloaded) plus the model's footprint stays under the high-watermark of :class:`MemoryBudget`.
  A footprint is seeded (from the engine's manifest or files) until the model's first load, then measured.
* **LRU eviction.** When a load would cross the watermark, idle models are unloaded least recently used first
  (in sequential mode, models outside the current phase window go first) until it fits.
* **In use is never evicted.** A model holds a reference count of leases (``acquire`` -> ``release``); a
  model with a lease is never picked, so a request is never left without its engine.
* **Cooldown.** A model stays resident at least ``cooldown_s`` after it was loaded before it may be evicted,
  so alternating demand swaps engines at most once per cooldown instead of on every request.
* **Modes.** ``co_resident`` keeps whatever fits. ``sequential`` runs the phases (embed -> rerank -> generate,
  cyclic): acquiring one phase pre-warms the next and retires the others, so at most two engines are resident
  and the next engine's load overlaps the CPU work in between.
* **Self-healing.** The probe lists the live processes ("slots") of each model. A slot that disappears means a
  dead stub (Triton 2.51 neither restarts it nor stops reporting the model ready): the model is reloaded with
  new instances at once, and requests for it wait for the reload instead of failing.
* **Alerts.** A load over ``slow_load_s`` (30 s, spec 000) or ``oscillation_loads`` loads of one model within
  ``oscillation_window_s`` raise an alert through the observer.
* **Canary.** ``canary_start`` loads a new version beside the current one; leases are routed between them by a
  :class:`CanaryRouter`; its decision promotes the canary or rolls it back (reloading the previous version,
  warming it up and reporting ``rollback_completed`` with the root cause). A manual ``rollback`` restores the
  version the current one replaced (:class:`VersionHistory`).

Never blocking: ``acquire`` answers at once (``ready`` with a lease, or ``loading``/``waiting``); the one worker
(:meth:`run_once`, driven by :meth:`start`'s thread in production) plans every transition under the lock, so the
accounting never races with itself. It performs them one at a time, except loads: with ``parallel_loads`` > 1
(a loader that takes concurrent calls: Triton's repository API loads models in parallel), up to that many
loads and reloads run on their own threads while the worker goes on planning. That is what lets a sequential
batch that starts cold load its first phase and pre-warm the next at the same time, instead of one after the
other; the budget counts a loading model at its footprint from the moment the load is planned.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter, deque
from typing import Callable, Dict, Iterable, Mapping, Optional

from ragstack.lifecycle.budget import MemoryBudget
from ragstack.lifecycle.canary import CONTINUE, PROMOTE, ROLLBACK, CanaryRouter
from ragstack.lifecycle.history import VersionHistory

log = logging.getLogger("ragstack.lifecycle")

# model states
UNLOADED, LOADING, READY, UNLOADING, DEAD, FAILED = "unloaded", "loading", "ready", "unloading", "dead", "failed"
CO_RESIDENT, SEQUENTIAL = "co_resident", "sequential"
MODES = (CO_RESIDENT, SEQUENTIAL)
DEFAULT_PHASES = ("embed", "rerank", "generate")

# acquire outcomes
ACQ_READY, ACQ_LOADING, ACQ_WAITING, ACQ_FAILED, ACQ_UNMANAGED = "ready", "loading", "waiting", "failed", "unmanaged"

# what a request error says when the model's stub is gone (Triton 2.51's message)
DEAD_STUB_MARKERS = ("is not healthy", "Stub process", "died while serving this request")


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


class LifecycleSink:
    """What the manager reports (metrics, events). No-ops here; the Triton model and the tests override."""

    def loaded(self, model: str, seconds: float, footprint_bytes: int, reason: str) -> None: ...
    def unloaded(self, model: str, reason: str) -> None: ...
    def healed(self, model: str, seconds: float) -> None: ...
    def alert(self, alert: str, **fields) -> None: ...
    def rollback_completed(self, **fields) -> None: ...
    def promoted(self, **fields) -> None: ...
    def request(self, model: str, version: int, ok: bool, latency_s: Optional[float]) -> None: ...
    def usage(self, used_bytes: int, budget: MemoryBudget, resident: Mapping[str, int]) -> None: ...


@dataclasses.dataclass
class _VersionJob:
    kind: str                     # canary_start | promote | rollback
    versions: tuple               # what to serve afterwards
    reason: str = ""
    trigger: str = ""             # auto | manual
    from_version: int = -1
    to_version: int = -1
    stats: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Model:
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
    job: Optional[_VersionJob] = None
    last_canary: Optional[dict] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resident(self) -> bool:
        return self.state in (LOADING, READY, UNLOADING, DEAD)

    def estimate(self, n_versions: int = 1) -> int:
        per = self.per_version if self.per_version is not None else self.spec.seed_bytes
        return per * max(1, n_versions)


@dataclasses.dataclass(frozen=True)
class _LoadJob:
    """A planned load (demand, pre-warm or heal): what the worker may run on a thread of its own."""
    model: str
    run: Callable[[], object]

    def __call__(self):
        return self.run()


class ModelManager:
    def __init__(self, models: Iterable, *, budget: MemoryBudget, loader, probe=None,
                 sink: Optional[LifecycleSink] = None, history: Optional[VersionHistory] = None,
                 clock: Callable[[], float] = time.monotonic, mode: str = CO_RESIDENT,
                 phases: Optional[tuple] = None, cooldown_s: float = 10.0, lease_ttl_s: float = 600.0,
                 demand_ttl_s: float = 30.0, retry_after_s: float = 5.0, slow_load_s: float = 30.0,
                 oscillation_window_s: float = 120.0, oscillation_loads: int = 3, tick_s: float = 0.5,
                 reconcile_s: float = 5.0, warmup_on_load: bool = True, parallel_loads: int = 1):
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(str(m), 0) for m in models]
        self._models: Dict[str, _Model] = {s.name: _Model(spec=s, footprint=s.seed_bytes) for s in specs}
        self.budget = budget
        self.loader, self.probe = loader, probe
        self.sink = sink or LifecycleSink()
        self.history = history or VersionHistory(None)
        self.clock = clock
        self.cooldown_s, self.lease_ttl_s, self.demand_ttl_s = cooldown_s, lease_ttl_s, demand_ttl_s
        self.retry_after_s, self.slow_load_s = retry_after_s, slow_load_s
        self.oscillation_window_s, self.oscillation_loads = oscillation_window_s, oscillation_loads
        self.tick_s, self.reconcile_s, self.warmup_on_load = tick_s, reconcile_s, warmup_on_load
        self._check_parallel_loads(parallel_loads)
        self.parallel_loads = int(parallel_loads)
        self._loads_running = 0                   # loads (and heals) running on their own threads
        self._warmup_lock = threading.Lock()      # warm-ups (BLS requests) one at a time
        self.mode, self.cyclic = CO_RESIDENT, True
        self.phases = tuple(phases) if phases else tuple(p for p in DEFAULT_PHASES if p in self._models)
        self.set_mode(mode, phases)
        for m in self._models.values():
            current = self.history.current(m.name)
            if current is not None:
                m.versions = (current,)
        self._leases: Dict[str, Lease] = {}
        self._last_phase: Optional[str] = None   # the phase that last got a lease (sequential order)
        self._ids = itertools.count(1)
        self._health_due = self._reconcile_due = float("-inf")
        self._t0 = clock()
        self.transitions: deque = deque(maxlen=500)
        self._thread: Optional[threading.Thread] = None
        self._stop = False

    # ================================================================================== public: requests
    def acquire(self, model: str) -> AcquireResult:
        """A lease on a loaded model (``ready``), or a note that it is on its way (never blocks)."""
        with self._lock:
            m = self._models.get(model)
            if m is None:
                return AcquireResult(ACQ_UNMANAGED, detail=f"{model} is not managed")
            now = self.clock()
            if m.state == READY and not m.suspect:
                version = self._route(m)
                lease = Lease(f"{model}-{next(self._ids)}", model, version, now, now + self.lease_ttl_s)
                self._leases[lease.id] = lease
                m.refcount += 1
                m.version_refs[version] += 1
                m.last_used = now
                m.demand_since, m.demand_until = None, float("-inf")
                m.unload_wanted = None
                if m.name in self.phases:
                    self._last_phase = m.name
                self._on_use(m, now)
                return AcquireResult(ACQ_READY, lease, "resident")
            if m.state == FAILED and now - m.failed_at < self.retry_after_s:
                return AcquireResult(ACQ_FAILED, detail=m.error or "load failed")
            if m.demand_since is None:
                m.demand_since = now
            m.demand_until = now + self.demand_ttl_s
            m.unload_wanted = None
            self._on_use(m, now)
            self._wakeup.notify_all()
            status = ACQ_LOADING if m.state in (LOADING, DEAD) else ACQ_WAITING
            return AcquireResult(status, detail=m.blocked or m.state)

    def release(self, lease_id: str, ok: bool = True, latency_s: Optional[float] = None,
                error: Optional[str] = None) -> bool:
        """Give a lease back, with the request's outcome (counted per version; judged for a canary)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return False
            m = self._models[lease.model]
            now = self.clock()
            m.refcount = max(0, m.refcount - 1)
            m.version_refs[lease.version] -= 1
            if m.version_refs[lease.version] <= 0:
                del m.version_refs[lease.version]
            m.last_used = now
            self.sink.request(m.name, lease.version, ok, latency_s)
            if m.canary is not None and m.canary_state == "running" and lease.version in m.canary.stats:
                m.canary.record(lease.version, ok, latency_s, error)
                decision = m.canary.decide()
                if decision.action == ROLLBACK:
                    self._begin_canary_end(m, ROLLBACK, decision.reason, trigger="auto")
                elif decision.action == PROMOTE:
                    self._begin_canary_end(m, PROMOTE, decision.reason, trigger="auto")
            if not ok and error and any(s in error for s in DEAD_STUB_MARKERS):
                # No new lease until the worker has looked at the stubs (next tick, at once): the caller's
                # retry then waits for the reload instead of meeting the dead stub again.
                m.suspect = True
                self._health_due = float("-inf")
            self._wakeup.notify_all()
        return True

    def prewarm(self, model: str) -> str:
        """Load ``model`` ahead of its use, if the budget allows without evicting anything in use."""
        with self._lock:
            m = self._get(model)
            if m.state in (UNLOADED, FAILED):
                m.prewarm_until = self.clock() + self.demand_ttl_s
                m.unload_wanted = None
                self._wakeup.notify_all()
            return m.state

    def unload(self, model: str) -> str:
        """Operator unload: as soon as the model has no lease (cooldown does not apply)."""
        with self._lock:
            m = self._get(model)
            m.unload_wanted = "explicit"
            m.prewarm_until = m.demand_until = float("-inf")
            m.demand_since = None
            self._wakeup.notify_all()
            return m.state

    def set_mode(self, mode: str, phases: Optional[Iterable] = None, cyclic: Optional[bool] = None) -> None:
        """``co_resident`` or ``sequential`` (over ``phases``, default: the managed ones of embed, rerank,
        generate, in that order). ``cyclic`` (default on): the last phase pre-warms the first, for a stream of
        queries; off for a batch pipeline, where nothing follows the last phase."""
        if mode not in MODES:
            raise LifecycleError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        with self._lock:
            if phases is not None:
                phases = tuple(phases)
                unknown = [p for p in phases if p not in self._models]
                if unknown or len(set(phases)) != len(phases) or len(phases) < 2:
                    raise LifecycleError(f"phases must be two or more distinct managed models, got {phases}")
                self.phases = phases
            if mode == SEQUENTIAL and len(self.phases) < 2:
                raise LifecycleError(f"sequential mode needs two or more phases, got {self.phases}")
            self.mode = mode
            if cyclic is not None:
                self.cyclic = bool(cyclic)
            if mode == CO_RESIDENT:
                for m in self._models.values():
                    if m.unload_wanted == SEQUENTIAL:
                        m.unload_wanted = None
            self._wakeup.notify_all()

    def configure(self, *, budget: Optional[MemoryBudget] = None, **settings) -> None:
        """Change the budget or a timing setting (cooldown_s, lease_ttl_s, ...) while running."""
        allowed = {"cooldown_s", "lease_ttl_s", "demand_ttl_s", "retry_after_s", "slow_load_s",
                   "oscillation_window_s", "oscillation_loads", "tick_s", "parallel_loads"}
        unknown = set(settings) - allowed
        if unknown:
            raise LifecycleError(f"unknown settings {sorted(unknown)}; expected some of {sorted(allowed)}")
        if "parallel_loads" in settings:
            self._check_parallel_loads(settings["parallel_loads"])
        with self._lock:
            if budget is not None:
                self.budget = budget
            for key, value in settings.items():
                setattr(self, key, type(getattr(self, key))(value))
            self._wakeup.notify_all()

    def _check_parallel_loads(self, value) -> None:
        if int(value) < 1:
            raise LifecycleError(f"parallel_loads must be 1 or more, got {value}")
        if int(value) > 1 and not getattr(self.loader, "concurrent_loads", True):
            raise LifecycleError(f"{type(self.loader).__name__} loads one model at a time: parallel_loads must be 1")

    def on_stub_dead(self, model: str, detail: str = "") -> None:
        """A stub of ``model`` died: requests wait while it is unloaded and reloaded."""
        with self._lock:
            m = self._get(model)
            if m.state != READY:
                return
            now = self.clock()
            m.state, m.dead_since, m.suspect = DEAD, now, False
            self._log("dead", m, detail)
            self.sink.alert("model_stub_died", model=m.name, detail=detail, versions=list(m.versions))
            self._wakeup.notify_all()

    # ====================================================================================== public: canary
    def canary_start(self, model: str, version: int, *, share: float = 0.1, min_requests: int = 50,
                     promote_after: int = 200, max_error_rate: float = 0.02,
                     max_latency_ratio: Optional[float] = None, stable: Optional[int] = None,
                     engine_info: Optional[dict] = None) -> dict:
        with self._lock:
            m = self._get(model)
            if m.canary is not None or m.job is not None:
                raise LifecycleError(f"{model}: a rollout is already in progress ({m.canary_state or m.job.kind})")
            if stable is None:
                stable = self.history.current(model) or (m.versions[0] if len(m.versions) == 1 else 1)
            router = CanaryRouter(model, int(stable), int(version), share, min_requests, promote_after,
                                  max_error_rate, max_latency_ratio)
            self.history.ensure_current(model, int(stable))
            self.history.canary_started(model, int(stable), int(version), engine_info, share=share,
                                        min_requests=min_requests, promote_after=promote_after,
                                        max_error_rate=max_error_rate)
            m.canary, m.canary_state = router, "starting"
            if not m.versions:
                m.versions = (int(stable),)
            m.job = _VersionJob("canary_start", (int(stable), int(version)), trigger="manual",
                                from_version=int(stable), to_version=int(version))
            self._log("canary_start", m, f"v{stable} + v{version} at {share:.0%}")
            self._wakeup.notify_all()
            return router.to_dict()

    def canary_record(self, model: str, version: int, ok: bool, latency_s: Optional[float] = None,
                      error: Optional[str] = None) -> str:
        """An outcome reported outside a lease (a caller that routes by itself); returns the decision."""
        with self._lock:
            m = self._get(model)
            if m.canary is None or m.canary_state != "running":
                raise LifecycleError(f"{model}: no canary is running")
            m.canary.record(int(version), ok, latency_s, error)
            decision = m.canary.decide()
            if decision.action != CONTINUE:
                self._begin_canary_end(m, decision.action, decision.reason, trigger="auto")
            self._wakeup.notify_all()
            return decision.action

    def canary_route(self, model: str) -> int:
        with self._lock:
            return self._route(self._get(model))

    def rollback(self, model: str, root_cause: str) -> dict:
        """Operator rollback: abort the running canary, or restore the version the current one replaced."""
        if not root_cause:
            raise LifecycleError("a rollback needs a root cause")
        with self._lock:
            m = self._get(model)
            if m.canary is not None and m.canary_state in ("starting", "running"):
                self._begin_canary_end(m, ROLLBACK, root_cause, trigger="manual")
                return {"rolling_back": m.name, "to_version": m.canary.stable}
            if m.job is not None:
                raise LifecycleError(f"{model}: a {m.job.kind} is in progress; try again when it is done")
            current, previous = self.history.current(model), self.history.previous(model)
            if current is None or previous is None:
                raise LifecycleError(f"{model}: no previous version to roll back to (history: {current})")
            m.job = _VersionJob(ROLLBACK, (previous,), reason=root_cause, trigger="manual",
                                from_version=current, to_version=previous)
            self._log("rollback_start", m, f"v{current} -> v{previous}: {root_cause}")
            self._wakeup.notify_all()
            return {"rolling_back": m.name, "to_version": previous}

    def _begin_canary_end(self, m: _Model, action: str, reason: str, trigger: str) -> None:
        router = m.canary
        stats = router.to_dict()
        if action == PROMOTE:
            m.canary_state = "promoting"
            m.job = _VersionJob(PROMOTE, (router.canary,), reason, trigger, router.stable, router.canary, stats)
        else:
            m.canary_state = "rolling_back"
            m.job = _VersionJob(ROLLBACK, (router.stable,), reason, trigger, router.canary, router.stable, stats)
        self._log(f"{action}_start", m, reason)
        self._wakeup.notify_all()

    # ======================================================================================= public: views
    def used_bytes(self) -> int:
        with self._lock:
            return sum(m.footprint for m in self._models.values() if m.resident)

    def status(self) -> dict:
        with self._lock:
            now = self.clock()
            used = self.used_bytes()
            return {
                "clock_s": round(now - self._t0, 3), "mode": self.mode, "phases": list(self.phases),
                "cyclic": self.cyclic,
                "budget": self.budget.to_dict(), "used_bytes": used,
                "headroom_bytes": self.budget.headroom(used), "cooldown_s": self.cooldown_s,
                "parallel_loads": self.parallel_loads, "loads_running": self._loads_running,
                "leases": len(self._leases),
                "models": {m.name: self._model_status(m, now) for m in self._models.values()},
                "transitions": list(self.transitions)[-100:],
            }

    def _model_status(self, m: _Model, now: float) -> dict:
        return {
            "state": m.state, "loading_for": m.loading_for, "refcount": m.refcount,
            "footprint_bytes": m.footprint, "measured": m.measured, "footprint_source": m.footprint_source,
            "seed_bytes": m.spec.seed_bytes, "load_seconds": m.load_seconds, "warmup_ms": m.warmup_ms,
            "loads": m.loads,
            "unloads": m.unloads, "evictions": m.evictions, "heals": m.heals, "versions": list(m.versions),
            "slots": sorted([v if v is not None else -1, i] for v, i in m.slots),
            "last_used_age_s": None if m.last_used == float("-inf") else round(now - m.last_used, 3),
            "resident_for_s": round(now - m.loaded_at, 3) if m.loaded_at is not None and m.resident else None,
            "blocked": m.blocked, "error": m.error, "unload_wanted": m.unload_wanted, "suspect": m.suspect,
            "canary_state": m.canary_state, "canary": m.canary.to_dict() if m.canary else None,
            "last_canary": m.last_canary, "rollout": m.job.kind if m.job else None,
        }

    def lease(self, lease_id: str) -> Optional[Lease]:
        with self._lock:
            return self._leases.get(lease_id)

    # ======================================================================================== housekeeping
    def adopt(self, model: str) -> None:
        """Take over a model that is already loaded (e.g. at server start) as resident."""
        with self._lock:
            m = self._get(model)
            if m.state != UNLOADED:
                return
            now = self.clock()
            m.state, m.loaded_at, m.last_used = READY, now, now
            self._log("adopt", m, "")
        self._refresh(initial={model})

    def tick(self) -> None:
        """Expire forgotten leases and demands, watch the stubs, refresh footprints and gauges."""
        now = self.clock()
        with self._lock:
            for lease in [l for l in self._leases.values() if l.expires_at < now]:
                log.warning("lease %s on %s expired after %.0f s: released", lease.id, lease.model,
                            self.lease_ttl_s)
                self.release(lease.id, ok=True)
            for m in self._models.values():
                if m.demand_since is not None and m.demand_until < now:
                    m.demand_since = None
            due = now >= self._health_due
            if due:
                self._health_due = now + self.tick_s
            reconcile = now >= self._reconcile_due and getattr(self.loader, "is_ready", None) is not None
            if reconcile:
                self._reconcile_due = now + self.reconcile_s
        if due:
            self._refresh()
        if reconcile and not self.reconcile():
            with self._lock:
                self._reconcile_due = self.clock() + self.tick_s     # e.g. the server is still starting

    def reconcile(self) -> bool:
        """Follow loads and unloads made behind the manager's back (repository API, another client, models
        loaded at server start). False if Triton could not be asked about every model."""
        with self._lock:
            settled = [m.name for m in self._models.values()
                       if m.state in (READY, UNLOADED) and not m.busy and m.job is None]
        ready = {}
        for name in settled:
            try:
                ready[name] = bool(self.loader.is_ready(name))
            except Exception:  # noqa: BLE001 - cannot tell: leave it as it is
                continue
        for name, is_ready in ready.items():
            with self._lock:
                m = self._models[name]
                if m.busy or m.job is not None:
                    continue
                if m.state == READY and not is_ready and m.refcount == 0:
                    m.state, m.unloaded_at, m.slots = UNLOADED, self.clock(), frozenset()
                    self._log("external_unload", m, "not ready in Triton")
                    self._report_usage()
            if is_ready and self._models[name].state == UNLOADED:
                self.adopt(name)
        return len(ready) == len(settled)

    def check_health(self, model: Optional[str] = None) -> None:
        """Have the worker look at the stubs at once (``model``: hold its new leases until it has)."""
        with self._lock:
            if model is not None and self._get(model).state == READY:
                self._get(model).suspect = True
            self._health_due = float("-inf")
            self._wakeup.notify_all()

    def _refresh(self, initial: Optional[set] = None) -> None:
        """Read the probe: footprints of resident models, and dead slots (-> :meth:`on_stub_dead`)."""
        snapshot = self.probe.snapshot() if self.probe is not None else {}
        dead = []
        with self._lock:
            for m in self._models.values():
                if m.state != READY or m.busy:
                    continue
                usage = snapshot.get(m.name)
                if initial and m.name in initial:
                    if usage is not None:
                        m.slots = self._expected_slots(m, usage.slots)
                        m.footprint, m.measured, m.footprint_source = usage.bytes, True, "process"
                        m.per_version = usage.bytes // max(1, len(m.versions) or 1)
                    continue
                if m.slots and (usage is None or not m.slots <= usage.slots):
                    missing = sorted(m.slots - (usage.slots if usage else frozenset()), key=str)
                    dead.append((m.name, f"stub processes gone: {missing}"))
                elif usage is not None and usage.bytes > 0 and m.footprint_source != "device":
                    m.footprint, m.measured, m.footprint_source = usage.bytes, True, "process"
            self._report_usage()
        with self._lock:
            dead_names = {name for name, _ in dead}
            for m in self._models.values():
                if m.suspect and m.name not in dead_names and not m.busy:
                    m.suspect = False
            self._wakeup.notify_all()
        is_ready = getattr(self.loader, "is_ready", None)
        for name, detail in dead:
            try:
                external = is_ready is not None and not is_ready(name)
            except Exception:  # noqa: BLE001
                external = False
            if external:        # unloaded behind our back, not dead: Triton no longer reports it ready
                with self._lock:
                    m = self._models[name]
                    if m.state == READY and not m.busy:
                        m.state, m.unloaded_at, m.slots, m.suspect = UNLOADED, self.clock(), frozenset(), False
                        self._log("external_unload", m, detail)
                        self._report_usage()
                continue
            self.on_stub_dead(name, detail)

    def _expected_slots(self, m: _Model, slots: frozenset) -> frozenset:
        if m.versions:
            return frozenset(s for s in slots if s[0] is None or s[0] in m.versions)
        return frozenset(slots)

    def _report_usage(self) -> None:
        resident = {m.name: m.footprint for m in self._models.values() if m.resident}
        self.sink.usage(sum(resident.values()), self.budget, resident)

    # ============================================================================================ the worker
    def start(self, on_start: Optional[Callable[[], None]] = None) -> "ModelManager":
        """Run :meth:`tick` and :meth:`run_once` on a background thread until :meth:`stop`; ``on_start``
        (e.g. adopting models Triton loaded at start) runs first, on that thread."""
        self._on_start = on_start
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="model-manager", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # noqa: BLE001
                log.exception("model manager start hook")
        while True:
            with self._lock:
                if self._stop:
                    return
            try:
                self.tick()
                while self.run_once(background=True):
                    self.tick()
            except Exception:  # noqa: BLE001 - the worker must survive anything one transition throws
                log.exception("model manager worker")
            with self._lock:
                if self._stop:
                    return
                self._wakeup.wait(self.tick_s)

    def run_pending(self, limit: int = 100) -> int:
        """Run transitions until none is possible now (tests; the worker thread does the same)."""
        n = 0
        while n < limit and self.run_once():
            n += 1
        return n

    def run_once(self, background: bool = False) -> bool:
        """Plan one transition and perform it; False when nothing can be done now. ``background`` (the worker
        thread) starts a load on a thread of its own when ``parallel_loads`` > 1, and returns at once."""
        with self._lock:
            action = self._plan(self.clock())
            if action is None:
                return False
            threaded = background and self.parallel_loads > 1 and isinstance(action, _LoadJob)
            if threaded:
                self._loads_running += 1
        if not threaded:
            action()
            return True
        threading.Thread(target=self._run_load_job, args=(action,), name=f"model-load-{action.model}",
                         daemon=True).start()
        return True

    def _run_load_job(self, job: "_LoadJob") -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - _load reports its own failures; anything else must not kill the count
            log.exception("model manager load of %s", job.model)
        finally:
            with self._lock:
                self._loads_running -= 1
                self._wakeup.notify_all()

    # ------------------------------------------------------------------------------------------- planning
    def _plan(self, now: float) -> Optional[Callable[[], None]]:
        models = list(self._models.values())
        loads_open = self._loads_running < self.parallel_loads
        # With loads on their own threads the planner can see transitions in flight. Memory being unloaded
        # still counts as used until it is gone, so no eviction is planned against it (it would evict more
        # than needed): such plans wait for the unloads to finish.
        unloading = any(m.state == UNLOADING for m in models)
        for m in models:                                    # 1. heal dead stubs
            if m.state == DEAD and not m.busy and loads_open:
                m.busy, m.loading_for = True, "heal"
                return _LoadJob(m.name, lambda m=m: self._heal(m))
        for m in models:                                    # 2. version changes (canary, promote, rollback)
            if m.job is not None and not m.busy and m.state not in (LOADING, UNLOADING):
                action = self._plan_version_job(m, now, unloading)
                if action is not None:
                    return action
        # In sequential mode demands are served in phase order (the phase after the one last served first), not
        # in arrival order: a request that asks for embed while others wait for generate after rerank waits
        # for the next cycle instead of breaking this one.
        demanded = sorted((m for m in models if m.demand_since is not None and m.state in (UNLOADED, FAILED)
                           and not m.busy and m.job is None), key=lambda m: (self._phase_rank(m), m.demand_since))
        # Pre-warms do not chain: while a pre-warm's load is in flight the next one waits for it. A cold batch
        # loads its first phase (demanded) and pre-warms the second together; but once a request waits for a
        # pre-warm that has not finished, a third load beside it only slows the load that request waits for.
        prewarm_in_flight = any(m.state == LOADING and m.loading_for == "prewarm" for m in models)
        prewarms = [m for m in models if m.prewarm_until >= now and m.state in (UNLOADED, FAILED)
                    and not m.busy and m.demand_since is None and m.job is None and not prewarm_in_flight]
        for m in (demanded + prewarms) if loads_open else ():   # 3. loads: demanded first, then pre-warms
            if m.state == FAILED and now - m.failed_at < self.retry_after_s:
                continue
            need = m.estimate(len(m.versions) or 1)
            victims, reason = self._pick_victims(need, {m.name}, now)
            if victims and unloading:
                continue
            if victims is None:
                m.blocked = reason
                if reason and reason.startswith("too big"):
                    m.state, m.error, m.failed_at = FAILED, reason, now
                    self.sink.alert("model_over_budget", model=m.name, detail=reason)
                continue
            m.blocked = None
            self._mark(victims, m, now)
            why = "demand" if m.demand_since is not None else "prewarm"
            m.loading_for = why
            return _LoadJob(m.name, lambda m=m, v=victims, why=why: self._evict_then_load(v, m, m.versions, why))
        for m in models:                                    # 4. wanted unloads (sequential, operator)
            if m.unload_wanted and m.state == READY and m.refcount == 0 and not m.busy and m.job is None:
                if m.unload_wanted != "explicit" and now - (m.loaded_at or now) < self.cooldown_s:
                    continue
                m.state, m.busy = UNLOADING, True
                reason = m.unload_wanted
                m.unload_wanted = None
                return lambda m=m, reason=reason: self._unload(m, reason)
        used = self.used_bytes()                            # 5. back under the watermark (once settled)
        if used > self.budget.watermark_bytes and not any(m.state in (LOADING, UNLOADING) for m in models):
            victims, _ = self._pick_victims(used - self.budget.watermark_bytes, set(), now, free_first=False)
            if victims:
                self._mark(victims, None, now)
                return lambda v=victims: self._evict_all(v)
        return None

    def _mark(self, victims, target: Optional[_Model], now: float) -> None:
        for v in victims:
            v.state, v.busy = UNLOADING, True
        if target is not None:
            target.state, target.busy = LOADING, True

    def _pick_victims(self, need: int, exclude: set, now: float, free_first: bool = True):
        """Idle models to unload so that ``need`` more bytes fit: ([victims], None) or (None, why not)."""
        watermark = self.budget.watermark_bytes
        free = watermark - self.used_bytes() if free_first else 0
        if need <= free:
            return [], None
        if free_first and need > watermark:
            return None, (f"too big: needs {need / 2**20:.0f} MiB, the high-watermark is "
                          f"{watermark / 2**20:.0f} MiB")
        candidates = [m for m in self._models.values() if m.state == READY and not m.busy
                      and m.name not in exclude and m.job is None]
        # A model someone is waiting for (loaded for a demand not yet turned into a lease) counts as in use:
        # evicting it before its caller's next poll would starve that caller.
        idle = [m for m in candidates if m.refcount == 0 and m.demand_since is None]
        cold = [m for m in idle if now - (m.loaded_at if m.loaded_at is not None else now) >= self.cooldown_s]
        window = self._phase_window()
        cold.sort(key=lambda m: (0 if (self.mode == SEQUENTIAL and m.name not in window) else 1, m.last_used))
        victims, freed = [], 0
        for m in cold:
            if free + freed >= need:
                break
            victims.append(m)
            freed += m.footprint
        if free + freed >= need:
            return victims, None
        in_cooldown = [m for m in idle if m not in cold]
        if in_cooldown and free + sum(m.footprint for m in idle) >= need:
            first = min(in_cooldown, key=lambda m: m.loaded_at)
            wait = self.cooldown_s - (now - first.loaded_at)
            return None, f"cooldown: {first.name} stays resident {wait:.1f} s more"
        busy = [m.name for m in candidates if m not in idle]
        return None, f"in use: {', '.join(busy) or 'nothing evictable'}; waiting for a release"

    def _phase_window(self) -> set:
        """In sequential mode: the phase now in use and the next one (pre-warmed)."""
        if self.mode != SEQUENTIAL:
            return set()
        window = set()
        for i, name in enumerate(self.phases):
            m = self._models[name]
            if m.refcount > 0 or m.demand_since is not None:
                window.update({name, self.phases[(i + 1) % len(self.phases)]})
        return window

    def _plan_version_job(self, m: _Model, now: float, unloading: bool):
        job = m.job
        removed = [v for v in m.versions if v not in job.versions]
        if any(m.version_refs.get(v, 0) > 0 for v in removed):
            m.blocked = f"{job.kind}: waiting for requests on v{removed} to finish"
            return None
        if job.kind == "canary_start" and m.state != READY and m.state not in (UNLOADED, FAILED):
            return None
        extra = m.estimate(len(job.versions))   # Triton brings up the new configuration before retiring the old
        victims, reason = self._pick_victims(extra, {m.name}, now)
        if victims and unloading:
            return None                         # planned against memory still being freed (see _plan)
        if victims is None:
            m.blocked = f"{job.kind}: {reason}"
            return None
        m.blocked = None
        was_ready = m.state == READY
        for v in victims:
            v.state, v.busy = UNLOADING, True
        m.busy = True
        if not was_ready:
            m.state = LOADING
        return lambda: self._run_version_job(m, victims, was_ready)

    # ---------------------------------------------------------------------------------------- transitions
    def _evict_then_load(self, victims, m: _Model, versions: tuple, why: str) -> bool:
        for v in victims:
            self._unload(v, "evict", for_model=m.name)
        return self._load(m, versions, why)

    def _evict_all(self, victims) -> None:
        for v in victims:
            self._unload(v, "evict", for_model="the budget")

    def _load(self, m: _Model, versions: tuple, why: str) -> bool:
        t0 = self.clock()
        try:
            reload = getattr(self.loader, "reload", None) if why == "heal" else None
            measured = reload(m.name, tuple(versions)) if reload is not None else \
                self.loader.load(m.name, tuple(versions))
        except Exception as e:  # noqa: BLE001 - a failed load is this model's state, not the worker's crash
            with self._lock:
                now = self.clock()
                m.state, m.busy, m.error, m.failed_at = FAILED, False, f"{type(e).__name__}: {e}", now
                m.loading_for = None
                self._log("load_failed", m, m.error)
                self.sink.alert("model_load_failed", model=m.name, error=m.error)
                self._wakeup.notify_all()
            return False
        seconds = self.clock() - t0
        warmup_ms = None
        if self.warmup_on_load and why in ("demand", "prewarm", "heal"):
            # Pre-warming means ready to serve: the engine's first-request costs are paid here, not by the
            # first request (a rollout warms its versions itself).
            ok, warmup_ms, err = self._warmup(m.name, versions[-1] if versions else -1)
            if not ok:
                self.sink.alert("model_warmup_failed", model=m.name, error=err)
        usage = (self.probe.snapshot() if self.probe is not None else {}).get(m.name)
        with self._lock:
            now = self.clock()
            m.versions = tuple(versions)
            m.state, m.busy, m.error, m.blocked = READY, False, None, None
            m.loaded_at, m.last_used, m.load_seconds, m.warmup_ms = now, now, seconds, warmup_ms
            m.loading_for = None
            m.prewarm_until = float("-inf")
            m.loads += 1
            size = measured if measured else (usage.bytes if usage is not None and usage.bytes > 0 else None)
            if size:
                m.footprint, m.measured = int(size), True
                m.footprint_source = "device" if measured else "process"
                m.per_version = int(size) // max(1, len(versions) or 1)
            else:
                m.footprint = m.estimate(len(versions) or 1)
            m.slots = self._expected_slots(m, usage.slots) if usage is not None else frozenset()
            self._log("load", m, why, seconds, warmup_ms=warmup_ms)
            self.sink.loaded(m.name, seconds, m.footprint, why)
            if seconds > self.slow_load_s:
                self.sink.alert("model_load_slow", model=m.name, seconds=round(seconds, 3),
                                threshold_s=self.slow_load_s)
            self._check_oscillation(m, now)
            self._report_usage()
            self._wakeup.notify_all()
        return True

    def _unload(self, m: _Model, reason: str, for_model: Optional[str] = None) -> None:
        try:
            self.loader.unload(m.name)
        except Exception as e:  # noqa: BLE001
            log.error("unloading %s failed: %s", m.name, e)
        with self._lock:
            now = self.clock()
            m.state, m.busy, m.unloaded_at, m.slots = UNLOADED, False, now, frozenset()
            m.unloads += 1
            if reason == "evict":
                m.evictions += 1
            detail = reason + (f" for {for_model}" if for_model else "")
            self._log("evict" if reason == "evict" else "unload", m, detail)
            self.sink.unloaded(m.name, reason)
            self._report_usage()
            self._wakeup.notify_all()

    def _heal(self, m: _Model) -> None:
        """Reload a model whose stub died: new instances replace the old ones, with no unload first where the
        loader can (``reload``: Triton 2.51 cannot finish unloading a stub that died inside a BLS call)."""
        t0 = self.clock()
        if getattr(self.loader, "reload", None) is None:
            try:
                self.loader.unload(m.name)
            except Exception as e:  # noqa: BLE001
                log.warning("unloading dead %s: %s", m.name, e)
        with self._lock:
            m.state = LOADING
        if self._load(m, m.versions, "heal"):
            with self._lock:
                seconds = self.clock() - (m.dead_since if m.dead_since is not None else t0)
                m.heals += 1
                m.dead_since = None
                self._log("healed", m, "", seconds)
                self.sink.healed(m.name, seconds)

    def _run_version_job(self, m: _Model, victims, was_ready: bool) -> None:
        job = m.job
        for v in victims:
            self._unload(v, "evict", for_model=m.name)
        ok = self._load(m, job.versions, job.kind)
        with self._lock:
            if not ok:
                m.job = None
                if job.kind == "canary_start":
                    # The new version does not even load: that is the root cause of its rollback.
                    self.sink.alert("canary_load_failed", model=m.name, version=job.to_version, error=m.error)
                    m.state, m.busy = (READY, False) if was_ready else (m.state, False)
                    self._begin_canary_end(m, ROLLBACK, f"canary v{job.to_version} failed to load: {m.error}",
                                           trigger="auto")
                else:
                    self.sink.alert(f"{job.kind}_failed", model=m.name, error=m.error)
                    m.canary, m.canary_state = None, None
                return
        if job.kind == "canary_start":
            warm_ok, warm_ms, warm_err = self._warmup(m.name, job.to_version)
            with self._lock:
                m.job, m.canary_state = None, "running"
                if not warm_ok and m.canary is not None:
                    m.canary.record(job.to_version, False, None, f"warm-up: {warm_err}")
                self._log("canary_running", m, f"warm-up {'ok' if warm_ok else 'failed'}")
            return
        if job.kind == PROMOTE:
            with self._lock:
                self.history.promoted(m.name, job.from_version, job.to_version, job.reason, job.stats)
                m.last_canary = {"outcome": PROMOTE, "reason": job.reason, **job.stats}
                m.canary, m.canary_state, m.job = None, None, None
                self._log("promoted", m, job.reason)
                self.sink.promoted(model=m.name, from_version=job.from_version, to_version=job.to_version,
                                   reason=job.reason, stats=job.stats,
                                   **self.history.version_info(m.name, job.to_version))
            return
        # rollback: warm up the restored version, then record and report
        warm_ok, warm_ms, warm_err = self._warmup(m.name, job.to_version)
        with self._lock:
            if m.canary is not None:
                self.history.canary_aborted(m.name, job.to_version, job.from_version, job.reason, job.stats,
                                            job.trigger)
                m.last_canary = {"outcome": ROLLBACK, "reason": job.reason, **job.stats}
            else:
                self.history.rolled_back(m.name, job.from_version, job.to_version, job.reason, job.trigger)
            m.canary, m.canary_state, m.job = None, None, None
            self._log("rolled_back", m, job.reason)
            self.sink.rollback_completed(
                model=m.name, from_version=job.from_version, to_version=job.to_version, root_cause=job.reason,
                trigger=job.trigger, warmup_ok=warm_ok, warmup_ms=warm_ms, warmup_error=warm_err,
                stats=job.stats, **self.history.version_info(m.name, job.to_version))

    def _warmup(self, model: str, version: int):
        warm = getattr(self.loader, "warmup", None)
        if warm is None:
            return True, 0.0, None
        with self._warmup_lock:
            t0 = self.clock()
            try:
                warm(model, version)
                return True, round((self.clock() - t0) * 1000, 3), None
            except Exception as e:  # noqa: BLE001
                return False, round((self.clock() - t0) * 1000, 3), f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------------------------------- helpers
    def _get(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            raise LifecycleError(f"{model!r} is not a managed model; managed: {', '.join(self._models)}")
        return m

    def _route(self, m: _Model) -> int:
        if m.canary is not None:
            if m.canary_state == "running":
                return m.canary.route()
            return m.canary.canary if m.canary_state == "promoting" else m.canary.stable
        return m.versions[0] if len(m.versions) == 1 else -1

    def _phase_rank(self, m: _Model) -> int:
        """Sequential mode: how many phases after the one last served ``m`` comes (0: the next one); 0 for every
        model otherwise."""
        if self.mode != SEQUENTIAL or m.name not in self.phases or self._last_phase not in self.phases:
            return 0
        return (self.phases.index(m.name) - self.phases.index(self._last_phase) - 1) % len(self.phases)

    def _on_use(self, m: _Model, now: float) -> None:
        """Sequential mode: pre-warm the next phase, retire the phases outside the window. Wakes the worker
        when that gives it something to do: a pre-warm that waits for the next tick starts up to ``tick_s``
        late (or later, behind a reconcile), which is all the overlap a short phase has."""
        if self.mode != SEQUENTIAL or m.name not in self.phases:
            return
        i = self.phases.index(m.name)
        nxt = self.phases[(i + 1) % len(self.phases)] if self.cyclic or i + 1 < len(self.phases) else None
        wake = False
        if nxt is not None:
            n = self._models[nxt]
            if n.state in (UNLOADED, FAILED) and n.demand_since is None:
                wake = wake or n.prewarm_until < now
                n.prewarm_until = now + self.demand_ttl_s
            n.unload_wanted = None if n.unload_wanted == SEQUENTIAL else n.unload_wanted
        for name in self.phases:
            if name not in (m.name, nxt):
                other = self._models[name]
                if other.demand_since is None and other.refcount == 0 and other.unload_wanted is None:
                    other.unload_wanted = SEQUENTIAL
                    other.prewarm_until = float("-inf")
                    wake = True
        if wake:
            self._wakeup.notify_all()

    def _check_oscillation(self, m: _Model, now: float) -> None:
        m.load_times.append(now)
        recent = [t for t in m.load_times if now - t <= self.oscillation_window_s]
        if len(recent) >= self.oscillation_loads and now - m.last_oscillation_alert > self.oscillation_window_s:
            m.last_oscillation_alert = now
            self.sink.alert("model_oscillation", model=m.name, loads=len(recent),
                            window_s=self.oscillation_window_s, cooldown_s=self.cooldown_s,
                            hint="raise cooldown_s or the budget, or pin the model (spec 001 tuning playbook)")

    def _log(self, action: str, m: _Model, detail: str, seconds: Optional[float] = None, **extra) -> None:
        entry = {"t": round(self.clock() - self._t0, 3), "model": m.name, "action": action, "detail": detail}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        entry.update({k: v for k, v in extra.items() if v is not None})
        self.transitions.append(entry)
        log.info("lifecycle %s %s %s", action, m.name, detail)
