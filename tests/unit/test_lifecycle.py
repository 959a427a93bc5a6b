"""Model lifecycle core (ragstack.lifecycle) with a fake clock, loader and probe: no Triton, no sleeping."""
import json
import threading
import time
from pathlib import Path

import pytest

from ragstack.lifecycle import canary as cn
from ragstack.lifecycle.budget import MemoryBudget, parse_bytes
from ragstack.lifecycle.canary import CanaryRouter
from ragstack.lifecycle.history import VersionHistory
from ragstack.lifecycle.manager import (ACQ_FAILED, ACQ_READY, ACQ_UNMANAGED, ACQ_WAITING, CO_RESIDENT, DEAD,
                                        READY, SEQUENTIAL, UNLOADED, LifecycleError, LifecycleSink,
                                        ModelManager, ModelSpec)
from ragstack.lifecycle.procmem import ModelUsage, parse_stub_cmdline
from ragstack.lifecycle.service import ManagerService

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, dt):
        self.t += dt


class Loader:
    """Loads take ``load_s`` of fake time; the probe sees one stub per loaded version."""

    def __init__(self, clock, sizes, load_s=2.0, fail=()):
        self.clock, self.sizes, self.load_s, self.fail = clock, sizes, load_s, set(fail)
        self.loaded = {}            # model -> versions
        self.calls = []
        self.warmups = []
        self.killed = set()

    def load(self, model, versions):
        self.calls.append(("load", model, tuple(versions)))
        self.clock.advance(self.load_s if not isinstance(self.load_s, dict) else self.load_s.get(model, 2.0))
        if model in self.fail or any((model, v) in self.fail for v in versions):
            raise RuntimeError(f"{model} {versions} does not load")
        self.loaded[model] = tuple(versions) or (1,)
        self.killed.discard(model)
        return None

    def unload(self, model):
        self.calls.append(("unload", model))
        self.loaded.pop(model, None)

    def warmup(self, model, version):
        self.warmups.append((model, version))

    def is_ready(self, model):
        return model in self.loaded

    def loads(self):
        return [c[1] for c in self.calls if c[0] == "load"]


class Probe:
    def __init__(self, loader):
        self.loader = loader

    def snapshot(self):
        out = {}
        for model, versions in self.loader.loaded.items():
            if model in self.loader.killed:
                continue
            out[model] = ModelUsage(self.loader.sizes[model] * len(versions),
                                    frozenset((v, f"{model}_0_0") for v in versions), ())
        return out


class Sink(LifecycleSink):
    def __init__(self):
        self.events = []

    def loaded(self, model, seconds, footprint_bytes, reason):
        self.events.append(("loaded", model, reason))

    def unloaded(self, model, reason):
        self.events.append(("unloaded", model, reason))

    def healed(self, model, seconds):
        self.events.append(("healed", model))

    def alert(self, alert, **fields):
        self.events.append(("alert", alert, fields))

    def rollback_completed(self, **fields):
        self.events.append(("rollback", fields))

    def promoted(self, **fields):
        self.events.append(("promoted", fields))

    def alerts(self, name):
        return [e for e in self.events if e[0] == "alert" and e[1] == name]


def make(models=("embed", "rerank", "generate"), sizes=None, total=1000 * MB, buffer=0.2, seed=None,
         history=None, **kw):
    clock = Clock()
    sizes = sizes or {m: 300 * MB for m in models}
    loader = Loader(clock, sizes, load_s=kw.pop("load_s", 2.0), fail=kw.pop("fail", ()))
    sink = Sink()
    specs = [ModelSpec(m, seed if seed is not None else sizes[m]) for m in models]
    mgr = ModelManager(specs, budget=MemoryBudget(total, buffer), loader=loader, probe=Probe(loader), sink=sink,
                       clock=clock, history=history, **kw)
    return mgr, loader, clock, sink


def use(mgr, model, release=True, ok=True, error=None):
    """Acquire (running transitions until ready) and optionally release; returns the lease."""
    for _ in range(50):
        r = mgr.acquire(model)
        if r.status == ACQ_READY:
            if release:
                mgr.release(r.lease.id, ok=ok, latency_s=0.01, error=error)
            return r.lease
        assert r.status != ACQ_FAILED, r.detail
        if not mgr.run_pending():
            raise AssertionError(f"{model} cannot be loaded now: {r.detail}")
    raise AssertionError("no progress")


def resident(mgr):
    return {n for n, m in mgr.status()["models"].items() if m["state"] == READY}


# ------------------------------------------------------------------------------------------------ budget
def test_watermark_and_headroom_arithmetic():
    b = MemoryBudget(16 * 1024 * MB, 0.15)
    assert b.watermark_bytes == int(16 * 1024 * MB * 0.85)
    assert b.headroom(10 * 1024 * MB) == b.watermark_bytes - 10 * 1024 * MB
    assert b.fits(b.watermark_bytes - 5, 5) and not b.fits(b.watermark_bytes - 5, 6)
    assert parse_bytes("1.5G") == 1536 * MB and parse_bytes("512MiB") == 512 * MB and parse_bytes(42) == 42
    with pytest.raises(ValueError):
        MemoryBudget(100, 1.0)


def test_load_fits_exactly_at_the_watermark_and_not_one_byte_over():
    # watermark 800 MB: 2 x 400 MB fit exactly; a third model needs an eviction
    mgr, loader, *_ = make(sizes={"embed": 400 * MB, "rerank": 400 * MB, "generate": 1 * MB}, cooldown_s=0)
    use(mgr, "embed"), use(mgr, "rerank")
    assert resident(mgr) == {"embed", "rerank"} and mgr.used_bytes() == 800 * MB
    assert mgr.status()["headroom_bytes"] == 0
    use(mgr, "generate")
    assert ("unload", "embed") in loader.calls          # 1 byte over forces an eviction (LRU: embed)


