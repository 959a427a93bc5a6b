"""Self-healing for the Python models the manager does not budget: orchestrators, text models, ingest, the index.

Triton 2.51 neither restarts a Python stub that died nor stops reporting its model ready: every later request
fails with "Stub process ... is not healthy" for as long as the server runs. The :class:`ModelManager` heals
the engines it governs; this watchdog does the same for every other Python model, with the same parts (the
memory probe's view of each model's live stubs, the loader, the sink), and nothing else: these models are
never evicted and take no leases.

A model is *watched* once it has been seen ready in Triton with live stubs (its slots are remembered). When a
slot disappears while Triton still reports the model ready, the stub died: the model is unloaded (Triton then
reports it not ready, so readiness tells the truth while it is down) and loaded again. A model that
disappears because someone unloaded it (Triton reports it not ready) is simply forgotten until it is ready
again. Pure logic: the probe, the loader, the sink and the clock are injected, so the unit tests drive it
with fakes.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Dict, Iterable, Optional

log = logging.getLogger("ragstack.lifecycle")

WATCHING, HEALING, FAILED = "watching", "healing", "failed"
DEFAULT_WATCHED = ("rag_orchestrator", "rag_stream_orchestrator", "embed_text", "rerank_text", "generate_text",
                   "ingest", "vector_index")


@dataclasses.dataclass
class Watched:
    name: str
    state: Optional[str] = None            # None: not seen ready yet (or unloaded by someone)
    slots: frozenset = frozenset()
    heals: int = 0
    dead_since: Optional[float] = None
    last_heal_s: Optional[float] = None
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {"state": self.state or "unwatched", "slots": len(self.slots), "heals": self.heals,
                "last_heal_s": self.last_heal_s, "error": self.error}


class StubWatchdog:
    def __init__(self, models: Iterable[str], *, probe, loader, sink=None,
                 clock: Callable[[], float] = time.monotonic, tick_s: float = 0.5, retry_after_s: float = 5.0):
        self._models: Dict[str, Watched] = {name: Watched(name) for name in models}
        self.probe, self.loader, self.sink = probe, loader, sink
        self.clock, self.tick_s, self.retry_after_s = clock, tick_s, retry_after_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._forced: set = set()
        self._thread: Optional[threading.Thread] = None
        self._failed_at: Dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ public
    def models(self) -> list:
        return list(self._models)

    def status(self) -> dict:
        with self._lock:
            return {name: w.to_dict() for name, w in self._models.items()}

    def check(self, model: str, force: bool = False) -> str:
        """Have the watchdog's thread look at the stubs now (``force``: reload ``model`` even if its stubs look
        alive). Returns at once with the model's state: heals never run on the caller's thread."""
        w = self._models[model]
        with self._lock:
            if force:
                self._forced.add(model)
            state = w.state or "unwatched"
        self._wake.set()
        return state

    def run_once(self) -> None:
        """One look at every watched model's stubs: remember new ones, heal dead ones (and forced ones)."""
        with self._lock:
            forced, self._forced = self._forced, set()
        for name in forced:
            self._heal(self._models[name], "operator: forced heal")
        snapshot = self.probe.snapshot()
        for w in list(self._models.values()):
            usage = snapshot.get(w.name)
            slots = usage.slots if usage is not None else frozenset()
            if w.state in (None, FAILED):
                if slots and self._ready(w.name):
                    if w.state == FAILED and self.clock() - self._failed_at.get(w.name, 0) < self.retry_after_s:
                        continue
                    with self._lock:
                        w.state, w.slots, w.error = WATCHING, slots, None
                continue
            if w.state != WATCHING:
                continue
            if w.slots <= slots:
                with self._lock:
                    w.slots = slots          # instances added by a reload elsewhere: watch them too
                continue
            missing = sorted(w.slots - slots, key=str)
            if not self._ready(w.name):      # unloaded on purpose (repository API): not a death
                with self._lock:
                    w.state, w.slots = None, frozenset()
                continue
            self._heal(w, f"stub processes gone: {missing}")

    def start(self) -> "StubWatchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------------------------------- internals
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one bad look
                log.exception("stub watchdog tick failed")

    def _ready(self, model: str) -> bool:
        try:
            return bool(self.loader.is_ready(model))
        except Exception:  # noqa: BLE001 - cannot tell (server starting or stopping): not ready
            return False

    def _heal(self, w: Watched, detail: str) -> None:
        t0 = self.clock()
        with self._lock:
            w.state, w.dead_since = HEALING, t0
        log.warning("%s: Python stub died (%s): reloading", w.name, detail)
        if self.sink is not None:
            self.sink.alert("model_stub_died", model=w.name, detail=detail)
        try:
            try:
                self.loader.unload(w.name)
            except Exception as e:  # noqa: BLE001 - a dead stub may fail its unload; the load still replaces it
                log.warning("unloading dead %s: %s", w.name, e)
            self.loader.load(w.name, ())
        except Exception as e:  # noqa: BLE001
            with self._lock:
                w.state, w.error = FAILED, f"reload failed: {e}"
            self._failed_at[w.name] = self.clock()
            log.error("%s: reload after a stub death failed: %s", w.name, e)
            if self.sink is not None:
                self.sink.alert("model_heal_failed", model=w.name, error=str(e))
            return
        seconds = self.clock() - t0
        usage = self.probe.snapshot().get(w.name)
        with self._lock:
            w.state, w.slots = WATCHING, usage.slots if usage is not None else frozenset()
            if not w.slots:              # stubs not listed yet: pick them up at the next look
                w.state = None
            w.heals += 1
            w.last_heal_s, w.dead_since = round(seconds, 3), None
        log.warning("%s: healed in %.1f s", w.name, seconds)
        if self.sink is not None:
            self.sink.healed(w.name, seconds)
