"""Priorities through the real endpoints (issue 19): the configs Triton serves, Triton's own priority queue, the
generate engine's admission order, levels inherited by child requests, the per-task level of the policy file,
and a full queue's error. Orderings and counters only: no timed assertions.

A server of this module's own: its policy makes the ``judge`` task background, and the tests fill queues.
"""
import json
import queue
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ragstack.governance import priority as P
from ragstack.governance.adaptive import parse_prometheus
from ragstack_dev.server import ROOT
from tests.integration.conftest import CORPUS, ingest, private_server
from tests.integration.helpers import admin_headers, generate_json, infer, make_input, strings, wire_headers

# A task that always generates (the grounded ones may abstain on the tiny models without calling generate).
SCHEMA = json.dumps({"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 99}},
                     "required": ["hours"], "additionalProperties": False})


@pytest.fixture(scope="module")
def prio_server(tiny_models, tmp_path_factory):
    policy = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    policy["tasks"]["judge"]["priority"] = "background"
    path = tmp_path_factory.mktemp("prio-policy") / "policy.json"
    path.write_text(json.dumps(policy))
    with private_server(tiny_models, tmp_path_factory, "integration-priority", RAG_POLICY_FILE=str(path)) as proc:
        yield proc


@pytest.fixture(scope="module")
def phttp(prio_server):
    with httpclient.InferenceServerClient(prio_server.http_url, concurrency=16, network_timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def identity(tiny_models):
    from ragstack.governance.manifest import read_manifest

    return read_manifest(tiny_models / "generate").headers()


@pytest.fixture(scope="module")
def pcorpus(phttp):
    report = ingest(("http", phttp), [p.stem for p in CORPUS], [p.read_text() for p in CORPUS])
    assert report["priority"] == "background"
    return report


def engine_requests(server) -> dict:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        samples = parse_prometheus(r.read().decode())
    return {(lab["model"], lab["priority"]): v for n, lab, v in samples if n == "llm_engine_requests"}


def engine_requests_once(server, at_least: dict, timeout: float = 10.0) -> dict:
    """The counts once each of ``at_least`` ({(model, level): count}) is reached: the engines record them on a
    thread of their own a few ms after each batch (ragstack.triton.metrics.Recorder). Read again 0.2 s later, so
    that a count that should not have moved has had the time to."""
    deadline = time.time() + timeout
    while True:
        counts = engine_requests(server)
        if all(counts.get(k, 0) >= v for k, v in at_least.items()) or time.time() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    return engine_requests(server)


def rag(phttp, identity, query, task="generate_json", headers=None):
    arrays = {"query": strings([query]).reshape(1, 1), "task": strings([task]).reshape(1, 1),
              "collection": strings(["corpus"]).reshape(1, 1)}
    if task == "generate_json":
        arrays["schema"] = strings([SCHEMA]).reshape(1, 1)
    out = infer(("http", phttp), "rag", arrays, ["usage"], headers={**identity, **(headers or {})})
    return json.loads(out["usage"].reshape(-1)[0])


def operator() -> dict:
    """gRPC metadata with the operator's key and the internal proof: engines are internal to the server and ingest
    needs a writer key (ragstack.governance.access)."""
    return wire_headers("grpc", None)


# -------------------------------------------------------------------------------------------- configuration
def test_priority_settings_read_back_over_http(prio_server):
    def config(model):
        req = urllib.request.Request(f"http://{prio_server.http_url}/v2/models/{model}/config",
                                     headers=admin_headers())              # a restricted API (ragstack.governance.access)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["dynamic_batching"]

    for model in ("embed", "rerank", "generate", "embed_text", "rerank_text", "generate_text", "vector_index",
                  "rag_orchestrator", "rag_stream_orchestrator", "ingest", "docling"):
        db = config(model)
        assert int(db["priority_levels"]) == P.PRIORITY_LEVELS, model
        assert int(db["default_priority_level"]) == P.default_level(model), model
        background = db["priority_queue_policy"][str(P.BACKGROUND)]
        assert int(background["max_queue_size"]) == P.BACKGROUND_QUEUE.max_queue_size, model
        assert int(background["default_timeout_microseconds"]) == P.BACKGROUND_QUEUE.timeout_us, model
    assert int(config("ingest")["default_priority_level"]) == P.BACKGROUND


# ------------------------------------------------------------------------------- Triton's own priority queue
def test_embed_serves_an_urgent_request_before_an_older_background_one(prio_server):
    """The one embed instance is kept busy by full batches; then a background and, after it, an urgent request
    wait in its queue: Triton hands the urgent one to the instance first."""
    spec = json.loads((prio_server.engine_path / "embed" / "engine.json").read_text())
    rows, length = 32, spec["max_length"]                # a full batch each: nothing merges with anything
    ids = np.ones((rows, length), np.int32)
    inputs = [make_input("grpc", "input_ids", ids), make_input("grpc", "attention_mask", ids)]
    done, lock = [], threading.Lock()

    def callback(name):
        def cb(result, error):
            with lock:
                done.append((name, error))
        return cb

    client = grpcclient.InferenceServerClient(prio_server.grpc_url)
    try:
        for i in range(4):
            client.async_infer("embed", inputs, callback(f"blocker{i}"), priority=P.URGENT, headers=operator())
        client.async_infer("embed", inputs, callback("background"), priority=P.BACKGROUND, headers=operator())
        client.async_infer("embed", inputs, callback("urgent"), priority=P.URGENT, headers=operator())
        deadline = time.monotonic() + 300
        while len(done) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
    assert [e for _, e in done if e is not None] == []
    order = [name for name, _ in done]
    assert order.index("urgent") < order.index("background"), order


# -------------------------------------------------------------------------- the generate engine's admission
def _generate_inputs(n_tokens, prompt=(5, 6, 7, 8)):
    arrays = {"input_ids": np.array([prompt], np.int32), "input_lengths": np.array([[len(prompt)]], np.int32),
              "request_output_len": np.array([[n_tokens]], np.int32), "end_id": np.array([[-1]], np.int32),
              "return_perf_metrics": np.array([[True]]), "exclude_input_in_output": np.array([[True]])}
    return [make_input("grpc", k, v) for k, v in arrays.items()]


def test_generate_engine_admits_an_urgent_request_before_an_older_background_one(prio_server):
    """Eight generations of different lengths fill the engine's batch (max 8); a background request, then an
    urgent one, wait. When the first slot frees, the urgent one is admitted: its first_scheduled_time_ns (the
    engine's own timestamp, returned with the perf metrics) comes before the background one's."""
    results, errors = {}, []
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(prio_server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=operator())
    try:
        for i in range(8):
            client.async_stream_infer("generate", _generate_inputs(1000 + 80 * i), request_id=f"blocker{i}")
        time.sleep(0.3)                        # sequencing, not a bound: the blockers are in before the rest
        client.async_stream_infer("generate", _generate_inputs(4), request_id="background",
                                  parameters={"x-priority": "background"})
        time.sleep(0.3)
        client.async_stream_infer("generate", _generate_inputs(4), request_id="urgent",
                                  parameters={"x-priority": "urgent"})
        while len(results) + len(errors) < 10:
            result, error = responses.get(timeout=300)
            if error is not None:
                errors.append(error)
                continue
            rid = result.get_response().id
            results[rid] = {n: int(result.as_numpy(n).reshape(-1)[0])
                            for n in ("arrival_time_ns", "first_scheduled_time_ns")}
    finally:
        client.stop_stream()
        client.close()
    assert errors == []
    bg, ur = results["background"], results["urgent"]
    assert ur["arrival_time_ns"] > bg["arrival_time_ns"]              # the urgent one came later ...
    # ... while the background one still waited (300-token blockers were too short on a quiet machine)
    assert bg["first_scheduled_time_ns"] > ur["arrival_time_ns"], "a blocker ended before the urgent request came"
    assert ur["first_scheduled_time_ns"] < bg["first_scheduled_time_ns"]   # ... and was admitted first
    assert max(r["first_scheduled_time_ns"] for k, r in results.items() if k.startswith("blocker")) \
        < ur["first_scheduled_time_ns"]                              # it did wait for a free slot


# ------------------------------------------------------------------------------------- levels are inherited
def test_ingest_and_its_embed_calls_run_at_the_background_level(prio_server, phttp, pcorpus):
    before = engine_requests(prio_server)
    # asking for urgent does not raise an ingest above its level
    report = ingest(("http", phttp), ["extra-doc"], [CORPUS[0].read_text()], collection="extra")
    asked = json.loads(infer(("http", phttp), "ingest",
                             {"doc_ids": strings(["extra-doc-2"]), "texts": strings([CORPUS[1].read_text()]),
                              "collection": strings(["extra"])}, ["report"],
                             headers={"X-Priority": "urgent"})["report"].reshape(-1)[0])
    after = engine_requests_once(prio_server, {("embed", "background"): before.get(("embed", "background"), 0) + 2})
    assert report["priority"] == asked["priority"] == "background"
    assert report["embed_calls"] > 0
    assert after.get(("embed", "background"), 0) - before.get(("embed", "background"), 0) >= 2   # both ingests
    assert after.get(("embed", "urgent"), 0) == before.get(("embed", "urgent"), 0)


def test_queries_are_urgent_and_a_caller_may_lower_them(prio_server, phttp, identity, pcorpus):
    before = engine_requests(prio_server)
    assert rag(phttp, identity, "What is the expense policy?")["priority"] == "urgent"
    mid = engine_requests_once(prio_server, {("generate", "urgent"): before.get(("generate", "urgent"), 0) + 1,
                                             ("embed", "urgent"): before.get(("embed", "urgent"), 0) + 1})
    assert mid.get(("generate", "urgent"), 0) == before.get(("generate", "urgent"), 0) + 1
    assert mid.get(("embed", "urgent"), 0) > before.get(("embed", "urgent"), 0)
    lowered = rag(phttp, identity, "What is the expense policy?", headers={"X-Priority": "background"})
    assert lowered["priority"] == "background"
    after = engine_requests_once(prio_server, {
        ("generate", "background"): mid.get(("generate", "background"), 0) + 1,
        ("embed", "background"): mid.get(("embed", "background"), 0) + 1})
    assert after.get(("generate", "background"), 0) == mid.get(("generate", "background"), 0) + 1
    assert after.get(("embed", "background"), 0) > mid.get(("embed", "background"), 0)
    assert after.get(("generate", "urgent"), 0) == mid.get(("generate", "urgent"), 0)


def test_the_per_task_level_of_the_policy_file_takes_effect(prio_server, phttp, identity, pcorpus):
    before = engine_requests(prio_server)
    usage = rag(phttp, identity, "Rate the travel policy", task="judge")
    assert usage["priority"] == "background"                        # judge is background in this policy
    after = engine_requests_once(prio_server,
                                 {("generate", "background"): before.get(("generate", "background"), 0) + 1})
    assert after.get(("generate", "background"), 0) == before.get(("generate", "background"), 0) + 1
    # and a caller cannot raise it
    assert rag(phttp, identity, "Rate the travel policy", task="judge",
               headers={"X-Priority": "urgent"})["priority"] == "background"


def test_children_leave_the_bls_path_over_http_and_no_pipeline_stub_loads_grpc(prio_server, phttp, identity,
                                                                              pcorpus):
    # ragstack/triton/loopback.py: every orchestrator's generate child and ingest's background embed calls go
    # through the server's own HTTP endpoint (each stub that sent one keeps its connection for the next), and no
    # pipeline stub loads the gRPC library. (The session server traces requests, which keeps children on BLS.)
    import psutil

    for _ in range(4):
        assert rag(phttp, identity, "What is the expense policy?")["priority"] == "urgent"
    http_port = int(prio_server.http_url.rsplit(":", 1)[1])
    grpc_port = int(prio_server.grpc_url.rsplit(":", 1)[1])
    keeping, checked = set(), 0
    for p in psutil.Process(prio_server.proc.pid).children(recursive=True):
        try:                     # the stubs' watchers (ragstack.triton.adapter) start and end short sleeps
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "triton_python_backend_stub" not in cmdline:
            continue
        model = cmdline.split("/1/model.py")[0].rsplit("/", 1)[-1]
        if model not in ("rag_orchestrator", "rag_stream_orchestrator", "generate_text", "ingest"):
            continue
        checked += 1
        assert "cygrpc" not in open(f"/proc/{p.pid}/maps").read(), f"the {model} stub {p.pid} loaded gRPC"
        remote = {c.raddr.port for c in p.net_connections(kind="tcp") if c.raddr and c.status == "ESTABLISHED"}
        assert grpc_port not in remote, f"the {model} stub {p.pid} talks to the gRPC port"
        if http_port in remote:
            keeping.add(model)
    assert checked >= 4 and keeping >= {"rag_orchestrator", "ingest"}, keeping


def test_generate_extension_takes_the_level_as_a_field(prio_server, identity, pcorpus):
    body = {"query": "What is the expense policy?", "collection": "corpus", "x-priority": "background",
            "task": "generate_json", "schema": SCHEMA,
            **{k.lower(): v for k, v in identity.items()}}
    status, out = generate_json(prio_server.http_url, "rag", body)
    assert status == 200, out
    assert json.loads(out["usage"])["priority"] == "background"


def test_a_bad_level_is_invalid_arg(phttp, identity, pcorpus):
    with pytest.raises(InferenceServerException) as e:
        rag(phttp, identity, "What is the expense policy?", headers={"X-Priority": "asap"})
    assert str(e.value.status()) == "400"
    assert "priority must be one of urgent, background" in str(e.value)


# --------------------------------------------------------------------------------------------- bounded queues
def test_a_full_background_queue_answers_with_a_clear_error(prio_server):
    """ingest has one instance and a background queue of 8: while a long ingest runs, 8 more wait and the rest
    are turned away with Triton's UNAVAILABLE 'Exceeds maximum queue size' (HTTP 503, gRPC UNAVAILABLE)."""
    big = "\n\n".join(p.read_text() for p in CORPUS * 6)             # a long first request
    extra = 12
    outcomes, lock = {}, threading.Lock()

    def inputs(i, text):
        arrays = {"doc_ids": strings([f"q{i}"]), "texts": strings([text]), "collection": strings(["queue-test"])}
        return [make_input("grpc", k, v) for k, v in arrays.items()]

    def callback(i):
        def cb(result, error):
            with lock:
                outcomes[i] = error if error is not None else json.loads(result.as_numpy("report").reshape(-1)[0])
        return cb

    client = grpcclient.InferenceServerClient(prio_server.grpc_url)
    try:
        client.async_infer("ingest", inputs(0, big), callback(0), headers=operator())
        time.sleep(1.0)                       # sequencing: the long one is executing before the others arrive
        for i in range(1, extra + 1):
            client.async_infer("ingest", inputs(i, CORPUS[i % len(CORPUS)].read_text()), callback(i),
                               headers=operator())
        deadline = time.monotonic() + 600
        while len(outcomes) < extra + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        client.close()
    rejected = [o for o in outcomes.values() if isinstance(o, InferenceServerException)]
    served = [o for o in outcomes.values() if not isinstance(o, InferenceServerException)]
    assert not isinstance(outcomes[0], InferenceServerException)
    # a rejection means the queue held 8 at that moment, and those 8 are served
    assert len(rejected) >= 1 and len(served) >= 1 + P.BACKGROUND_QUEUE.max_queue_size
    for e in rejected:
        assert str(e.status()) == "StatusCode.UNAVAILABLE" and "Exceeds maximum queue size" in str(e), e
    assert all(d["status"] == "created" for r in served for d in r["documents"])