# --------------------------------------------------------------------------------------------------- LRU
def test_a_load_over_the_watermark_evicts_the_least_recently_used_idle_model():
    mgr, loader, clock, sink = make(cooldown_s=0)
    use(mgr, "embed"); clock.advance(1)
    use(mgr, "rerank"); clock.advance(1)
    use(mgr, "embed"); clock.advance(1)                 # embed is now more recent than rerank
    use(mgr, "generate")
    assert resident(mgr) == {"embed", "generate"}
    evictions = [e for e in sink.events if e[0] == "unloaded"]
    assert evictions == [("unloaded", "rerank", "evict")]
    st = mgr.status()["models"]
    assert st["rerank"]["evictions"] == 1 and st["embed"]["evictions"] == 0


def test_footprint_is_seeded_then_measured_after_load():
    mgr, *_ = make(seed=50 * MB)
    assert mgr.status()["models"]["embed"]["footprint_bytes"] == 50 * MB
    use(mgr, "embed")
    m = mgr.status()["models"]["embed"]
    assert m["measured"] and m["footprint_bytes"] == 300 * MB and m["load_seconds"] == pytest.approx(2.0)


def test_a_model_in_use_is_never_evicted():
    mgr, loader, clock, _ = make(cooldown_s=0)
    a = use(mgr, "embed", release=False)
    b = use(mgr, "rerank", release=False)
    r = mgr.acquire("generate")
    assert r.status == ACQ_WAITING
    assert mgr.run_pending() == 0 and "in use" in mgr.status()["models"]["generate"]["blocked"]
    assert [c for c in loader.calls if c[0] == "unload"] == []
    mgr.release(b.id)                                    # rerank is free now; embed is still in use
    use(mgr, "generate")
    assert resident(mgr) == {"embed", "generate"}
    mgr.release(a.id)


def test_a_model_larger_than_the_watermark_fails_with_the_reason():
    mgr, *_ = make(sizes={"embed": 900 * MB, "rerank": 1, "generate": 1})
    r = mgr.acquire("embed")
    mgr.run_pending()
    r = mgr.acquire("embed")
    assert r.status == ACQ_FAILED and "too big" in r.detail


def test_going_over_budget_after_a_budget_change_evicts_lru_idle_models():
    mgr, loader, clock, sink = make(cooldown_s=0, total=2000 * MB)
    for m in ("generate", "embed", "rerank"):
        use(mgr, m); clock.advance(1)
    assert len(resident(mgr)) == 3
    mgr.configure(budget=MemoryBudget(1000 * MB, 0.2))   # watermark 800 MB: one of three must go
    mgr.run_pending()
    assert resident(mgr) == {"embed", "rerank"}


# ---------------------------------------------------------------------------------------------- cooldown
def _alternate(mgr, clock, steps, period=0.5):
    """Two clients: one wants embed, one rerank, each asking again as soon as served."""
    served = 0
    for i in range(steps):
        for model in ("embed", "rerank"):
            r = mgr.acquire(model)
            if r.status == ACQ_READY:
                mgr.release(r.lease.id)
                served += 1
        mgr.run_pending()
        clock.advance(period)
    return served


@pytest.mark.parametrize("cooldown", [0.0, 10.0])
def test_cooldown_bounds_swaps_under_alternating_demand(cooldown):
    # room for one engine: every swap is an eviction plus a load
    mgr, loader, clock, sink = make(models=("embed", "rerank"), total=500 * MB, cooldown_s=cooldown,
                                    load_s=0.5)
    served = _alternate(mgr, clock, 120)                 # 60 s of fake time (plus load time)
    loads = len(loader.loads())
    if cooldown == 0:
        assert loads > 40                                # thrash: a swap per request
    else:
        assert loads <= 60 / cooldown + 2                # at most one swap per cooldown
        assert served > 5 * loads
        # every unload came at least cooldown_s after that model's load
        loaded_at = {}
        for t in mgr.transitions:
            if t["action"] == "load":
                loaded_at[t["model"]] = t["t"]
            elif t["action"] == "evict":
                assert t["t"] - loaded_at[t["model"]] >= cooldown - 1e-9


def test_cooldown_blocks_eviction_then_lets_it_through():
    mgr, loader, clock, _ = make(models=("embed", "rerank"), total=500 * MB, cooldown_s=10)
    use(mgr, "embed")
    clock.advance(3)
    assert mgr.acquire("rerank").status == ACQ_WAITING
    mgr.run_pending()
    assert "cooldown" in mgr.status()["models"]["rerank"]["blocked"]
    clock.advance(7)
    use(mgr, "rerank")
    assert resident(mgr) == {"rerank"}


def test_oscillation_raises_an_alert_once_per_window():
    mgr, loader, clock, sink = make(models=("embed", "rerank"), total=500 * MB, cooldown_s=0,
                                    oscillation_loads=3, oscillation_window_s=60, load_s=0.5)
    t0 = clock.t
    _alternate(mgr, clock, 12)
    assert clock.t - t0 < 60                                           # all within one window
    alerts = sink.alerts("model_oscillation")
    assert sorted(a[2]["model"] for a in alerts) == ["embed", "rerank"]  # once per model per window
    assert all(a[2]["loads"] == 3 for a in alerts)


def test_a_slow_load_raises_an_alert():
    mgr, loader, clock, sink = make(load_s={"generate": 31.0})
    use(mgr, "embed")
    assert not sink.alerts("model_load_slow")
    use(mgr, "generate")
    (alert,) = sink.alerts("model_load_slow")
    assert alert[2]["model"] == "generate" and alert[2]["seconds"] == pytest.approx(31.0)


# -------------------------------------------------------------------------------------------- sequential
def test_a_prewarm_asked_while_the_model_is_being_unloaded_loads_it_after():
    # seen in the rag_leases integration test: an operator's prewarm of generate arrived while the sequential
    # mode's eviction of generate was running; it was dropped and the operator waited for a load that never came
    mgr, loader, clock, _ = make(cooldown_s=0)
    use(mgr, "generate")
    states = []
    unload = loader.unload

    def unload_with_a_prewarm_arriving(model):
        states.append(mgr.prewarm(model))                # the operator's call, during the unload
        unload(model)
    loader.unload = unload_with_a_prewarm_arriving
    mgr.unload("generate")
    mgr.run_pending()
    assert states == ["unloading"]
    mgr.run_pending()
    assert loader.loads() == ["generate", "generate"] and resident(mgr) == {"generate"}
    assert mgr.status()["transitions"][-1]["detail"] == "prewarm"


