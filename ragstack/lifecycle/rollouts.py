"""Version rollouts: a canary beside the stable version, its automatic promotion or
rollback, and the operator's rollback to the previous version. Leases are routed between the versions by a
:class:`~ragstack.lifecycle.canary.CanaryRouter`; a decision becomes a :class:`VersionJob` that the planner runs
(reload with the new set of versions, warm-up, history, event). Part of
:class:`~ragstack.lifecycle.manager.ModelManager` (a mixin: the manager's lock is held by the callers).
"""
from __future__ import annotations

from typing import Optional

from ragstack.lifecycle.canary import CONTINUE, PROMOTE, ROLLBACK, CanaryRouter
from ragstack.lifecycle.state import (FAILED, LOADING, READY, UNLOADED, UNLOADING, LifecycleError, ModelState,
                                      VersionJob)


class Rollouts:
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
            m.job = VersionJob("canary_start", (int(stable), int(version)), trigger="manual",
                                from_version=int(stable), to_version=int(version))
            self._log("canary_start", m, f"v{stable} + v{version} at {share:.0%}")
            self._wakeup.notify_all()
            return router.to_dict()

    def _judge_canary(self, m: ModelState, version: int, ok: bool, latency_s: Optional[float],
                      error: Optional[str]) -> None:
        """A leased request's outcome on a running canary's versions: recorded, and the canary decided on."""
        if m.canary is not None and m.canary_state == "running" and version in m.canary.stats:
            m.canary.record(version, ok, latency_s, error)
            decision = m.canary.decide()
            if decision.action == ROLLBACK:
                self._begin_canary_end(m, ROLLBACK, decision.reason, trigger="auto")
            elif decision.action == PROMOTE:
                self._begin_canary_end(m, PROMOTE, decision.reason, trigger="auto")

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
            m.job = VersionJob(ROLLBACK, (previous,), reason=root_cause, trigger="manual",
                                from_version=current, to_version=previous)
            self._log("rollback_start", m, f"v{current} -> v{previous}: {root_cause}")
            self._wakeup.notify_all()
            return {"rolling_back": m.name, "to_version": previous}

    def _begin_canary_end(self, m: ModelState, action: str, reason: str, trigger: str) -> None:
        router = m.canary
        stats = router.to_dict()
        if action == PROMOTE:
            m.canary_state = "promoting"
            m.job = VersionJob(PROMOTE, (router.canary,), reason, trigger, router.stable, router.canary, stats)
        else:
            m.canary_state = "rolling_back"
            m.job = VersionJob(ROLLBACK, (router.stable,), reason, trigger, router.canary, router.stable, stats)
        self._log(f"{action}_start", m, reason)
        self._wakeup.notify_all()

    def _plan_version_job(self, m: ModelState, now: float, unloading: bool):
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
            v.move(UNLOADING)
            v.busy = True
        m.busy = True
        if not was_ready:
            m.move(LOADING)
        return lambda: self._run_version_job(m, victims, was_ready)

    def _run_version_job(self, m: ModelState, victims, was_ready: bool) -> None:
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
                    if was_ready:                   # Triton still serves the versions it had
                        m.move(READY)
                    m.busy = False
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

    def _route(self, m: ModelState) -> int:
        if m.canary is not None:
            if m.canary_state == "running":
                return m.canary.route()
            return m.canary.canary if m.canary_state == "promoting" else m.canary.stable
        return m.versions[0] if len(m.versions) == 1 else -1
