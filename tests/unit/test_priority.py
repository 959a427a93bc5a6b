"""Priority levels: how a request's level is decided, and the queue settings every config carries."""
import json

import pytest

from ragstack.governance import priority as P
from ragstack.contracts.errors import InvalidInput
from ragstack.contracts.model_config import BLS, PROFILES, parse, render
from ragstack.governance.policy import PolicyError, RuntimePolicy
from ragstack_dev.server import ROOT


@pytest.mark.parametrize("value,level", [("urgent", 1), ("Background", 2), (" 2 ", 2), (1, 1), (None, None),
                                         ("", None)])
def test_parse_level(value, level):
    assert P.parse_level(value) == level


@pytest.mark.parametrize("value", ["high", "0", "3", 0, 3, True, -1])
def test_parse_level_rejects_other_values(value):
    with pytest.raises(InvalidInput, match="priority must be one of urgent, background"):
        P.parse_level(value)


def test_a_caller_may_lower_its_level_but_not_raise_it():
    assert P.resolve(P.URGENT, {}) == P.URGENT
    assert P.resolve(P.URGENT, {"x-priority": "background"}) == P.BACKGROUND
    assert P.resolve(P.URGENT, {}, requested="background") == P.BACKGROUND
    # background work asking to be urgent stays background
    assert P.resolve(P.BACKGROUND, {"x-priority": "urgent"}) == P.BACKGROUND


def test_ceiling_hook_caps_the_level_and_can_be_removed():
    P.set_ceiling_hook(lambda headers: P.BACKGROUND if headers.get("x-role") == "batch" else P.URGENT)
    try:
        assert P.resolve(P.URGENT, {"x-role": "batch"}) == P.BACKGROUND
        assert P.resolve(P.URGENT, {"x-role": "reader"}) == P.URGENT
        P.set_ceiling_hook(lambda headers: 7)
        with pytest.raises(RuntimeError, match="ceiling hook returned 7"):
            P.resolve(P.URGENT, {})
    finally:
        P.set_ceiling_hook(None)
    assert P.resolve(P.URGENT, {"x-role": "batch"}) == P.URGENT


def test_children_carry_the_level_as_a_parameter():
    params = P.with_level({"x-engine-hash": "abc"}, P.BACKGROUND)
    assert params == {"x-engine-hash": "abc", "x-priority": "background"}
    assert P.of_parameters(params) == P.BACKGROUND
    assert P.of_parameters({}) == P.URGENT
    assert P.of_parameters({}, default=P.BACKGROUND) == P.BACKGROUND


def test_queue_rejections_get_clear_messages():
    full = P.queue_error("embed", "[request id: <id_unknown>] Exceeds maximum queue size", P.BACKGROUND)
    assert full == ("model 'embed' has a full queue at the background level "
                    f"(max_queue_size {P.BACKGROUND_QUEUE.max_queue_size}): retry later")
    assert "waited too long in the queue of model 'ingest'" in P.queue_error("ingest", "Request timeout expired")
    assert P.queue_error("embed", "some other failure") is None


def test_priority_queues_are_validated():
    with pytest.raises(ValueError, match="default level 3"):
        P.PriorityQueues(default_level=3)
    with pytest.raises(ValueError, match="level 0"):
        P.PriorityQueues(policies=((0, P.URGENT_QUEUE),))


# ------------------------------------------------------------------------------------------- the policy file
def _policy(**extra):
    data = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    data.update(extra)
    return data


def test_policy_sets_the_level_per_task_and_for_ingest():
    policy = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json")
    assert {t.priority for t in policy.tasks.values()} == {P.URGENT}
    assert policy.ingest_priority == P.BACKGROUND
    data = _policy()
    data["tasks"]["judge"]["priority"] = "background"
    assert RuntimePolicy.from_dict(data).task("judge").priority == P.BACKGROUND


@pytest.mark.parametrize("where", ["task", "ingest"])
def test_policy_rejects_an_unknown_level(where):
    data = _policy()
    if where == "task":
        data["tasks"]["answer"]["priority"] = "asap"
        match = "tasks.answer.priority"
    else:
        data["ingest_priority"] = 5
        match = "ingest_priority"
    with pytest.raises(PolicyError, match=match):
        RuntimePolicy.from_dict(data)