def test_sequential_mode_prewarms_the_next_phase_and_retires_the_rest():
    # room for two engines
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=0)
    lease = use(mgr, "embed", release=False)             # loads embed, then pre-warms rerank
    mgr.run_pending()
    assert loader.loads() == ["embed", "rerank"]
    mgr.release(lease.id)
    clock.advance(1)
    assert ("rerank", -1) in loader.warmups               # pre-warmed = loaded and warmed up
    r = mgr.acquire("rerank")
    assert r.status == ACQ_READY                          # pre-warmed: no wait
    mgr.run_pending()                                     # pre-warm generate, retiring embed
    assert loader.loads() == ["embed", "rerank", "generate"]
    assert ("unload", "embed") in loader.calls and resident(mgr) == {"rerank", "generate"}
    mgr.release(r.lease.id)
    assert mgr.acquire("generate").status == ACQ_READY
    mgr.run_pending()                                     # cyclic: embed comes back for the next query
    assert resident(mgr) == {"generate", "embed"}


def test_using_a_phase_wakes_the_worker_to_prewarm_the_next_at_once():
    """The worker sleeps tick_s between rounds: acquiring a resident phase must wake it, or the next phase's
    pre-warm starts up to a tick late (here a minute; 0.5 s by default, as long as a short phase)."""
    started = threading.Event()

    class EventLoader:
        def load(self, model, versions):
            if model == "rerank":
                started.set()

        def unload(self, model):
            pass

        def warmup(self, model, version):
            pass

    mgr = ModelManager([ModelSpec(m, 300 * MB) for m in ("embed", "rerank", "generate")],
                       budget=MemoryBudget(1000 * MB, 0.2), loader=EventLoader(), mode=SEQUENTIAL, cooldown_s=0,
                       tick_s=60.0)
    mgr.adopt("embed")
    mgr.start()
    try:
        time.sleep(0.2)                                   # the worker's first round is over; it sleeps now
        assert not started.is_set()
        lease = mgr.acquire("embed").lease
        assert started.wait(5.0), "the pre-warm of rerank waited for the worker's next tick"
        mgr.release(lease.id)
    finally:
        mgr.stop()


class GateLoader:
    """Loads that block until released: shows which loads are in flight at the same time (real threads)."""

    def __init__(self, concurrent=True):
        self.concurrent_loads = concurrent
        self.lock = threading.Lock()
        self.in_flight, self.most_at_once, self.order = set(), 0, []
        self.gates = {}

    def gate(self, model):
        with self.lock:
            return self.gates.setdefault(model, threading.Event())

    def load(self, model, versions):
        with self.lock:
            self.in_flight.add(model)
            self.order.append(model)
            self.most_at_once = max(self.most_at_once, len(self.in_flight))
        try:
            assert self.gate(model).wait(10.0), f"{model}'s load was never released"
        finally:
            with self.lock:
                self.in_flight.discard(model)

    def unload(self, model):
        with self.lock:
            self.order.append(f"unload {model}")
        assert self.gate(f"unload {model}").wait(10.0), f"{model}'s unload was never released"

    def warmup(self, model, version):
        pass

    def wait_in_flight(self, models, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if set(models) <= self.in_flight:
                    return True
            time.sleep(0.01)
        return False


def _threaded(loader, total=1000 * MB, **kw):
    mgr = ModelManager([ModelSpec(m, 300 * MB) for m in ("embed", "rerank", "generate")],
                       budget=MemoryBudget(total, 0.2), loader=loader, mode=SEQUENTIAL, cooldown_s=0, **kw)
    mgr.set_mode(SEQUENTIAL, cyclic=False)
    return mgr.start()


def test_a_cold_batch_loads_its_first_phase_and_prewarms_the_next_in_parallel():
    loader = GateLoader()
    mgr = _threaded(loader, parallel_loads=2)
    try:
        assert mgr.acquire("embed").status != ACQ_READY
        assert loader.wait_in_flight({"embed", "rerank"}), f"in flight: {loader.in_flight}"
        assert mgr.status()["loads_running"] == 2
        loader.gate("rerank").set()                       # the pre-warm may finish first: nothing waits on it
        loader.gate("embed").set()
        deadline = time.monotonic() + 5
        while resident(mgr) != {"embed", "rerank"} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident(mgr) == {"embed", "rerank"} and mgr.status()["loads_running"] == 0
        assert mgr.acquire("embed").status == ACQ_READY
    finally:
        for m in ("embed", "rerank", "generate"):
            loader.gate(m).set()
        mgr.stop()


def test_prewarms_do_not_chain_while_a_request_waits_for_one():
    """embed resident and in use pre-warms rerank; a request for rerank arrives before that load is over. The
    pre-warm of generate (rerank's next phase) waits for rerank's load instead of slowing it down."""
    loader = GateLoader()
    mgr = ModelManager([ModelSpec(m, 300 * MB) for m in ("embed", "rerank", "generate")],
                       budget=MemoryBudget(1000 * MB, 0.2), loader=loader, mode=SEQUENTIAL, cooldown_s=0,
                       parallel_loads=2)
    mgr.set_mode(SEQUENTIAL, cyclic=False)
    mgr.adopt("embed")
    mgr.start()
    try:
        lease = mgr.acquire("embed").lease
        assert loader.wait_in_flight({"rerank"})
        assert mgr.status()["models"]["rerank"]["loading_for"] == "prewarm"
        mgr.release(lease.id)
        assert mgr.acquire("rerank").status != ACQ_READY  # the request now waits for the pre-warm
        loader.gate("unload embed").set()                 # embed is retired meanwhile (sequential mode)
        time.sleep(0.3)
        assert [x for x in loader.order if not x.startswith("unload")] == ["rerank"]
        assert loader.most_at_once == 1
        loader.gate("rerank").set()
        assert loader.wait_in_flight({"generate"})        # then generate's pre-warm goes
        loader.gate("generate").set()
        assert loader.most_at_once == 1
    finally:
        for g in ("embed", "rerank", "generate", "unload embed", "unload rerank", "unload generate"):
            loader.gate(g).set()
        mgr.stop()


@pytest.mark.parametrize("setting", ["one_at_a_time", "budget_for_one"])
def test_loads_stay_serial_with_one_load_slot_or_room_for_one_engine(setting):
    loader = GateLoader()
    mgr = _threaded(loader, parallel_loads=1) if setting == "one_at_a_time" else \
        _threaded(loader, parallel_loads=2, total=400 * MB)
    try:
        mgr.acquire("embed")
        assert loader.wait_in_flight({"embed"})
        time.sleep(0.3)
        assert loader.order == ["embed"] and loader.most_at_once == 1
        loader.gate("embed").set()
        if setting == "one_at_a_time":
            assert loader.wait_in_flight({"rerank"})      # the pre-warm follows the load, as before
            loader.gate("rerank").set()
        else:
            time.sleep(0.3)                               # embed is demanded and fills the budget: no pre-warm
            assert loader.order == ["embed"]
        assert loader.most_at_once == 1
    finally:
        for m in ("embed", "rerank", "generate"):
            loader.gate(m).set()
        mgr.stop()


def test_memory_still_being_unloaded_is_not_evicted_for_twice():
    """A load evicts the LRU idle model and runs on its own thread; while that unload is in flight the worker
    goes on planning, and must not see the budget over its watermark and evict a second model."""
    loader = GateLoader()
    mgr = ModelManager([ModelSpec(m, 300 * MB) for m in ("embed", "rerank", "generate")],
                       budget=MemoryBudget(800 * MB, 0.2), loader=loader, cooldown_s=0, parallel_loads=2)
    for m in ("embed", "rerank"):                         # room for two: embed is the LRU one
        mgr.adopt(m)
    mgr.start()
    try:
        mgr.acquire("generate")
        deadline = time.monotonic() + 5
        while "unload embed" not in loader.order and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)                                   # rounds of the worker while embed is unloading
        assert loader.order == ["unload embed"]
        loader.gate("unload embed").set()
        assert loader.wait_in_flight({"generate"})
        loader.gate("generate").set()
        deadline = time.monotonic() + 5
        while resident(mgr) != {"rerank", "generate"} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident(mgr) == {"rerank", "generate"}
        assert [x for x in loader.order if x.startswith("unload")] == ["unload embed"]
    finally:
        for g in ("embed", "rerank", "generate", "unload embed", "unload rerank", "unload generate"):
            loader.gate(g).set()
        mgr.stop()


