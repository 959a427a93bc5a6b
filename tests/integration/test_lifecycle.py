"""Model lifecycle on a real tritonserver with the reference engines (tiny models): budget, LRU eviction,
cooldown, no failures under pressure, self-healing after kill -9, canary rollback and promotion.

Its own server on its own repository (a copy of the reference engines, with versions 2 (broken) and 3 (good)
of embed, and a test-only BLS model ``lease_probe`` that calls an engine inside
``ragstack.lifecycle.bls_client.engine_lease``), so the budget and the canary can be driven freely.
"""
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from ragstack.contracts import client as client_io
from ragstack.contracts.tensors import bytes_array
from ragstack.governance.events import OBSERVABILITY_ALERT, ROLLBACK_COMPLETED, read_events
from ragstack.lifecycle.client import ManagerClient
from ragstack.lifecycle.procmem import stub_processes
from ragstack_dev.server import ROOT, TritonProcess, access_keys

pytestmark = pytest.mark.integration

ENGINES = ("embed", "rerank", "generate")

PROBE_CONFIG = """
name: "lease_probe"
backend: "python"
max_batch_size: 0
input { name: "model" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "result" data_type: TYPE_STRING dims: [ 1 ] }
instance_group { count: 4 kind: KIND_CPU }
"""

# A BLS model the way the stack's BLS models will call engines: inside engine_lease, at the leased version.
PROBE_MODEL = '''
import json, time
import numpy as np
import triton_python_backend_utils as pb
from ragstack.governance.access import child_parameters
from ragstack.lifecycle.bls_client import call_with_lease
from ragstack.contracts.trtllm import generate_inputs

IDS = np.array([[5, 6, 7, 8]], dtype=np.int32)


def call_engine(model, kwargs):
    if model == "generate":
        inputs = generate_inputs(IDS[0], 2, 0, 0, return_perf_metrics=False)
        request = pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(k, v) for k, v in inputs.items()],
                                      requested_output_names=["output_ids"], parameters=child_parameters(), **kwargs)
        for response in request.exec(decoupled=True):
            if response.has_error():
                raise RuntimeError(response.error().message())
        return
    output = "embedding" if model == "embed" else "score"
    request = pb.InferenceRequest(model_name=model, inputs=[pb.Tensor("input_ids", IDS),
                                  pb.Tensor("attention_mask", np.ones_like(IDS))],
                                  requested_output_names=[output], parameters=child_parameters(), **kwargs)
    response = request.exec()
    if response.has_error():
        raise RuntimeError(response.error().message())


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            model = pb.get_input_tensor_by_name(request, "model").as_numpy().reshape(-1)[0].decode()
            t0 = time.monotonic()
            def run(lease, model=model):
                call_engine(model, lease.request_kwargs())
                return lease

            try:
                lease = call_with_lease(pb, model, run)
                result = {"ok": True, "version": lease.version, "managed": lease.managed,
                          "waited_s": lease.waited_s, "latency_s": time.monotonic() - t0}
                out = np.array([json.dumps(result).encode()], dtype=np.object_)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("result", out)]))
            except Exception as e:
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses
'''

BROKEN_ENGINE = '''
import triton_python_backend_utils as pb


class TritonPythonModel:
    """embed v2: a deliberately broken canary (every request fails)."""

    def execute(self, requests):
        raise RuntimeError("deliberately broken canary engine (embed v2)")
'''


