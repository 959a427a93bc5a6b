"""What the manager does next: heal, roll out, load (demanded first, then pre-warms), unload, or evict to get
back under the budget; and which idle models to evict (LRU, cooldown, the sequential phase window) so that a
load fits. Planning marks the models it acts on (``busy``, their new state) under the manager's lock and returns
the transition to perform; part of :class:`~ragstack.lifecycle.manager.ModelManager` (a mixin).
"""
from __future__ import annotations

from typing import Callable, Optional

from ragstack.lifecycle.state import (DEAD, FAILED, LOADING, READY, SEQUENTIAL, UNLOADED, UNLOADING, LoadJob,
                                      ModelState)


class Planner:
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
                return LoadJob(m.name, lambda m=m: self._heal(m))
        for m in models:                                    # 2. version changes (canary, promote, rollback)
            if m.job is not None and not m.busy and m.state not in (LOADING, UNLOADING):
                action = self._plan_version_job(m, now, unloading)
                if action is not None:
                    return action
        demanded = [m for m in models if m.demand_since is not None and m.state in (UNLOADED, FAILED)
                    and not m.busy and m.job is None]
        # Pre-warms do not chain: while a pre-warm's load is in flight the next one waits for it. A cold batch
        # loads its first phase (demanded) and pre-warms the second together; but once a request waits for a
        # pre-warm that has not finished, a third load beside it only slows the load that request waits for.
        prewarm_in_flight = any(m.state == LOADING and m.loading_for == "prewarm" for m in models)
        prewarms = [m for m in models if m.prewarm_until >= now and m.state in (UNLOADED, FAILED)
                    and not m.busy and m.demand_since is None and m.job is None and not prewarm_in_flight]
        # 3. loads: demands by arrival, then pre-warms; in sequential mode in phase order first (_load_order)
        for m in sorted(demanded + prewarms, key=self._load_order) if loads_open else ():
            if m.state == FAILED and now - m.failed_at < self.retry_after_s:
                continue
            need = m.estimate(len(m.versions) or 1)
            victims, reason = self._pick_victims(need, {m.name}, now)
            if victims and unloading:
                continue
            if victims and self.mode == SEQUENTIAL and m.demand_since is None and not demanded:
                # A pre-warm takes spare memory; it retires an idle phase only when a request waits for a phase
                # switch anyway. Else a phase idle for a moment between its requests (their CPU work) would be
                # retired for the next one and be loaded back at once: the phases out of order, twice the loads.
                continue
            if victims is None:
                m.blocked = reason
                if reason and reason.startswith("too big"):
                    m.move(FAILED)
                    m.error, m.failed_at = reason, now
                    self.sink.alert("model_over_budget", model=m.name, detail=reason)
                continue
            m.blocked = None
            self._mark(victims, m, now)
            why = "demand" if m.demand_since is not None else "prewarm"
            m.loading_for = why
            return LoadJob(m.name, lambda m=m, v=victims, why=why: self._evict_then_load(v, m, m.versions, why))
        for m in models:                                    # 4. wanted unloads (sequential, operator)
            if m.unload_wanted and m.state == READY and m.refcount == 0 and not m.busy and m.job is None:
                if m.unload_wanted != "explicit" and now - (m.loaded_at or now) < self.cooldown_s:
                    continue
                m.move(UNLOADING)
                m.busy = True
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

    def _mark(self, victims, target: Optional[ModelState], now: float) -> None:
        for v in victims:
            v.move(UNLOADING)
            v.busy = True
        if target is not None:
            target.move(LOADING)
            target.busy = True

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