def test_parallel_loads_need_a_loader_that_takes_concurrent_loads():
    with pytest.raises(LifecycleError, match="parallel_loads"):
        ModelManager([ModelSpec("embed", MB)], budget=MemoryBudget(1000 * MB, 0.2),
                     loader=GateLoader(concurrent=False), parallel_loads=2)
    mgr = ModelManager([ModelSpec("embed", MB)], budget=MemoryBudget(1000 * MB, 0.2), loader=GateLoader())
    with pytest.raises(LifecycleError, match="1 or more"):
        mgr.configure(parallel_loads=0)
    mgr.configure(parallel_loads=3)
    assert mgr.status()["parallel_loads"] == 3


def test_a_batch_pipeline_does_not_prewarm_past_its_last_phase():
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=0)
    mgr.set_mode(SEQUENTIAL, cyclic=False)
    for model in ("embed", "rerank", "generate"):
        use(mgr, model)
        mgr.run_pending()
    assert loader.loads() == ["embed", "rerank", "generate"] and resident(mgr) == {"generate"}


def test_sequential_prewarm_waits_for_cooldown_and_never_evicts_the_phase_in_use():
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=5, total=400 * MB)   # room for one
    lease = use(mgr, "embed", release=False)
    mgr.run_pending()
    assert loader.loads() == ["embed"]                    # rerank cannot come: embed is in use
    mgr.release(lease.id)
    mgr.run_pending()
    assert loader.loads() == ["embed"]                    # embed idle but in its cooldown
    clock.advance(5)
    mgr.run_pending()
    assert loader.loads() == ["embed"]                    # no spare memory: the pre-warm does not retire embed
    assert mgr.acquire("rerank").status == ACQ_WAITING    # until a request waits for the switch
    mgr.run_pending()
    assert loader.loads() == ["embed", "rerank"]


def test_sequential_demands_are_served_in_phase_order_not_arrival_order():
    """One engine fits. While rerank serves, a straggler asks for embed before the others ask for generate: the
    phases keep their order (rerank -> generate -> embed) and the straggler waits for the next cycle."""
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=0, total=400 * MB)
    lease = use(mgr, "rerank", release=False)
    assert mgr.acquire("embed").status == ACQ_WAITING     # the straggler, first
    clock.advance(1)
    assert mgr.acquire("generate").status == ACQ_WAITING
    mgr.release(lease.id)
    mgr.run_pending()
    assert loader.loads() == ["rerank", "generate"]       # arrival order would have loaded embed
    lease = use(mgr, "generate", release=False)
    mgr.release(lease.id)
    mgr.run_pending()
    assert loader.loads() == ["rerank", "generate", "embed"]
    mgr.set_mode(CO_RESIDENT)                             # co-resident: arrival order
    assert mgr._phase_rank(mgr._models["rerank"]) == 0


def test_sequential_a_phase_idle_for_a_moment_is_not_retired_by_the_next_ones_prewarm():
    """One engine fits. generate's last lease is back, but a request still on its way (CPU work between rerank
    and generate) will ask for it: the cyclic pre-warm of embed must not retire it while nobody waits for embed
    (seen through rag: embed loaded, then generate again, then embed: phases out of order, twice the loads)."""
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=0, total=400 * MB)
    use(mgr, "generate")                                  # pre-warms embed (cyclic)
    mgr.run_pending()
    assert loader.loads() == ["generate"]
    straggler = mgr.acquire("generate")
    assert straggler.status == ACQ_READY                  # the straggler: still resident
    assert mgr.acquire("embed").status == ACQ_WAITING     # a request waits for embed: now the switch is due
    mgr.release(straggler.lease.id)
    mgr.run_pending()
    assert loader.loads() == ["generate", "embed"]