def build_repository(root: Path) -> Path:
    repo = root / "engines"
    for name in ENGINES:
        shutil.copytree(ROOT / "model_repository" / "reference" / name, repo / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    embed = repo / "embed"
    with open(embed / "config.pbtxt", "a") as f:            # serve v1 unless the manager says otherwise
        f.write("version_policy {\n  specific {\n    versions: 1\n  }\n}\n")
    (embed / "2").mkdir()
    (embed / "2" / "model.py").write_text(BROKEN_ENGINE)
    shutil.copytree(embed / "1", embed / "3")               # a good new version
    (repo / "lease_probe" / "1").mkdir(parents=True)
    (repo / "lease_probe" / "config.pbtxt").write_text(PROBE_CONFIG)
    (repo / "lease_probe" / "1" / "model.py").write_text(PROBE_MODEL)
    return repo


@pytest.fixture(scope="module")
def lifecycle_server(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    repo = build_repository(root)
    events = root / "data" / "events.jsonl"
    proc = TritonProcess(tiny_models, load_models="model_manager lease_probe embed rerank generate",
                         log_path=ROOT / "build" / "logs" / "lifecycle-integration.log",
                         env={"MODEL_REPO": str(repo), "RAG_DATA_PATH": str(root / "data"),
                              "RAGSTACK_EVENT_LOG": str(events)})
    proc.start()
    proc.events_path = events
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def mc(lifecycle_server):
    with ManagerClient(lifecycle_server.http_url, api_key=access_keys().admin_key) as client:
        # the manager adopts the engines Triton loaded at start
        client.wait(lambda s: all(s["models"][m]["state"] == "ready" and s["models"][m]["measured"]
                                  for m in ENGINES), timeout_s=120)
        yield client


def probe(server, model: str) -> dict:
    """One request to ``model`` through lease_probe (BLS, inside engine_lease); raises on failure."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url, network_timeout=600, connection_timeout=600) as c:
        result = c.infer("lease_probe", client_io.inputs_as_given(httpclient, {"model": bytes_array([model])}))
        return client_io.output_json(result, "result")


def metric_values(server) -> dict:
    """The metrics endpoint as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line and not line.startswith("#")}


def footprints(mc) -> dict:
    return {m: v["footprint_bytes"] for m, v in mc.status()["models"].items()}


def set_budget(mc, watermark: int, buffer: float = 0.15, **settings) -> dict:
    """A budget whose high-watermark is ``watermark`` bytes."""
    return mc.call("configure", payload={"budget_bytes": int(watermark / (1 - buffer)) + 1,
                                         "safety_buffer": buffer, **settings})


def transitions_since(mc, t: float) -> list:
    return [x for x in mc.status()["transitions"] if x["t"] >= t]


def clock_now(mc) -> float:
    """The manager's clock (seconds since it started), the one its transitions are stamped with."""
    return mc.status()["clock_s"]


def run_clients(server, plan, seconds: float):
    """Threads issuing probe requests for ``seconds``: plan is a list of model sequences (one per thread)."""
    results, stop = [], time.monotonic() + seconds

    def worker(models):
        i = 0
        while time.monotonic() < stop:
            model = models[i % len(models)]
            i += 1
            try:
                results.append((model, probe(server, model), None))
            except Exception as e:  # noqa: BLE001 - recorded and asserted on
                results.append((model, None, str(e)))
    threads = [threading.Thread(target=worker, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


# ---------------------------------------------------------------------------------------------- the tests
def test_budget_pressure_evicts_the_least_recently_used_idle_model(lifecycle_server, mc):
    mc.call("configure", payload={"budget_bytes": 64 << 30, "cooldown_s": 0})
    for model in ("generate", "embed", "rerank"):         # LRU order now: generate, embed, rerank
        assert probe(lifecycle_server, model)["managed"]
    f = footprints(mc)
    mark = clock_now(mc)
    # The watermark holds embed + rerank and half of generate: exactly one model has to go, and it is the
    # least recently used idle one.
    set_budget(mc, f["embed"] + f["rerank"] + f["generate"] // 2)
    mc.wait_state("generate", "unloaded", timeout_s=60)
    evicted = [x["model"] for x in transitions_since(mc, mark) if x["action"] == "evict"]
    assert evicted == ["generate"]
    assert {m for m, v in mc.status()["models"].items() if v["state"] == "ready"} == {"embed", "rerank"}
    # Now generate is wanted: a load that would cross the watermark evicts the LRU idle model (embed).
    mark = clock_now(mc)
    assert probe(lifecycle_server, "generate")["ok"]
    evicted = [x["model"] for x in transitions_since(mc, mark) if x["action"] == "evict"]
    assert evicted == ["embed"]
    st = mc.status()
    assert {m for m, v in st["models"].items() if v["state"] == "ready"} == {"rerank", "generate"}
    assert st["used_bytes"] <= st["budget"]["watermark_bytes"]
    # what the alert rules and the dashboard read
    metrics = metric_values(lifecycle_server)
    assert metrics['llm_model_evictions_total{model="generate"}'] == 1
    assert metrics['llm_model_evictions_total{model="embed"}'] == 1
    assert metrics['llm_memory_budget_bytes{component="engines"}'] == st["budget"]["total_bytes"]
    assert metrics['llm_models_resident'] == 2
    assert metrics['llm_model_load_seconds{model="generate"}'] > 0


def test_cooldown_prevents_thrash_under_alternating_demand(lifecycle_server, mc):
    f = footprints(mc)
    cooldown, seconds = 5.0, 14.0
    # Room for one of rerank and generate: every swap is an eviction and a load.
    set_budget(mc, max(f["rerank"], f["generate"]) + min(f["rerank"], f["generate"]) // 2, cooldown_s=cooldown)
    mark = clock_now(mc)
    results = run_clients(lifecycle_server, [["rerank"], ["generate"]], seconds)
    errors = [e for _, _, e in results if e]
    assert not errors, errors[:3]
    trs = transitions_since(mc, mark)
    loads = [x for x in trs if x["action"] == "load"]
    served = len(results)
    # Two clients alternating demand: without a cooldown every request would swap the engines.
    assert served >= 3 * max(1, len(loads)), (served, trs)
    assert len(loads) <= seconds / cooldown + 2, trs
    loaded_at = {}
    for x in mc.status()["transitions"]:
        if x["action"] in ("load", "adopt"):
            loaded_at[x["model"]] = x["t"]
        elif x["action"] == "evict" and x["t"] >= mark:
            assert x["t"] - loaded_at[x["model"]] >= cooldown - 0.5, (x, loaded_at)


def test_concurrent_requests_never_fail_while_models_are_evicted(lifecycle_server, mc):
    f = sorted(footprints(mc).values())
    set_budget(mc, f[1] + f[2] + f[0] // 2, cooldown_s=2.0)      # room for two of the three
    before = {m: v["evictions"] for m, v in mc.status()["models"].items()}
    plan = [["embed", "rerank", "generate"], ["generate", "embed"], ["rerank", "generate", "embed"],
            ["embed"], ["rerank"], ["generate"]]
    results = run_clients(lifecycle_server, plan, 14.0)
    errors = [(m, e) for m, _, e in results if e]
    assert not errors, errors[:3]
    after = mc.status()
    evictions = sum(v["evictions"] - before[m] for m, v in after["models"].items())
    assert evictions >= 1, "no pressure: the test did not exercise eviction"
    assert len(results) >= len(plan) and all(r["managed"] for _, r, _ in results)
    assert after["leases"] == 0 and all(v["refcount"] == 0 for v in after["models"].values())


def test_a_killed_stub_recovers_without_operator_action(lifecycle_server, mc):
    mc.call("configure", payload={"budget_bytes": 64 << 30, "cooldown_s": 0})
    assert probe(lifecycle_server, "embed")["ok"]
    heals = mc.model("embed")["heals"]
    (pid,) = [p.pid for p in stub_processes(lifecycle_server.proc.pid) if p.model == "embed"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    # The very next request neither fails nor needs an operator: it waits for the reload.
    result = probe(lifecycle_server, "embed")
    recovered = time.monotonic() - t0
    assert result["ok"] and result["waited_s"] > 0
    st = mc.model("embed")
    assert st["heals"] == heals + 1 and st["state"] == "ready"
    assert recovered < 60, f"recovered in {recovered:.1f} s"
    assert all(probe(lifecycle_server, "embed")["ok"] for _ in range(3))
    alerts = [e["fields"] for e in read_events(lifecycle_server.events_path) if e["event"] == OBSERVABILITY_ALERT]
    assert any(a["alert"] == "model_stub_died" and a["model"] == "embed" for a in alerts)
    assert any(a["alert"] == "model_stub_recovered" and a["model"] == "embed" for a in alerts)


def _drive_canary(server, mc, n_max=60):
    outcomes = []
    for _ in range(n_max):
        st = mc.model("embed")
        if st["canary_state"] is None and st["rollout"] is None:
            break
        try:
            r = probe(server, "embed")
            outcomes.append((r["version"], None))
        except Exception as e:  # noqa: BLE001 - the broken canary's requests fail
            outcomes.append((None, str(e)))
    return outcomes


def test_a_broken_canary_is_rolled_back_and_the_event_logged(lifecycle_server, mc):
    mc.call("configure", payload={"budget_bytes": 64 << 30, "cooldown_s": 0})
    mc.call("canary_start", "embed", {"version": 2, "share": 0.5, "min_requests": 6, "promote_after": 40})
    mc.wait(lambda s: s["models"]["embed"]["canary_state"] in ("running", "rolling_back", None), timeout_s=180)
    outcomes = _drive_canary(lifecycle_server, mc)
    st = mc.wait(lambda s: s["models"]["embed"]["canary_state"] is None, timeout_s=180)["models"]["embed"]
    failures = [e for _, e in outcomes if e]
    assert failures and all("deliberately broken" in e for e in failures)
    assert st["last_canary"]["outcome"] == "rollback" and st["versions"] == [1]
    rollbacks = [e["fields"] for e in read_events(lifecycle_server.events_path) if e["event"] == ROLLBACK_COMPLETED]
    (rb,) = rollbacks
    assert rb["model"] == "embed" and rb["from_version"] == 2 and rb["to_version"] == 1 and rb["trigger"] == "auto"
    assert "error rate" in rb["root_cause"] and "exceeds 2%" in rb["root_cause"] and rb["warmup_ok"]
    assert rb["stats"]["versions"]["2"]["requests"] >= 6
    for _ in range(3):                                      # traffic is back on v1, and it works
        assert probe(lifecycle_server, "embed")["version"] == 1
    history = mc.call("history", "embed")
    assert history["current"] == 1 and [x["action"] for x in history["log"]][-1] == "canary_rollback"


def test_a_good_canary_is_promoted(lifecycle_server, mc):
    mc.call("canary_start", "embed", {"version": 3, "share": 0.5, "min_requests": 4, "promote_after": 6})
    mc.wait(lambda s: s["models"]["embed"]["canary_state"] in ("running", "promoting", None), timeout_s=180)
    outcomes = _drive_canary(lifecycle_server, mc)
    st = mc.wait(lambda s: s["models"]["embed"]["canary_state"] is None, timeout_s=180)["models"]["embed"]
    assert not [e for _, e in outcomes if e]
    assert st["last_canary"]["outcome"] == "promote" and st["versions"] == [3]
    assert probe(lifecycle_server, "embed")["version"] == 3
    history = mc.call("history", "embed")
    assert history["current"] == 3 and history["previous"] == 1
    alerts = [e["fields"] for e in read_events(lifecycle_server.events_path) if e["event"] == OBSERVABILITY_ALERT]
    assert any(a["alert"] == "canary_promoted" and a["to_version"] == 3 for a in alerts)
