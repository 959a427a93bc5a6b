"""The model lifecycle authority: which engines are loaded, under one memory budget (docs/design-notes.md#memory).

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
* **Alerts.** A load over ``slow_load_s`` (30 s by default) or ``oscillation_loads`` loads of one model within
  ``oscillation_window_s`` raise an alert through the observer.
* **Canary.** ``canary_start`` loads a new version beside the current one; leases are routed between them by a
  :class:`CanaryRouter`; its decision promotes the canary or rolls it back (reloading the previous version,
  warming it up and reporting ``rollback_completed`` with the root cause). A manual ``rollback`` restores the
  version the current one replaced (:class:`VersionHistory`).

Where things are: the model states and their legal transitions in :mod:`~ragstack.lifecycle.state`, what to do
next in :mod:`~ragstack.lifecycle.planner`, sequential mode in :mod:`~ragstack.lifecycle.phases`, canaries and
rollbacks in :mod:`~ragstack.lifecycle.rollouts` (mixins of :class:`ModelManager`, which keeps the requests,
the views, the housekeeping, the worker and the transitions themselves: load, unload, heal).

Never blocking: ``acquire`` answers at once (``ready`` with a lease, or ``loading``/``waiting``); the one worker
(:meth:`run_once`, driven by :meth:`start`'s thread in production) plans every transition under the lock, so the
accounting never races with itself. It performs them one at a time, except loads: with ``parallel_loads`` > 1
(a loader that takes concurrent calls: Triton's repository API loads models in parallel), up to that many
loads and reloads run on their own threads while the worker goes on planning. That is what lets a sequential
batch that starts cold load its first phase and pre-warm the next at the same time, instead of one after the
other; the budget counts a loading model at its footprint from the moment the load is planned.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Dict, Iterable, Mapping, Optional

from ragstack.lifecycle.budget import MemoryBudget
from ragstack.lifecycle.history import VersionHistory
from ragstack.lifecycle.phases import SequentialPhases
from ragstack.lifecycle.planner import Planner
from ragstack.lifecycle.rollouts import Rollouts
from ragstack.settings import MANAGER_DEFAULTS as DEFAULTS
from ragstack.lifecycle.state import (  # noqa: F401 - re-exported: the manager's public names
    ACQ_FAILED, ACQ_LOADING, ACQ_READY, ACQ_UNMANAGED, ACQ_WAITING, CO_RESIDENT, DEAD, DEAD_STUB_MARKERS,
    DEFAULT_PHASES, FAILED, LOADING, MODES, READY, SEQUENTIAL, TRANSITIONS, UNLOADED, UNLOADING, AcquireResult,
    IllegalTransition, Lease, LifecycleError, LoadJob, ModelSpec, ModelState, VersionJob)

log = logging.getLogger("ragstack.lifecycle")

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


class ModelManager(SequentialPhases, Planner, Rollouts):
    def __init__(self, models: Iterable, *, budget: MemoryBudget, loader, probe=None,
                 sink: Optional[LifecycleSink] = None, history: Optional[VersionHistory] = None,
                 clock: Callable[[], float] = time.monotonic, mode: str = CO_RESIDENT,
                 phases: Optional[tuple] = None, cooldown_s: float = DEFAULTS.cooldown_s,
                 lease_ttl_s: float = DEFAULTS.lease_ttl_s, demand_ttl_s: float = 30.0, retry_after_s: float = 5.0,
                 slow_load_s: float = DEFAULTS.slow_load_s, oscillation_window_s: float = 120.0,
                 oscillation_loads: int = 3, tick_s: float = DEFAULTS.tick_s, reconcile_s: float = 5.0,
                 warmup_on_load: bool = True, parallel_loads: Optional[int] = None):
        """``parallel_loads`` None: the model_manager default (ragstack.settings.ManagerParams), 1 for a loader
        that loads one model at a time."""
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        specs = [m if isinstance(m, ModelSpec) else ModelSpec(str(m), 0) for m in models]
        self._models: Dict[str, ModelState] = {s.name: ModelState(spec=s, footprint=s.seed_bytes) for s in specs}
        self.budget = budget
        self.loader, self.probe = loader, probe
        self.sink = sink or LifecycleSink()
        self.history = history or VersionHistory(None)
        self.clock = clock
        self.cooldown_s, self.lease_ttl_s, self.demand_ttl_s = cooldown_s, lease_ttl_s, demand_ttl_s
        self.retry_after_s, self.slow_load_s = retry_after_s, slow_load_s
        self.oscillation_window_s, self.oscillation_loads = oscillation_window_s, oscillation_loads
        self.tick_s, self.reconcile_s, self.warmup_on_load = tick_s, reconcile_s, warmup_on_load
        if parallel_loads is None:
            parallel_loads = DEFAULTS.parallel_loads if getattr(loader, "concurrent_loads", True) else 1
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
            if not self._other_phases_busy(m, now):   # a demand that starts a cycle steers it (pre-warm, retire)
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
            self._judge_canary(m, lease.version, ok, latency_s, error)
            if not ok and error and any(s in error for s in DEAD_STUB_MARKERS):
                # No new lease until the worker has looked at the stubs (next tick, at once): the caller's
                # retry then waits for the reload instead of meeting the dead stub again.
                m.suspect = True
                self._health_due = float("-inf")
            self._wakeup.notify_all()
        return True

    def prewarm(self, model: str) -> str:
        """Load ``model`` ahead of its use, if the budget allows without evicting anything in use. A model being
        unloaded is loaded again once it is gone (a pre-warm asked during an eviction is not dropped)."""
        with self._lock:
            m = self._get(model)
            if m.state in (UNLOADED, FAILED, UNLOADING):
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
            m.move(DEAD)
            m.dead_since, m.suspect = now, False
            self._log("dead", m, detail)
            self.sink.alert("model_stub_died", model=m.name, detail=detail, versions=list(m.versions))
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

    def _model_status(self, m: ModelState, now: float) -> dict:
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
            m.move(READY)
            m.loaded_at, m.last_used = now, now
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
                    m.move(UNLOADED)
                    m.unloaded_at, m.slots = self.clock(), frozenset()
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
                        m.move(UNLOADED)
                        m.unloaded_at, m.slots, m.suspect = self.clock(), frozenset(), False
                        self._log("external_unload", m, detail)
                        self._report_usage()
                continue
            self.on_stub_dead(name, detail)

    def _expected_slots(self, m: ModelState, slots: frozenset) -> frozenset:
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
            threaded = background and self.parallel_loads > 1 and isinstance(action, LoadJob)
            if threaded:
                self._loads_running += 1
        if not threaded:
            action()
            return True
        threading.Thread(target=self._run_load_job, args=(action,), name=f"model-load-{action.model}",
                         daemon=True).start()
        return True

    def _run_load_job(self, job: "LoadJob") -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - _load reports its own failures; anything else must not kill the count
            log.exception("model manager load of %s", job.model)
        finally:
            with self._lock:
                self._loads_running -= 1
                self._wakeup.notify_all()

    # ---------------------------------------------------------------- transitions (what the planner returns)
    def _evict_then_load(self, victims, m: ModelState, versions: tuple, why: str) -> bool:
        for v in victims:
            self._unload(v, "evict", for_model=m.name)
        return self._load(m, versions, why)

    def _evict_all(self, victims) -> None:
        for v in victims:
            self._unload(v, "evict", for_model="the budget")

    def _load(self, m: ModelState, versions: tuple, why: str) -> bool:
        t0 = self.clock()
        try:
            reload = getattr(self.loader, "reload", None) if why == "heal" else None
            measured = reload(m.name, tuple(versions)) if reload is not None else \
                self.loader.load(m.name, tuple(versions))
        except Exception as e:  # noqa: BLE001 - a failed load is this model's state, not the worker's crash
            with self._lock:
                now = self.clock()
                m.move(FAILED)
                m.busy, m.error, m.failed_at = False, f"{type(e).__name__}: {e}", now
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
            m.move(READY)
            m.busy, m.error, m.blocked = False, None, None
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

    def _unload(self, m: ModelState, reason: str, for_model: Optional[str] = None) -> None:
        try:
            self.loader.unload(m.name)
        except Exception as e:  # noqa: BLE001
            log.error("unloading %s failed: %s", m.name, e)
        with self._lock:
            now = self.clock()
            m.move(UNLOADED)
            m.busy, m.unloaded_at, m.slots = False, now, frozenset()
            m.unloads += 1
            if reason == "evict":
                m.evictions += 1
            detail = reason + (f" for {for_model}" if for_model else "")
            self._log("evict" if reason == "evict" else "unload", m, detail)
            self.sink.unloaded(m.name, reason)
            self._report_usage()
            self._wakeup.notify_all()

    def _heal(self, m: ModelState) -> None:
        """Reload a model whose stub died: new instances replace the old ones, with no unload first where the
        loader can (``reload``: Triton 2.51 cannot finish unloading a stub that died inside a BLS call)."""
        t0 = self.clock()
        if getattr(self.loader, "reload", None) is None:
            try:
                self.loader.unload(m.name)
            except Exception as e:  # noqa: BLE001
                log.warning("unloading dead %s: %s", m.name, e)
        with self._lock:
            m.move(LOADING)
        if self._load(m, m.versions, "heal"):
            with self._lock:
                seconds = self.clock() - (m.dead_since if m.dead_since is not None else t0)
                m.heals += 1
                m.dead_since = None
                self._log("healed", m, "", seconds)
                self.sink.healed(m.name, seconds)

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
    def _get(self, model: str) -> ModelState:
        m = self._models.get(model)
        if m is None:
            raise LifecycleError(f"{model!r} is not a managed model; managed: {', '.join(self._models)}")
        return m

    def _check_oscillation(self, m: ModelState, now: float) -> None:
        m.load_times.append(now)
        recent = [t for t in m.load_times if now - t <= self.oscillation_window_s]
        if len(recent) >= self.oscillation_loads and now - m.last_oscillation_alert > self.oscillation_window_s:
            m.last_oscillation_alert = now
            self.sink.alert("model_oscillation", model=m.name, loads=len(recent),
                            window_s=self.oscillation_window_s, cooldown_s=self.cooldown_s,
                            hint="raise cooldown_s or the budget, or pin the model")

    def _log(self, action: str, m: ModelState, detail: str, seconds: Optional[float] = None, **extra) -> None:
        entry = {"t": round(self.clock() - self._t0, 3), "model": m.name, "action": action, "detail": detail}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        entry.update({k: v for k, v in extra.items() if v is not None})
        self.transitions.append(entry)
        log.info("lifecycle %s %s %s", action, m.name, detail)
