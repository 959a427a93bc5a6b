"""The soak harness's bookkeeping (ragstack_dev/soak.py) without a server: outcome classes, stub deaths, RSS growth."""
import socket

from tritonclient.utils import InferenceServerException

from ragstack_dev import soak
from ragstack_dev.soak import SoakConfig, Sampler, classify_exception, classify_http


def test_http_statuses_map_to_classes():
    assert classify_http(200, "{}", "ok") == "ok"
    assert classify_http(400, '{"error": "unknown task"}', "client_error") == "client_error"
    assert classify_http(500, '{"error": "Traceback ..."}', "ok") == "server_error"
    assert classify_http(503, "", "ok") == "server_error"
    # a dead stub is a server error whatever status carries it
    assert classify_http(400, "Stub process 'rag_orchestrator_0_1' is not healthy.", "ok") == "server_error"
    # Triton's own 500 on a malformed body: its own class, or a server error when strict
    assert classify_http(500, "failed to parse the request JSON buffer", "client_error", frontend=True) == "frontend_500"
    assert classify_http(500, "failed to parse the request JSON buffer", "client_error") == "server_error"


def test_grpc_codes_map_to_classes():
    def exc(code, msg="x"):
        return InferenceServerException(msg, status=f"StatusCode.{code}")
    assert classify_exception(exc("INVALID_ARGUMENT"), "client_error") == "client_error"
    assert classify_exception(exc("INTERNAL"), "ok") == "server_error"
    assert classify_exception(exc("UNAVAILABLE", "model is reloading"), "ok") == "server_error"
    assert classify_exception(exc("UNAVAILABLE", "failed to connect to all addresses"), "ok") == "transport"
    assert classify_exception(exc("DEADLINE_EXCEEDED"), "cancelled") == "cancelled"
    assert classify_exception(exc("DEADLINE_EXCEEDED"), "ok") == "hung"        # the full client timeout ran out
    assert classify_exception(exc("INVALID_ARGUMENT", "Stub process 'x_0_0' is not healthy"), "ok") == "server_error"
    # a model being reloaded (a heal) is not the client's fault
    assert classify_exception(exc("NOT_FOUND", "Request for unknown model: 'rag' has no available versions"),
                              "ok") == "server_error"
    # stream errors carry a message only
    assert classify_exception(InferenceServerException("invalid input: query is empty"), "ok") == "client_error"
    assert classify_exception(InferenceServerException("Traceback (most recent call last)"), "ok") == "server_error"
    assert classify_exception(socket.timeout("timed out"), "ok") == "hung"
    assert classify_exception(ConnectionRefusedError(), "ok") == "transport"


def _sampler(monkeypatch, tables, log_lines, heals):
    """A Sampler over scripted process tables, server-log lines and heal counters, one entry per sample."""
    cfg = SoakConfig(http_url="h:1", grpc_url="h:2", identity={}, server_pid=1, sample_s=5.0)
    sampler = Sampler(cfg, t0=0.0)
    step = {"i": 0}
    clock = {"t": 0.0}
    monkeypatch.setattr(soak.time, "time", lambda: clock["t"])
    monkeypatch.setattr(soak, "pid_alive", lambda pid: True)
    monkeypatch.setattr(soak, "process_table", lambda pid: tables[min(step["i"], len(tables) - 1)])
    monkeypatch.setattr(soak, "scrape_heals", lambda url: heals[min(step["i"], len(heals) - 1)])

    def read_log(t):
        for line in log_lines[min(step["i"], len(log_lines) - 1)]:
            m = soak.UNLOAD_LOG_RE.search(line)
            if m:
                sampler._unloaded[m.group(1)] = t
    monkeypatch.setattr(sampler, "_read_log", read_log)
    for i in range(len(tables)):
        step["i"], clock["t"] = i, 5.0 * i
        sampler.sample()
    sampler.sample(final=True)
    return sampler


SERVER = {1: ("tritonserver", "tritonserver", 100)}
ORCH = {10: ("rag_orchestrator", "rag_orchestrator_0_0", 500), 11: ("rag_orchestrator", "rag_orchestrator_0_1", 500)}


def test_a_vanished_stub_is_a_death_and_an_unload_is_not(monkeypatch):
    without_11 = {**SERVER, 10: ORCH[10]}
    s = _sampler(monkeypatch, [{**SERVER, **ORCH}, {**SERVER, **ORCH}, without_11, without_11, without_11, without_11],
                 [[]], [{}])
    assert [(d["pid"], d["instance"]) for d in s.deaths()] == [(11, "rag_orchestrator_0_1")]
    assert s.deaths()[0]["t"] == 10.0

    unloaded = _sampler(monkeypatch, [{**SERVER, **ORCH}, SERVER, SERVER],
                        [[], ["successfully unloaded 'rag_orchestrator' version 1"], []], [{}])
    assert unloaded.deaths() == [] and len(unloaded.stub_exits_planned) == 2


def test_an_unload_followed_by_a_heal_does_not_hide_the_death(monkeypatch):
    reloaded = {**SERVER, 10: ORCH[10], 12: ("rag_orchestrator", "rag_orchestrator_0_1", 400)}
    s = _sampler(monkeypatch, [{**SERVER, **ORCH}, {**SERVER, 10: ORCH[10]}, reloaded, reloaded],
                 [[], ["successfully unloaded 'rag_orchestrator' version 1"], []],
                 [{}, {}, {"rag_orchestrator": 1.0}, {"rag_orchestrator": 1.0}])
    assert [d["pid"] for d in s.deaths()] == [11]
    assert [d["pid"] for d in s.stub_starts] == [12]


def test_rss_growth_is_measured_from_the_warmup_sample(monkeypatch):
    tables = [{**SERVER, 10: ("embed", "embed_0_0", 1000 + 10 * i)} for i in range(11)]
    s = _sampler(monkeypatch, tables, [[]], [{}])
    g = s.rss_growth(0.2)
    assert g["warmup_t_s"] == 10.0                    # 20 % of 50 s
    assert abs(g["growth"] - (1200 - 1120) / 1120) < 1e-3
    assert g["per_group"]["embed"]["growth"] > 0