def test_sequential_the_next_phase_prewarmed_goes_before_a_later_phase_demanded():
    """One engine fits. Every rerank lease is back and the requests are between rerank and generate (CPU work, no
    demand yet) when a straggler asks for embed: generate, pre-warmed by rerank's use, loads first."""
    mgr, loader, clock, _ = make(mode=SEQUENTIAL, cooldown_s=0, total=400 * MB)
    use(mgr, "rerank")
    assert mgr.acquire("embed").status == ACQ_WAITING
    mgr.run_once()                                        # one transition: evict rerank, load generate
    assert loader.loads() == ["rerank", "generate"]
    lease = use(mgr, "generate", release=False)          # the requests come for it
    mgr.run_pending()
    assert loader.loads() == ["rerank", "generate"]       # embed waits for its turn
    mgr.release(lease.id)
    mgr.run_pending()
    assert loader.loads() == ["rerank", "generate", "embed"]


@pytest.mark.parametrize("start,end", [(UNLOADED, "unloading"), ("loading", UNLOADED), (DEAD, READY),
                                       ("unloading", READY), (UNLOADED, DEAD)])
def test_the_state_machine_refuses_a_transition_it_does_not_have(start, end):
    from ragstack.lifecycle.state import IllegalTransition, ModelState

    m = ModelState(spec=ModelSpec("embed", 1), state=start)
    with pytest.raises(IllegalTransition):
        m.move(end)
    assert m.state == start


def test_every_state_has_its_transitions_and_the_cycles_of_the_manager_are_legal():
    from ragstack.lifecycle.state import TRANSITIONS, ModelState

    assert set(TRANSITIONS) == {UNLOADED, "loading", READY, "unloading", DEAD, "failed"}
    m = ModelState(spec=ModelSpec("embed", 1))
    for state in ("loading", READY, DEAD, "loading", "failed", "loading", READY, "unloading", UNLOADED):
        m.move(state)
    assert m.state == UNLOADED


def test_mode_switch_validates():
    mgr, *_ = make()
    with pytest.raises(LifecycleError):
        mgr.set_mode("round_robin")
    with pytest.raises(LifecycleError):
        mgr.set_mode(SEQUENTIAL, ["embed", "nope"])
    mgr.set_mode(SEQUENTIAL, ["rerank", "generate"])
    assert mgr.status()["phases"] == ["rerank", "generate"]
    mgr.set_mode(CO_RESIDENT)


# ----------------------------------------------------------------------------------------- self-healing
def test_a_dead_stub_is_detected_and_reloaded_and_requests_wait_for_it():
    mgr, loader, clock, sink = make()
    use(mgr, "embed")
    loader.killed.add("embed")                            # kill -9: the slot disappears
    mgr.tick()
    assert mgr.status()["models"]["embed"]["state"] == DEAD
    assert sink.alerts("model_stub_died")
    assert mgr.acquire("embed").status != ACQ_READY       # waits; never handed a dead engine
    mgr.run_pending()
    assert loader.calls[-2:] == [("unload", "embed"), ("load", "embed", ())]
    use(mgr, "embed")
    assert mgr.status()["models"]["embed"]["heals"] == 1 and ("healed", "embed") in sink.events


def test_a_request_failing_on_a_dead_stub_triggers_an_immediate_check():
    mgr, loader, clock, _ = make(tick_s=60)
    use(mgr, "embed")
    mgr.tick()                                            # next health check due in 60 s
    loader.killed.add("embed")
    lease = use(mgr, "embed", release=False)
    mgr.release(lease.id, ok=False, error="Stub process 'embed_0_0' is not healthy.")
    assert mgr.acquire("embed").status != ACQ_READY       # a retry waits: no lease until the stubs are checked
    mgr.tick()                                            # due at once, not in 60 s
    assert mgr.status()["models"]["embed"]["state"] == DEAD


def test_a_suspect_that_is_alive_is_cleared():
    mgr, loader, clock, _ = make(tick_s=60)
    use(mgr, "embed")
    mgr.check_health("embed")
    assert mgr.acquire("embed").status != ACQ_READY
    mgr.tick()
    assert mgr.acquire("embed").status == ACQ_READY


def test_forgotten_leases_expire():
    mgr, loader, clock, _ = make(lease_ttl_s=30)
    use(mgr, "embed", release=False)
    assert mgr.status()["models"]["embed"]["refcount"] == 1
    clock.advance(31)
    mgr.tick()
    assert mgr.status()["models"]["embed"]["refcount"] == 0


def test_loads_and_unloads_behind_the_managers_back_are_followed():
    mgr, loader, clock, sink = make(reconcile_s=5)
    use(mgr, "embed")
    loader.loaded.pop("embed")                           # someone unloaded it over the repository API
    loader.loaded["rerank"] = (1,)                        # and loaded another
    clock.advance(5)
    mgr.tick()
    assert resident(mgr) == {"rerank"}
    assert mgr.status()["models"]["embed"]["state"] == UNLOADED and not sink.alerts("model_stub_died")
    use(mgr, "embed")


def test_unmanaged_models_are_passed_through():
    mgr, *_ = make()
    assert mgr.acquire("vector_index").status == ACQ_UNMANAGED


def test_a_failed_load_is_reported_and_retried_after_a_pause():
    mgr, loader, clock, sink = make(fail={"embed"}, retry_after_s=5)
    mgr.acquire("embed")
    mgr.run_pending()
    r = mgr.acquire("embed")
    assert r.status == ACQ_FAILED and "does not load" in r.detail and sink.alerts("model_load_failed")
    loader.fail.clear()
    clock.advance(5)
    use(mgr, "embed")


# ---------------------------------------------------------------------------------------------- canary
def test_router_share_is_exact_and_deterministic():
    r = CanaryRouter("embed", 1, 2, share=0.25, min_requests=10, promote_after=20)
    routed = [r.route() for _ in range(100)]
    assert routed.count(2) == 25 and routed[:4] == [1, 1, 1, 2]