# ---------------------------------------------------------------------------------------------- the configs
SHARED = ("embed", "rerank", "generate")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_engines_have_priority_levels_in_both_profiles(profile):
    for dep in PROFILES[profile]:
        db = parse(render(dep)).dynamic_batching
        assert dep.contract.name in SHARED
        assert db.priority_levels == P.PRIORITY_LEVELS, dep.contract.name
        assert db.default_priority_level == P.URGENT, dep.contract.name
        assert db.priority_queue_policy[P.URGENT].max_queue_size == P.URGENT_QUEUE.max_queue_size
        bg = db.priority_queue_policy[P.BACKGROUND]
        assert (bg.max_queue_size, bg.default_timeout_microseconds) == (P.BACKGROUND_QUEUE.max_queue_size,
                                                                        P.BACKGROUND_QUEUE.timeout_us)
        assert 0 < bg.max_queue_size, "background work must not grow the queue without bound"


def test_bls_models_that_fan_out_have_priority_levels():
    cfgs = {d.contract.name: parse(render(d)) for d in BLS}
    for name in ("rag_orchestrator", "rag_stream_orchestrator", "embed_text", "rerank_text", "generate_text",
                 "vector_index"):
        assert cfgs[name].dynamic_batching.priority_levels == P.PRIORITY_LEVELS, name
        assert cfgs[name].dynamic_batching.default_priority_level == P.URGENT, name
    for name in ("ingest", "docling"):
        assert cfgs[name].dynamic_batching.default_priority_level == P.BACKGROUND, name
    # a model without a batch dimension gets the queue, not batching
    assert cfgs["rerank_text"].max_batch_size == 0
    assert list(cfgs["rerank_text"].dynamic_batching.preferred_batch_size) == []
    # ensembles have no queue of their own: Triton passes the request's priority to the step
    assert not cfgs["rag"].HasField("dynamic_batching")


def test_an_ensemble_cannot_take_priority_settings():
    import dataclasses

    rag = next(d for d in BLS if d.contract.name == "rag")
    with pytest.raises(ValueError, match="ensemble has no queue"):
        render(dataclasses.replace(rag, priority=P.QUEUES))


# ------------------------------------------------------------------------------------ how children carry it
def test_requested_reads_x_priority_then_a_priority_parameter():
    assert P.requested({"x-priority": "background", "priority": "urgent"}) == "background"
    assert P.requested({"priority": 2}) == 2                  # /generate JSON field
    assert P.requested({}) is None and P.requested(None) is None


def test_background_children_leave_the_bls_path_only_when_needed(monkeypatch):
    from ragstack.triton import adapter as ta

    monkeypatch.setenv("TRITON_HTTP_PORT", "1")
    hop = ta.Hop({"x-priority": "background"})
    assert ta._loopback_level("embed", hop) == P.BACKGROUND       # embed's default is urgent
    assert ta._loopback_level("docling", hop) is None             # docling's default is background already
    assert ta._loopback_level("embed", ta.Hop({"x-priority": "urgent"})) is None
    assert ta._loopback_level("embed", ta.Hop({})) is None
    assert ta._loopback_level("embed", None) is None
    monkeypatch.delenv("TRITON_HTTP_PORT")
    assert ta._loopback_level("embed", hop) is None               # no endpoint known: plain BLS


def test_queue_rejections_of_children_are_unavailable():
    from ragstack.triton import loopback
    from ragstack.triton import adapter as ta
    from ragstack.contracts.errors import Unavailable

    e = ta.child_error("embed", "[request id: <id_unknown>] Exceeds maximum queue size")
    assert isinstance(e, Unavailable) and "full queue" in str(e)
    # Triton's HTTP status for UNAVAILABLE is 503 and for INVALID_ARG 400
    e = loopback.error("embed", loopback.LoopbackError(503, "Exceeds maximum queue size"), P.BACKGROUND)
    assert isinstance(e, Unavailable) and "at the background level (max_queue_size 8)" in str(e)
    e = loopback.error("embed", loopback.LoopbackError(400, "bad shape"), P.BACKGROUND)
    assert isinstance(e, InvalidInput)
    e = loopback.error("embed", loopback.LoopbackError(503, "model is not ready"), P.BACKGROUND)
    assert isinstance(e, Unavailable) and "retry shortly" in str(e)


def test_background_work_retries_while_queues_are_full():
    from ragstack.contracts.errors import Unavailable

    calls, waits = [], []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("model 'embed' has a full queue at the background level: retry later")
        return "done"

    assert P.retry_when_queue_full(fn, sleep=waits.append) == "done"
    assert waits == [0.2, 0.4]

    def always_full():
        raise Unavailable("model 'embed' has a full queue: retry later")
    with pytest.raises(Unavailable):
        P.retry_when_queue_full(always_full, attempts=3, sleep=waits.append)

    def other():
        calls.append(1)
        raise Unavailable("model 'embed' died")
    n = len(calls)
    with pytest.raises(Unavailable, match="died"):
        P.retry_when_queue_full(other, sleep=waits.append)
    assert len(calls) == n + 1                                       # not retried


