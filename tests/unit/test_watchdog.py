"""The stub watchdog: a Python model whose stub died is reloaded; one unloaded on purpose is left alone."""
import pytest

from ragstack.lifecycle.procmem import ModelUsage
from ragstack.lifecycle.watchdog import FAILED, WATCHING, StubWatchdog


class FakeServer:
    """Triton as the watchdog sees it: which models are ready, and the stub slots each one has."""

    def __init__(self, **slots):
        self.slots = {m: set(s) for m, s in slots.items()}
        self.ready = set(slots)
        self.calls = []
        self.fail_load = False
        self.next_slot = 100

    # probe
    def snapshot(self):
        return {m: ModelUsage(1, frozenset(s), ()) for m, s in self.slots.items() if s}

    # loader
    def is_ready(self, model):
        return model in self.ready

    def unload(self, model):
        self.calls.append(("unload", model))
        self.ready.discard(model)
        self.slots[model] = set()

    def load(self, model, versions):
        self.calls.append(("load", model))
        if self.fail_load:
            raise RuntimeError("initialize failed")
        self.ready.add(model)
        self.slots[model] = {self.next_slot}
        self.next_slot += 1

    def kill(self, model, slot):
        self.slots[model].discard(slot)


class Sink:
    def __init__(self):
        self.events = []

    def alert(self, alert, **fields):
        self.events.append((alert, fields["model"]))

    def healed(self, model, seconds):
        self.events.append(("healed", model))


@pytest.fixture
def server():
    return FakeServer(rag_orchestrator={1, 2}, vector_index={3})


def watchdog(server, sink=None, **kw):
    return StubWatchdog(["rag_orchestrator", "vector_index", "ingest"], probe=server, loader=server, sink=sink,
                        **kw)


def test_models_are_watched_once_seen_ready(server):
    wd = watchdog(server)
    wd.run_once()
    status = wd.status()
    assert status["rag_orchestrator"]["state"] == WATCHING and status["rag_orchestrator"]["slots"] == 2
    assert status["ingest"]["state"] == "unwatched"            # not loaded: nothing to watch
    assert server.calls == []


def test_a_dead_stub_is_reloaded(server):
    sink = Sink()
    wd = watchdog(server, sink)
    wd.run_once()
    server.kill("rag_orchestrator", 2)                           # kill -9 of one instance's stub
    wd.run_once()
    assert server.calls == [("unload", "rag_orchestrator"), ("load", "rag_orchestrator")]
    assert wd.status()["rag_orchestrator"]["heals"] == 1
    assert wd.status()["rag_orchestrator"]["state"] == WATCHING
    assert sink.events == [("model_stub_died", "rag_orchestrator"), ("healed", "rag_orchestrator")]
    wd.run_once()                                                # the new stub is the one watched now
    assert len(server.calls) == 2
    server.kill("rag_orchestrator", 100)
    wd.run_once()
    assert wd.status()["rag_orchestrator"]["heals"] == 2


def test_an_unload_on_purpose_is_not_a_death(server):
    wd = watchdog(server)
    wd.run_once()
    server.unload("vector_index")
    server.calls.clear()
    wd.run_once()
    assert server.calls == []
    assert wd.status()["vector_index"]["state"] == "unwatched"
    server.load("vector_index", ())                              # loaded again by the operator: watched again
    wd.run_once()
    assert wd.status()["vector_index"]["state"] == WATCHING


def test_a_failed_reload_is_reported_and_retried_later(server):
    sink = Sink()
    now = [0.0]
    wd = watchdog(server, sink, clock=lambda: now[0], retry_after_s=5)
    wd.run_once()
    server.fail_load = True
    server.kill("vector_index", 3)
    wd.run_once()
    assert wd.status()["vector_index"]["state"] == FAILED
    assert ("model_heal_failed", "vector_index") in sink.events


def test_forced_heal_runs_on_the_watchdog_thread_not_the_callers(server):
    wd = watchdog(server)
    wd.run_once()
    assert wd.check("vector_index", force=True) == WATCHING    # answered at once
    assert server.calls == []
    wd.run_once()                                                # the watchdog's next look does it
    assert server.calls == [("unload", "vector_index"), ("load", "vector_index")]
