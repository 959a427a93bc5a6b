"""ragstack.governance.events: JSON-lines event log (threads and processes) and the readiness webhook (real receiver)."""
import http.server
import json
import logging
import multiprocessing
import socket
import threading
import time

import pytest

from ragstack.governance.events import (COST_BUDGET_EXCEEDED, EVENTS, OBSERVABILITY_ALERT, ROLLBACK_COMPLETED,
                             TOKEN_BUDGET_OVERRUN, EventLog, read_events)
from ragstack.governance.policy import EventSettings


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; ``delay`` makes it slow."""

    def __init__(self, delay: float = 0.0, status: int = 200):
        self.bodies, self.content_types = [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                outer.bodies.append(json.loads(body))
                outer.content_types.append(self.headers["Content-Type"])
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_event_names():
    assert set(EVENTS) == {"llm_observability_alert", "token_budget_overrun", "cost_budget_exceeded",
                           "llm_rollback_completed"}


def test_emit_writes_one_json_line_per_event(tmp_path):
    path = tmp_path / "logs" / "events.jsonl"           # parent folder created on demand
    log = EventLog(path, clock=lambda: 1700000000.25)
    rec = log.emit(TOKEN_BUDGET_OVERRUN, prompt_tokens=5000, limit=4096, task="answer", where=tmp_path)
    log.emit(ROLLBACK_COMPLETED, root_cause="error rate 2.4% > 2%", engine_hash="abc")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == rec == {
        "ts": "2023-11-14T22:13:20.250000Z", "event": "token_budget_overrun",
        "fields": {"prompt_tokens": 5000, "limit": 4096, "task": "answer", "where": str(tmp_path)}}
    assert [e["event"] for e in read_events(path)] == [TOKEN_BUDGET_OVERRUN, ROLLBACK_COMPLETED]
    # appends to an existing log rather than truncating it
    log2 = EventLog(path)
    log2.emit(OBSERVABILITY_ALERT, metric="queue_delay_us", value=3100)
    log2.close()
    assert len(read_events(path)) == 3


def test_unknown_event_is_a_programming_error(tmp_path):
    log = EventLog(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="unknown event 'budget_overrun'"):
        log.emit("budget_overrun")
    log.close()


def test_threads_never_interleave_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    log = EventLog(path)
    big = "x" * 20000        # larger than any stdio buffer: one write(2) per line still

    def worker(n):
        for i in range(100):
            log.emit(OBSERVABILITY_ALERT, thread=n, i=i, payload=big)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    events = read_events(path)            # every line parses
    assert len(events) == 800 and log.stats["written"] == 800
    assert sorted((e["fields"]["thread"], e["fields"]["i"]) for e in events) == \
        [(n, i) for n in range(8) for i in range(100)]


def _append_from_process(path, n):
    log = EventLog(path)
    for i in range(200):
        log.emit(COST_BUDGET_EXCEEDED, process=n, i=i, payload="y" * 5000)
    log.close()


def test_processes_sharing_the_log_never_interleave_lines(tmp_path):
    # Triton runs each model instance in its own stub process, all appending to the same file.
    path = tmp_path / "e.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_from_process, args=(path, n)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    events = read_events(path)
    assert len(events) == 600
    assert {(e["fields"]["process"], e["fields"]["i"]) for e in events} == {(n, i) for n in range(3)
                                                                             for i in range(200)}


def test_webhook_receives_every_event(tmp_path, receiver):
    log = EventLog(tmp_path / "e.jsonl", webhook_url=receiver.url, webhook_timeout_s=2)
    sent = [log.emit(COST_BUDGET_EXCEEDED, cost_usd=0.12 + i / 100, limit_usd=0.10) for i in range(3)]
    assert log.wait_idle(5)
    log.close()
    assert receiver.bodies == sent == read_events(tmp_path / "e.jsonl")
    assert receiver.content_types == ["application/json"] * 3
    assert log.stats == {"written": 3, "posted": 3, "post_failed": 0, "dropped": 0}


def test_webhook_only_no_log_file(receiver):
    log = EventLog(None, webhook_url=receiver.url)
    log.emit(OBSERVABILITY_ALERT, metric="queue_delay_us", value=2600)
    assert log.wait_idle(5)
    log.close()
    assert receiver.bodies[0]["fields"] == {"metric": "queue_delay_us", "value": 2600}


def test_slow_webhook_never_blocks_and_timeouts_are_logged(tmp_path, caplog):
    slow = Receiver(delay=1.0)
    try:
        log = EventLog(tmp_path / "e.jsonl", webhook_url=slow.url, webhook_timeout_s=0.2)
        t0 = time.perf_counter()
        for _ in range(3):
            log.emit(OBSERVABILITY_ALERT, metric="queue_delay_us", value=9000)
        assert time.perf_counter() - t0 < 0.5       # three posts would take 3 s inline
        with caplog.at_level(logging.WARNING, logger="ragstack.governance.events"):
            assert log.wait_idle(5)
        log.close()
        assert log.stats["post_failed"] == 3 and log.stats["written"] == 3
        assert "event webhook" in caplog.text and "timed out" in caplog.text
    finally:
        slow.close()


def test_dead_or_failing_webhook_is_logged_not_raised(tmp_path, caplog):
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    failing = Receiver(status=500)
    try:
        with caplog.at_level(logging.WARNING, logger="ragstack.governance.events"):
            for url in (dead, failing.url):
                log = EventLog(tmp_path / "e.jsonl", webhook_url=url, webhook_timeout_s=1)
                log.emit(ROLLBACK_COMPLETED, root_cause="test")
                assert log.wait_idle(5)
                log.close()
                assert log.stats["post_failed"] == 1
        assert "HTTP Error 500" in caplog.text and "Connection refused" in caplog.text
    finally:
        failing.close()


def test_full_queue_drops_notifications_but_keeps_the_log(tmp_path):
    slow = Receiver(delay=0.3)
    try:
        log = EventLog(tmp_path / "e.jsonl", webhook_url=slow.url, max_pending=2)
        for i in range(10):
            log.emit(OBSERVABILITY_ALERT, i=i)
        assert log.stats["dropped"] >= 7 and log.stats["written"] == 10
        log.close(timeout=0)
    finally:
        slow.close()


def test_from_settings_and_environment_overrides(tmp_path, receiver):
    settings = EventSettings(log_path="logs/ev.jsonl", webhook_url=None, webhook_timeout_s=1.5)
    log = EventLog.from_settings(settings, base_dir=tmp_path, env={})
    assert log.path == tmp_path / "logs" / "ev.jsonl" and log.webhook_url is None
    assert log.webhook_timeout_s == 1.5
    log.close()
    env = {"RAGSTACK_EVENT_LOG": str(tmp_path / "other.jsonl"), "RAGSTACK_EVENT_WEBHOOK_URL": receiver.url}
    log = EventLog.from_settings(settings, base_dir=tmp_path, env=env)
    assert log.path == tmp_path / "other.jsonl" and log.webhook_url == receiver.url
    log.close()
    log = EventLog.from_settings(settings, base_dir=tmp_path, env={"RAGSTACK_EVENT_LOG": ""})
    assert log.path is None
    log.close()