@pytest.mark.parametrize("errors, requests, min_requests, action", [
    (1, 50, 50, cn.PROMOTE),          # exactly 2 %: not over the limit
    (2, 50, 50, cn.ROLLBACK),         # 4 %
    (2, 101, 50, cn.CONTINUE),        # 1.98 %, not yet promote_after
    (5, 49, 50, cn.CONTINUE),         # too few requests to judge, however bad
    (5, 50, 50, cn.ROLLBACK),
])
def test_canary_decision_at_the_2_percent_threshold(errors, requests, min_requests, action):
    promote_after = 50 if requests == 50 else 200
    r = CanaryRouter("embed", 1, 2, share=0.5, min_requests=min_requests, promote_after=promote_after)
    for i in range(requests):
        r.record(2, ok=i >= errors, latency_s=0.01)
    assert r.decide().action == action


def test_canary_latency_limit():
    r = CanaryRouter("embed", 1, 2, share=0.5, min_requests=10, promote_after=100, max_latency_ratio=2.0)
    for _ in range(10):
        r.record(1, True, 0.010)
        r.record(2, True, 0.030)
    d = r.decide()
    assert d.action == cn.ROLLBACK and "latency" in d.reason


def _serve(mgr, n, model="embed", bad_version=None):
    """n requests through leases; the bad version fails every request."""
    outcomes = []
    for _ in range(n):
        lease = use(mgr, model, release=False)
        ok = lease.version != bad_version
        mgr.release(lease.id, ok=ok, latency_s=0.01, error=None if ok else "engine raised")
        outcomes.append((lease.version, ok))
        mgr.run_pending()
    return outcomes


def test_a_broken_canary_is_rolled_back_with_the_root_cause(tmp_path):
    history = VersionHistory(tmp_path / "versions.json")
    mgr, loader, clock, sink = make(history=history, cooldown_s=0, total=2000 * MB)
    use(mgr, "embed")
    mgr.canary_start("embed", 2, share=0.5, min_requests=10, promote_after=40)
    mgr.run_pending()
    assert loader.calls[-1] == ("load", "embed", (1, 2)) and ("embed", 2) in loader.warmups
    outcomes = _serve(mgr, 30, bad_version=2)
    canary_requests = [o for o in outcomes if o[0] == 2]
    assert 10 <= len(canary_requests) <= 11               # judged as soon as min_requests was reached
    assert loader.calls[-1] == ("load", "embed", (1,)) and loader.warmups[-1] == ("embed", 1)
    (rb,) = [e[1] for e in sink.events if e[0] == "rollback"]
    assert rb["from_version"] == 2 and rb["to_version"] == 1 and rb["trigger"] == "auto"
    assert "error rate 100.0%" in rb["root_cause"] and "engine raised" in rb["root_cause"] and rb["warmup_ok"]
    assert all(v == 1 for v, _ in outcomes[-5:])          # traffic is back on the stable version
    assert history.current("embed") == 1
    assert [e["action"] for e in history.log("embed")] == ["baseline", "canary_start", "canary_rollback"]
    assert json.loads((tmp_path / "versions.json").read_text())["models"]["embed"]["lineage"] == [1]


def test_a_good_canary_is_promoted_and_a_manual_rollback_restores_the_previous_version(tmp_path):
    history = VersionHistory(tmp_path / "versions.json")
    mgr, loader, clock, sink = make(history=history, cooldown_s=0, total=2000 * MB)
    mgr.canary_start("embed", 2, share=0.5, min_requests=5, promote_after=10,
                     engine_info={"engine_dir": "/engines/embed-v2", "engine_hash": "abc"})
    mgr.run_pending()
    _serve(mgr, 25)
    (promo,) = [e[1] for e in sink.events if e[0] == "promoted"]
    assert promo["from_version"] == 1 and promo["to_version"] == 2 and promo["engine_hash"] == "abc"
    assert loader.calls[-1] == ("load", "embed", (2,)) and history.current("embed") == 2
    assert mgr.canary_route("embed") == 2
    # a second process reading the same file sees the promotion
    assert VersionHistory(tmp_path / "versions.json").previous("embed") == 1
    mgr.rollback("embed", root_cause="p99 regression reported by the evaluation")
    mgr.run_pending()
    assert loader.calls[-1] == ("load", "embed", (1,)) and loader.warmups[-1] == ("embed", 1)
    rb = [e[1] for e in sink.events if e[0] == "rollback"][-1]
    assert rb["root_cause"] == "p99 regression reported by the evaluation" and rb["trigger"] == "manual"
    assert history.current("embed") == 1 and mgr.canary_route("embed") == 1
    with pytest.raises(LifecycleError, match="no previous version"):
        mgr.rollback("embed", root_cause="again")


def test_a_rollout_waits_for_requests_on_the_version_it_removes():
    mgr, loader, clock, sink = make(cooldown_s=0, total=2000 * MB)
    mgr.canary_start("embed", 2, share=0.5, min_requests=2, promote_after=50)
    mgr.run_pending()
    held = None
    while mgr.status()["models"]["embed"]["rollout"] is None:   # keep one request on v2 open
        lease = use(mgr, "embed", release=False)
        if lease.version == 2 and held is None:
            held = lease
            continue
        mgr.release(lease.id, ok=lease.version != 2, error="boom")
    mgr.run_pending()
    assert mgr.status()["models"]["embed"]["rollout"] == "rollback"
    assert loader.calls[-1] == ("load", "embed", (1, 2))  # v2 still serving the held request
    mgr.release(held.id, ok=False, error="boom")
    mgr.run_pending()
    assert loader.calls[-1] == ("load", "embed", (1,))


