"""Sequential mode: the phases embed -> rerank -> generate, one after the other (for engines that do not fit the
budget together).

Acquiring one phase pre-warms the next and retires the others (at most two engines resident, the next load
overlapping the current phase's work); demands are served in phase order, not arrival order. Part of
:class:`~ragstack.lifecycle.manager.ModelManager` (a mixin: the manager's lock is held by the callers).
"""
from __future__ import annotations

from typing import Iterable, Optional

from ragstack.lifecycle.state import (CO_RESIDENT, FAILED, LOADING, MODES, SEQUENTIAL, UNLOADED,
                                      LifecycleError, ModelState)


class SequentialPhases:
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

    def _phase_rank(self, m: ModelState) -> int:
        """Sequential mode: how many phases after the one last served ``m`` comes (0: the next one); 0 for every
        model otherwise."""
        if self.mode != SEQUENTIAL or m.name not in self.phases or self._last_phase not in self.phases:
            return 0
        return (self.phases.index(m.name) - self.phases.index(self._last_phase) - 1) % len(self.phases)

    def _load_order(self, m: ModelState) -> tuple:
        """Which planned load goes first: demands by arrival, then pre-warms; in sequential mode the phases in
        their order first, from the one after the phase last served, demanded or pre-warmed alike. A request that
        asks for embed while the others are between rerank and generate then waits for the next cycle instead of
        breaking this one (generate, pre-warmed by rerank's use, loads first)."""
        demanded = m.demand_since is not None
        rank = 0
        if self.mode == SEQUENTIAL:
            rank = self._phase_rank(m) if m.name in self.phases else (0 if demanded else len(self.phases))
        return (rank, 0 if demanded else 1, m.demand_since if demanded else 0.0)

    def _other_phases_busy(self, m: ModelState, now: float) -> bool:
        """Sequential mode: whether a phase other than ``m`` is in use, wanted, pre-warming or loading. A request
        that only *asks* for ``m`` then joins the cycle under way (served in its turn) instead of steering it:
        its demand does not retire the phases the other requests are in, nor cancel their next one's pre-warm."""
        if self.mode != SEQUENTIAL or m.name not in self.phases:
            return False
        others = (self._models[name] for name in self.phases if name != m.name)
        return any(o.refcount > 0 or o.demand_since is not None or o.prewarm_until >= now or o.state == LOADING
                   for o in others)

    def _on_use(self, m: ModelState, now: float) -> None:
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
