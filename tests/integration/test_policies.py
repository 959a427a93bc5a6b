"""The runtime policy's rules on a real tritonserver: identity headers, token budget, cost, metrics, events,
tracing. The server is the session's (tiny models), started with a webhook receiver and tracing on."""
import json
import re
import time
import urllib.request

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.helpers import infer, is_invalid_arg, stream, strings
from tests.integration.test_rag import rag_inputs

pytestmark = pytest.mark.integration
DOCS = ['{"id": "a", "text": "Shifts last seven days."}', '{"id": "b", "text": "The stipend is paid monthly."}']


def ask(client_pair, headers, **kw):
    kw.setdefault("documents", DOCS)
    out = infer(client_pair, "rag", rag_inputs(**kw), ["answer", "contexts", "usage"], headers=headers)
    return {k: json.loads(v.reshape(-1)[0]) for k, v in out.items()}


def scrape(server) -> dict:
    """{(name, frozenset(labels)): value} from the metrics port."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+([-+\deE.naif]+)$', line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(snapshot, name, **labels):
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, ls), v in snapshot.items() if n == name and want <= ls)


@pytest.mark.parametrize("drop, change, message", [
    ("X-Engine-Hash", None, "missing header X-Engine-Hash"),
    ("X-Quantisation", None, "missing header X-Quantisation"),
    (None, ("X-Engine-Hash", "0" * 64), "header X-Engine-Hash is"),
    (None, ("X-Quantisation", "int4"), "header X-Quantisation is 'int4'"),
])
def test_identity_headers_are_required(client, identity, drop, change, message):
    headers = {k: v for k, v in identity.items() if k != drop}
    if change:
        headers[change[0]] = change[1]
    with pytest.raises(InferenceServerException) as err:
        ask(client, headers)
    assert is_invalid_arg(err.value), err.value
    assert message in str(err.value) and "manifest.json" in str(err.value)   # names where the value lives
    assert ask(client, identity)["usage"]["finish_reason"] == "stop"


def test_identity_survives_a_bls_hop(server, identity):
    """generate_text does not check identity itself: the generate engine it calls does, so a rejection proves
    the headers reached the child. (gRPC: Triton 2.51 forwards no headers on /generate.)"""
    inputs = {"prompt": strings(["hello"]), "max_tokens": np.array([4], np.int32),
              "temperature": np.array([0.0], np.float32)}
    with pytest.raises(InferenceServerException) as err:
        stream(server.grpc_url, "generate_text", inputs, headers={**identity, "X-Quantisation": "int4"})
    assert "header X-Quantisation is 'int4'" in str(err.value)
    assert stream(server.grpc_url, "generate_text", inputs, headers=identity)[-1]["num_output_tokens"] == 4
    assert stream(server.grpc_url, "generate_text", inputs)[-1]["num_output_tokens"] == 4   # no claim, no check


def test_token_budget_overrun_is_flagged_logged_and_posted(http, identity, data_dir, webhook):
    with pytest.raises(InferenceServerException) as err:
        ask(("http", http), identity, query="word " * 5000)
    assert is_invalid_arg(err.value) and "token_budget_overrun" in str(err.value)
    log = data_dir / "logs" / "llm_events.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e["event"] == "token_budget_overrun" and e["fields"]["limit"] == 4096 for e in events)
    deadline = time.time() + 10
    while not webhook.events("token_budget_overrun") and time.time() < deadline:
        time.sleep(0.1)
    assert webhook.events("token_budget_overrun")


def test_metrics_move_by_the_right_amounts(server, http, identity):
    before = scrape(server)
    result = ask(("http", http), identity)
    with pytest.raises(InferenceServerException):
        ask(("http", http), {})
    usage = result["usage"]

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    # A served request's metrics are recorded just after its response is sent, its request count last; Triton
    # counts the ensemble's success after that too.
    deadline = time.time() + 10
    while True:
        after = scrape(server)
        if (delta("llm_requests", task="answer", outcome="ok") >= 1
                and delta("nv_inference_request_success", model="rag") >= 1) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert delta("llm_requests", task="answer", outcome="ok") == 1
    assert delta("llm_requests", outcome="identity_rejected") == 1
    assert delta("llm_tokens_in", task="answer") == usage["tokens_in"]
    assert delta("llm_tokens_out", task="answer") == usage["tokens_out"]
    assert delta("llm_cost_usd", task="answer") == pytest.approx(usage["cost_usd"], rel=1e-6)
    assert delta("llm_stage_latency_us_count", stage="generate") == 1
    assert delta("llm_stage_latency_us_sum", stage="generate") == pytest.approx(
        usage["timings_ms"]["generate"] * 1000, rel=1e-3)
    assert delta("llm_queue_delay_us_count") == 1
    assert delta("nv_inference_request_success", model="rag") == 1


def test_cost_uses_the_manifest_prices(http, identity, tiny_models):
    from ragstack.governance.manifest import read_manifest

    prices = read_manifest(tiny_models / "generate").pricing
    usage = ask(("http", http), identity)["usage"]
    expected = usage["tokens_in"] / 1000 * prices["price_per_1k_input_usd"] + \
        usage["tokens_out"] / 1000 * prices["price_per_1k_output_usd"]
    assert usage["cost_usd"] == pytest.approx(expected, rel=1e-6)


def test_stages_are_traced_as_child_spans(http, identity, data_dir, corpus):
    from ragstack.triton.tracing import build_spans, load_records, walk

    ask(("http", http), identity, documents=None, collection="corpus")
    deadline, stages = time.time() + 10, set()
    while time.time() < deadline:
        roots = [r for r in build_spans(load_records(data_dir / "trace.json")) if r.model == "rag"]
        if roots:
            [orchestrator] = roots[-1].children
            stages = {s.stage for _, s in walk(orchestrator) if s.stage}
            if stages >= {"embed", "search", "rerank", "generate"}:
                break
        time.sleep(0.2)
    assert orchestrator.model == "rag_orchestrator"
    assert stages == {"embed", "search", "rerank", "generate"}
    assert all(s.duration_ms is not None and s.duration_ms >= 0 for _, s in walk(roots[-1]))


def test_a_burst_of_rejected_requests_leaves_the_server_up(server, http, identity):
    """Counting outcomes from several threads at once once crashed tritonserver (SIGSEGV in the Python backend's
    metrics IPC after ~40-120 requests); metric calls are serialized now."""
    import threading

    import tritonclient.grpc as grpcclient

    errors = []

    def burst():
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            for _ in range(60):
                try:
                    ask(("grpc", c), {})
                except InferenceServerException as e:
                    errors.append(is_invalid_arg(e))
    threads = [threading.Thread(target=burst) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 180 and all(errors)
    assert server.proc.poll() is None
    assert ask(("http", http), identity)["usage"]["finish_reason"] == "stop"