def test_a_canary_that_does_not_load_is_rolled_back():
    mgr, loader, clock, sink = make(total=2000 * MB)
    use(mgr, "embed")
    loader.fail.add(("embed", 2))
    mgr.canary_start("embed", 2, share=0.1, min_requests=5, promote_after=10)
    mgr.run_pending()
    (rb,) = [e[1] for e in sink.events if e[0] == "rollback"]
    assert "failed to load" in rb["root_cause"] and rb["to_version"] == 1
    assert loader.calls[-1] == ("load", "embed", (1,)) and mgr.canary_route("embed") == 1


def test_one_rollout_at_a_time_and_rollback_needs_a_cause():
    mgr, *_ = make()
    mgr.canary_start("embed", 2)
    with pytest.raises(LifecycleError, match="in progress"):
        mgr.canary_start("embed", 3)
    with pytest.raises(LifecycleError, match="root cause"):
        mgr.rollback("embed", "")


def test_history_survives_a_restart_and_sets_the_version_loaded(tmp_path):
    h = VersionHistory(tmp_path / "v.json")
    h.ensure_current("embed", 1)
    h.promoted("embed", 1, 3, "ok", {})
    mgr, loader, *_ = make(history=VersionHistory(tmp_path / "v.json"))
    use(mgr, "embed")
    assert loader.calls[-1] == ("load", "embed", (3,))


# --------------------------------------------------------------------------------------- service & probe
def test_service_ops_round_trip():
    mgr, loader, clock, _ = make(cooldown_s=0)
    svc = ManagerService(mgr)
    r = svc.handle("acquire", "embed", {})
    assert r["status"] == ACQ_WAITING
    mgr.run_pending()
    r = svc.handle("acquire", "embed", {})
    assert r["status"] == ACQ_READY and r["version"] == -1
    assert svc.handle("release", "embed", {"lease": r["lease"], "ok": True, "latency_ms": 3})["released"]
    assert svc.handle("status", None, {})["models"]["embed"]["state"] == READY
    svc.handle("set_mode", None, {"mode": "sequential"})
    assert mgr.mode == SEQUENTIAL
    out = svc.handle("configure", None, {"budget_bytes": 2000 * MB, "safety_buffer": 0.1, "cooldown_s": 3,
                                         "parallel_loads": 2})
    assert mgr.budget.total_bytes == 2000 * MB and mgr.cooldown_s == 3.0 and mgr.parallel_loads == 2
    assert out["parallel_loads"] == 2 and out["cooldown_s"] == 3.0
    svc.handle("unload", "embed", {})
    mgr.run_pending()
    assert mgr.status()["models"]["embed"]["state"] == UNLOADED
    from ragstack.contracts.errors import InvalidInput
    with pytest.raises(InvalidInput):
        svc.handle("explode", None, {})
    with pytest.raises(InvalidInput):
        svc.handle("acquire", None, {})


def test_stub_command_lines_are_parsed():
    args = ["/x/backends/python/triton_python_backend_stub", "/repo/embed/2/model.py",
            "triton_python_backend_shm_region_1", "1048576", "1048576", "31767", "/x/backends/python", "336",
            "embed_0_1", "DEFAULT"]
    assert parse_stub_cmdline(args) == ("embed", 2, "embed_0_1")
    assert parse_stub_cmdline(["/usr/bin/python3", "x.py"]) is None


# ----------------------------------------------------------------------------------- Triton-side pieces
class FakeMetric:
    def __init__(self, family, labels, buckets):
        self.family, self.labels, self.buckets, self.value, self.observed = family, labels, buckets, 0.0, []

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


class FakePb:
    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        created = []

        def __init__(self, name, description, kind):
            self.name, self.kind = name, kind
            FakePb.MetricFamily.created.append(self)

        def Metric(self, labels=None, buckets=None):
            return FakeMetric(self, labels, buckets)


def test_triton_sink_exports_the_catalogued_metrics_and_logs_events(tmp_path):
    from ragstack.governance.events import EventLog, read_events
    from ragstack.lifecycle.triton_io import TritonSink

    events = EventLog(tmp_path / "events.jsonl")
    sink = TritonSink(FakePb, events)
    sink.loaded("generate", 31.5, 500 * MB, "demand")
    sink.usage(800 * MB, MemoryBudget(1000 * MB, 0.2), {"generate": 500 * MB, "embed": 300 * MB})
    sink.alert("model_load_slow", model="generate", seconds=31.5)
    sink.rollback_completed(model="embed", from_version=2, to_version=1, root_cause="error rate 100%")
    events.close()
    m = {(k[0], k[1]): v for k, v in sink._metrics.items()}
    assert m[("llm_model_load_seconds", (("model", "generate"),))].value == 31.5
    assert m[("llm_memory_used_bytes", (("component", "engines"),))].value == 800 * MB
    assert m[("llm_memory_budget_bytes", (("component", "engines"),))].value == 1000 * MB
    assert m[("llm_memory_headroom_bytes", (("component", "engines"),))].value == 0
    # the alert rules read these names, kinds and labels (monitoring/metrics.json)
    catalogue = {x["name"]: x for x in json.loads((ROOT / "monitoring" / "metrics.json").read_text())["metrics"]}
    from ragstack.lifecycle.triton_io import FAMILIES
    for name in ("llm_model_load_seconds", "llm_memory_used_bytes", "llm_memory_budget_bytes", "llm_lifecycle_alerts_total"):
        kind, _, labels = FAMILIES[name]
        assert catalogue[name]["kind"] == kind.lower() and catalogue[name]["labels"] == list(labels)
    logged = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in logged] == ["llm_observability_alert", "llm_rollback_completed"]
    assert logged[1]["fields"]["root_cause"] == "error rate 100%"