# ------------------------------------------------------------------------------------------- the activity board
def test_activity_board_counts_urgent_requests_of_live_processes(tmp_path):
    import os

    from ragstack.triton.activity import ActivityBoard

    a, b = ActivityBoard(tmp_path, pid=os.getpid()), ActivityBoard(tmp_path, pid=os.getppid())
    assert a.in_flight() == 0
    with a.urgent():
        b.begin()
        assert a.in_flight() == 2
        b.end()
        assert b.in_flight() == 1
    assert a.in_flight() == 0
    path = tmp_path / str(os.getpid())
    inode = path.stat().st_ino
    a.begin()
    assert path.read_text() == "000000000001" and path.stat().st_ino == inode   # a store into the mapped file
    a.end()
    a.close()
    assert not path.exists() and a.in_flight() == 0
    (tmp_path / "999999999").write_text("3")                        # a stub that died with requests in flight
    assert a.in_flight() == 0 and not (tmp_path / "999999999").exists()


def test_background_waits_for_quiet_at_most_its_bound(tmp_path):
    from ragstack.triton.activity import ActivityBoard

    board = ActivityBoard(tmp_path)
    now = [0.0]

    def sleep(s):
        now[0] += s
    assert board.wait_quiet(2.0, clock=lambda: now[0], sleep=sleep) == 0.0
    board.begin()
    assert board.wait_quiet(2.0, poll_s=0.5, clock=lambda: now[0], sleep=sleep) == pytest.approx(2.0)
    assert board.wait_quiet(0, clock=lambda: now[0], sleep=sleep) == 0.0   # yielding off
    board.end()


def test_priority_metrics_are_in_the_catalogue():
    from ragstack.triton.metrics import PRIORITY_FAMILIES

    catalogue = {m["name"]: m for m in json.loads((ROOT / "monitoring" / "metrics.json").read_text())["metrics"]}
    for name, (kind, _, labels) in PRIORITY_FAMILIES.items():
        assert catalogue[name]["kind"] == kind.lower() and catalogue[name]["labels"] == list(labels)


def test_engine_requests_are_counted_by_level():
    from ragstack.triton.metrics import PriorityMetrics

    class Metric:
        def __init__(self):
            self.total = 0

        def increment(self, n):
            self.total += n

    class Family:
        COUNTER = GAUGE = HISTOGRAM = 0

        def __init__(self, **kw):
            self.metrics = {}

        def Metric(self, labels):
            return self.metrics.setdefault(tuple(sorted(labels.items())), Metric())

    class Pb:
        MetricFamily = Family

    class Request:
        def __init__(self, params):
            self.params = params

        def parameters(self):
            return self.params

    m = PriorityMetrics(Pb, "embed")
    m.count([Request('{"x-priority": "background"}'), Request("{}"), Request('{"x-priority": "background"}'),
             Request('{"x-priority": "nonsense"}')])
    m.close()                                    # recorded on the registry's thread; close records what is pending
    totals = {dict(k)["priority"]: v.total for k, v in m._families["llm_engine_requests"].metrics.items()}
    assert totals == {"background": 2, "urgent": 1}


def test_the_recorder_records_in_order_off_the_callers_thread_after_a_delay():
    import threading
    import time

    from ragstack.triton.metrics import Recorder

    done = []
    recorder = Recorder(delay_s=0.05)
    t0 = time.monotonic()
    recorder.submit(lambda: done.append(("first", threading.current_thread().name, time.monotonic() - t0)))
    recorder.submit(lambda: 1 / 0)                                          # logged; the next call still runs
    recorder.submit(lambda: done.append(("third", threading.current_thread().name, time.monotonic() - t0)))
    assert done == []                                                       # submit does not wait
    recorder.close()
    assert [d[0] for d in done] == ["first", "third"]
    assert {d[1] for d in done} == {"ragstack-metrics"} and done[0][2] >= 0.05
    assert not recorder._thread.is_alive()


def test_for_request_reads_the_parameters_json():
    assert P.for_request('{"x-priority": "background", "x-engine-hash": "h"}') == P.BACKGROUND
    assert P.for_request('{"priority": 2}') == P.BACKGROUND            # a /generate field
    assert P.for_request("") == P.URGENT
    assert P.for_request("{}", P.BACKGROUND) == P.BACKGROUND
    assert P.for_request('{"x-priority": "urgent"}', P.BACKGROUND) == P.BACKGROUND
    for bad in ("{nope", "[1]", '{"x-priority": "asap"}'):
        with pytest.raises(InvalidInput):
            P.for_request(bad)