def test_version_config_override_and_footprint_seed(tmp_path, monkeypatch):
    from ragstack.lifecycle.triton_io import config_json, engine_dir_of, seed_bytes

    repo = tmp_path / "repo"
    (repo / "embed").mkdir(parents=True)
    (repo / "embed" / "config.pbtxt").write_text(
        (ROOT / "model_repository" / "reference" / "embed" / "config.pbtxt").read_text())
    cfg = json.loads(config_json("embed", (1, 3), [repo]))
    # protobuf's JSON writes int64 as strings; Triton's parser reads them back (the canary tests load this)
    assert cfg["name"] == "embed" and [int(v) for v in cfg["version_policy"]["specific"]["versions"]] == [1, 3]
    assert [i["name"] for i in cfg["input"]] == ["input_ids", "attention_mask"]
    engines = tmp_path / "engines"
    (engines / "embed").mkdir(parents=True)
    (engines / "embed" / "model.safetensors").write_bytes(b"\0" * 4096)
    (engines / "embed" / "tokenizer.json").write_text("{}")
    monkeypatch.delenv("ENGINE_PATH", raising=False)
    assert engine_dir_of("embed", [repo]) is None            # relative, and no ENGINE_PATH to put it under
    monkeypatch.setenv("ENGINE_PATH", str(engines))
    engine_dir = engine_dir_of("embed", [repo])
    assert engine_dir == engines / "embed"
    assert seed_bytes(engine_dir, 100 * MB, 1.5) == 100 * MB + 6144


def test_warmup_requests_match_the_engine_contracts():
    from ragstack.lifecycle.triton_io import WARMUPS

    assert set(WARMUPS) == {"embed", "rerank", "generate"}


def _lease_module(monkeypatch, answers, ready=True):
    from ragstack.lifecycle import bls_client

    calls = []

    def call(op, model, payload):
        calls.append((op, model, payload))
        return answers[op].pop(0) if isinstance(answers[op], list) else answers[op]

    class Pb:
        @staticmethod
        def is_model_ready(model_name):
            return ready

    bls_client._available.clear()
    monkeypatch.setattr(bls_client, "manager_call", lambda pb: call)
    return bls_client, Pb, calls


def test_engine_lease_is_a_no_op_without_the_manager(monkeypatch):
    bls_client, pb, calls = _lease_module(monkeypatch, {}, ready=False)
    with bls_client.engine_lease(pb, "embed") as lease:
        assert not lease.managed and lease.request_kwargs() == {}
    assert calls == []


def test_engine_lease_waits_routes_and_reports(monkeypatch):
    answers = {"acquire": [{"status": "loading"}, {"status": "ready", "lease": "embed-7", "version": 2}],
               "release": {"released": True}}
    bls_client, pb, calls = _lease_module(monkeypatch, answers)
    with pytest.raises(RuntimeError):
        with bls_client.engine_lease(pb, "embed") as lease:
            assert lease.managed and lease.request_kwargs() == {"model_version": 2}
            raise RuntimeError("engine said no")
    release = calls[-1]
    assert release[0] == "release" and release[2]["lease"] == "embed-7" and release[2]["ok"] is False
    assert "engine said no" in release[2]["error"]


def test_a_request_hit_by_a_dead_stub_is_retried_once(monkeypatch):
    answers = {"acquire": [{"status": "ready", "lease": "a", "version": -1}, {"status": "loading"},
                           {"status": "ready", "lease": "b", "version": -1}],
               "release": {"released": True}}
    bls_client, pb, calls = _lease_module(monkeypatch, answers)
    attempts = []

    def engine(lease):
        attempts.append(lease.lease_id)
        if len(attempts) == 1:
            raise RuntimeError("Stub process 'embed_0_0' is not healthy.")
        return "ok"

    assert bls_client.call_with_lease(pb, "embed", engine) == "ok"
    assert attempts == ["a", "b"]
    with pytest.raises(RuntimeError, match="boom"):   # other errors are not retried
        answers["acquire"] = [{"status": "ready", "lease": "c", "version": -1}]
        bls_client.call_with_lease(pb, "embed", lambda lease: (_ for _ in ()).throw(RuntimeError("boom")))


def test_a_device_measured_footprint_is_not_overwritten_by_process_memory():
    mgr, loader, clock, _ = make()
    loader.load = lambda model, versions: (loader.loaded.__setitem__(model, (1,)), 123 * MB)[1]  # NVML delta
    use(mgr, "generate")
    mgr.tick()
    m = mgr.status()["models"]["generate"]
    assert m["footprint_bytes"] == 123 * MB and m["footprint_source"] == "device"


def test_configure_budget_auto_is_the_auto_budget():
    """``tools/lifecycle.py configure --budget auto`` sends 'auto': the service resolves it like the server does."""
    from ragstack.lifecycle.service import check_payload
    from ragstack.lifecycle.triton_io import auto_budget_bytes

    assert check_payload("configure", {"budget_bytes": "auto"})["budget_bytes"] == auto_budget_bytes()
    assert check_payload("configure", {"budget_bytes": " AUTO "})["budget_bytes"] == auto_budget_bytes()


def test_engine_unavailable_is_unavailable_and_names_the_engine():
    from ragstack.contracts.errors import Unavailable
    from ragstack.lifecycle.leasing import EngineUnavailable, acquire_lease

    t = [0.0]

    def clock():
        t[0] += 1.0
        return t[0]
    with pytest.raises(Unavailable, match="engine 'embed' not available"):
        acquire_lease(lambda op, m, p: {"status": "loading", "detail": "loading"}, "embed", timeout_s=3,
                      sleep=lambda s: None, clock=clock)
    assert issubclass(EngineUnavailable, Unavailable)


def test_a_phase_holds_one_lease_for_all_its_calls(monkeypatch):
    """bls.phase: the embed calls of an ingest (256 texts each) reuse the phase's lease; outside it, each call
    takes its own."""
    from ragstack.triton import bls

    answers = {"acquire": {"status": "ready", "lease": "embed-1", "version": 3}, "release": {"released": True}}
    _, pb, calls = _lease_module(monkeypatch, answers)
    seen = []
    with bls.phase(pb, "embed") as lease:
        assert lease.managed and lease.version == 3
        for _ in range(3):
            bls.leased(pb, "embed", seen.append)
        with bls.phase(pb, "embed"):                     # nested: the same lease
            bls.leased(pb, "embed", seen.append)
    assert seen == [3, 3, 3, 3]
    assert [c[0] for c in calls] == ["acquire", "release"]
    bls.leased(pb, "embed", seen.append)                  # outside the phase: a lease of its own
    assert [c[0] for c in calls] == ["acquire", "release", "acquire", "release"]
