"""Access control over HTTP and gRPC (issue 16): keys for admin and write paths, internal models closed to direct
calls, Triton's admin APIs behind the admin key, keys never echoed nor logged, limits answered as INVALID_ARG."""
import json
import os
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ragstack_dev.server import access_keys
from tests.integration.helpers import generate_json, infer, is_invalid_arg, stream, strings

WRONG = "wrong-key-7f3a9c"


def denied(exc) -> bool:
    return is_invalid_arg(exc) and "permission denied" in str(exc)


def ingest_arrays(doc="acl-doc"):
    return {"doc_ids": strings([doc]), "texts": strings(["Access control keeps the index safe."]),
            "collection": strings(["acl"])}


@pytest.mark.parametrize("key", [None, WRONG, "reader"])
def test_ingest_refuses_without_a_writer_key(server, client, key):
    headers = {} if key is None else {"X-Api-Key": key}
    for op in ("upsert", "delete"):
        with pytest.raises(InferenceServerException) as e:
            infer(client, "ingest", {**ingest_arrays(), "op": strings([op])}, ["report"], headers=headers, auth=False)
        assert denied(e.value), e.value
        assert WRONG not in str(e.value)


def test_file_ingest_is_a_writer_operation_too(server, client):
    """Files go to the internal docling model through ingest: without a writer key nothing is converted."""
    arrays = {"doc_ids": strings(["acl-file"]), "files": np.array([b"<html><body><h1>T</h1><p>x</p></body></html>"],
                                                                   dtype=object),
              "file_names": strings(["acl.html"]), "collection": strings(["acl"])}
    for headers in ({}, {"X-Api-Key": WRONG}):
        with pytest.raises(InferenceServerException) as e:
            infer(client, "ingest", arrays, ["report"], headers=headers, auth=False)
        assert denied(e.value), e.value


def test_ingest_accepts_writer_and_admin_keys(server, client):
    keys = access_keys()
    for key in (keys.writer_key, keys.admin_key):
        out = infer(client, "ingest", ingest_arrays(), ["report"], headers={"X-Api-Key": key}, auth=False)
        assert json.loads(out["report"].reshape(-1)[0])["documents"][0]["status"] in ("created", "updated",
                                                                                      "unchanged")


def manager(client, op, headers, payload=None):
    return infer(client, "model_manager", {"op": strings([op]), "model": strings(["embed"]),
                                           "payload": strings([json.dumps(payload or {})])},
                 ["result"], headers=headers, auth=False)


def test_model_manager_admin_ops_need_the_admin_key(server, client):
    from ragstack.lifecycle.service import OPS

    manager(client, "status", {})                                   # status stays open
    for headers in ({}, {"X-Api-Key": WRONG}, {"X-Api-Key": access_keys().writer_key}):
        for op in OPS:
            if op == "status":
                continue
            payload = {"budget_bytes": 1} if op == "configure" else {"lease": "x"} if op == "release" else {}
            with pytest.raises(InferenceServerException) as e:
                manager(client, op, headers, payload)
            assert denied(e.value), (op, e.value)
            assert WRONG not in str(e.value)
    # the admin key opens them: a lease on embed, taken and given back by a client
    admin = {"X-Api-Key": access_keys().admin_key}
    lease = json.loads(manager(client, "acquire", admin)["result"].reshape(-1)[0])
    assert lease["status"] in ("ready", "unmanaged", "loading", "waiting"), lease      # the op ran
    if lease.get("lease"):
        manager(client, "release", admin, {"lease": lease["lease"], "ok": True})


def _leased_requests(server, model: str) -> float:
    """How many leased requests the manager has seen on ``model`` (released leases, every version and outcome)."""
    import re
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(
        r'^llm_model_version_requests_total\{[^}]*model="%s"[^}]*\} (\S+)$' % model, text, re.M))


def test_bls_lease_calls_need_no_key(server, http, corpus, identity):
    """rag's orchestrator leases its engines from model_manager over BLS: the internal proof opens the lease ops
    (a client needs the admin key for them, above), so a rag request without any key is served under leases."""
    status = json.loads(manager(("http", http), "status", {})["result"].reshape(-1)[0])
    if "embed" not in status.get("models", {}):
        pytest.skip("model_manager does not manage embed on this server")
    before = _leased_requests(server, "embed")
    arrays = {"query": strings(["How long is a primary on-call shift?"]).reshape(1, 1),
              "collection": strings(["corpus"]).reshape(1, 1)}
    out = infer(("http", http), "rag", arrays, ["answer"], headers=identity, auth=False)
    assert json.loads(out["answer"].reshape(-1)[0])
    assert _leased_requests(server, "embed") > before


ENGINE_IDS = np.array([[5, 6, 7, 8]], dtype=np.int32)
UNARY_INTERNAL = {
    "vector_index": {"op": strings(["stats"]), "collection": strings(["acl"])},
    "embed": {"input_ids": ENGINE_IDS, "attention_mask": np.ones_like(ENGINE_IDS)},
    "rerank": {"input_ids": ENGINE_IDS, "attention_mask": np.ones_like(ENGINE_IDS)},
    "embed_text": {"text": strings(["hello"]).reshape(1, 1)},
    "rerank_text": {"query": strings(["q"]), "documents": strings(["d"])},
    "docling": {"data": np.array([b"# Title\n\nSome text."], dtype=object), "file_name": strings(["a.md"])},
}


@pytest.mark.parametrize("forged", [None, "guess"])
def test_internal_models_refuse_direct_calls(server, client, forged):
    headers = {"X-Api-Key": access_keys().admin_key}                 # not even the admin key opens them
    if forged:
        headers["X-Ragstack-Internal"] = forged
    for model, arrays in UNARY_INTERNAL.items():
        with pytest.raises(InferenceServerException) as e:
            infer(client, model, arrays, headers=headers, auth=False)
        assert denied(e.value), (model, e.value)
    if client[0] == "grpc":
        from ragstack.contracts.trtllm import generate_inputs

        for model, arrays in (("generate", generate_inputs(ENGINE_IDS[0], 2, 0, 0)),
                              ("generate_text", {"prompt": strings(["hi"]), "max_tokens": np.array([2], np.int32)})):
            with pytest.raises(InferenceServerException) as e:
                stream(server.grpc_url, model, arrays, headers=headers, auth=False)
            assert "permission denied" in str(e.value), (model, str(e.value))   # a stream error has no status


def test_generate_endpoint_carries_the_key_in_the_body(server):
    status, body = generate_json(server.http_url, "generate_text", {"prompt": "hi", "max_tokens": 2}, auth=False)
    assert status == 400 and "permission denied" in body["error"]
    status, body = generate_json(server.http_url, "ingest", {"doc_ids": "acl-gen", "texts": "x", "x-api-key": WRONG},
                                 auth=False)
    assert status == 400 and "permission denied" in body["error"] and WRONG not in json.dumps(body)


def test_reader_keys_close_reading_once_configured(server, client, identity, corpus):
    """Reading is open while the server's reader-key file is empty; a key written into it closes rag (no restart),
    and then a reader, writer or admin key opens it, as a header or, on /generate, in the body."""
    keys = access_keys()
    path = keys.dir / "reader_keys"
    arrays = {"query": strings(["How long is an on-call shift?"]).reshape(1, 1),
              "collection": strings(["corpus"]).reshape(1, 1), "top_n": np.array([[2]], np.int32)}
    body = {"query": "How long is an on-call shift?", "collection": "corpus", "top_n": 2, **identity}
    infer(client, "rag", arrays, ["answer"], headers=identity, auth=False)            # open
    try:
        path.write_text("reader-key-1\n")
        for headers in (identity, {**identity, "X-Api-Key": WRONG}):
            with pytest.raises(InferenceServerException) as e:
                infer(client, "rag", arrays, ["answer"], headers=headers, auth=False)
            assert denied(e.value) and "reader key" in str(e.value), e.value
        for key in ("reader-key-1", keys.writer_key, keys.admin_key):
            infer(client, "rag", arrays, ["answer"], headers={**identity, "X-Api-Key": key}, auth=False)
        status, out = generate_json(server.http_url, "rag", body, auth=False)
        assert status == 400 and "permission denied" in out["error"], out
        status, out = generate_json(server.http_url, "rag", {**body, "x-api-key": "reader-key-1"}, auth=False)
        assert status == 200, out
    finally:
        path.write_text("")
    infer(client, "rag", arrays, ["answer"], headers=identity, auth=False)            # open again


def test_triton_admin_apis_need_the_admin_key(server, http):
    key = access_keys().admin_key
    for call in (lambda **kw: http.get_model_repository_index(**kw), lambda **kw: http.get_model_config("embed", **kw),
                 lambda **kw: http.get_inference_statistics("embed", **kw),
                 lambda **kw: http.unload_model("no_such_model", **kw)):
        for headers in (None, {"admin-key": WRONG}):
            with pytest.raises(InferenceServerException) as e:
                call(headers=headers)
            assert "403" in str(e.value.status()) or "restricted" in str(e.value).lower() or \
                "unauthorized" in str(e.value).lower(), e.value
    assert http.get_model_repository_index(headers={"admin-key": key})
    with grpcclient.InferenceServerClient(server.grpc_url) as g:
        for headers in (None, {"triton-grpc-protocol-admin-key": WRONG}):
            with pytest.raises(InferenceServerException) as e:
                g.get_model_repository_index(headers=headers)
            assert "UNAVAILABLE" in str(e.value.status()) or "PERMISSION" in str(e.value.status()) or \
                "restricted" in str(e.value).lower() or "unauthenticated" in str(e.value.status()).lower(), e.value
        assert g.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": key}) is not None
        with pytest.raises(InferenceServerException):
            g.unload_model("vector_index")                           # no key: the model stays
    assert http.is_model_ready("vector_index")


def test_writer_keys_rotate_without_a_restart(server, client):
    keys = access_keys()
    path = keys.dir / "writer_keys"
    original = path.read_text()
    try:
        path.write_text(original + "rotated-writer-key\n")
        infer(client, "ingest", ingest_arrays("acl-rot"), ["report"], headers={"X-Api-Key": "rotated-writer-key"},
              auth=False)
        path.write_text("rotated-writer-key\n")                       # the old key is withdrawn
        time.sleep(0.01)
        with pytest.raises(InferenceServerException) as e:
            infer(client, "ingest", ingest_arrays("acl-rot"), ["report"], headers={"X-Api-Key": keys.writer_key},
                  auth=False)
        assert denied(e.value)
    finally:
        path.write_text(original)


def test_limits_reject_oversized_input_and_the_server_stays_up(server, client, identity, http, corpus):
    from ragstack.pipeline import rag

    def one(v):
        return (strings([v]) if isinstance(v, str) else np.array([v], np.int32)).reshape(1, 1)

    base = {"query": one("x" * (rag.MAX_QUERY_CHARS + 1))}
    with pytest.raises(InferenceServerException) as e:
        infer(client, "rag", base, ["answer"], headers=identity)
    assert is_invalid_arg(e.value) and "limit" in str(e.value)
    deep = '{"type": "object", "properties": {"a": ' * 20 + "{}" + "}}" * 20
    with pytest.raises(InferenceServerException) as e:
        infer(client, "rag", {"query": one("q"), "task": one("generate_json"), "schema": one(deep)},
              ["answer"], headers=identity)
    assert is_invalid_arg(e.value) and "deeper" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        infer(client, "rag", {"query": one("q"), "collection": one("corpus"), "top_k": one(100_000)}, ["answer"],
              headers=identity)
    assert is_invalid_arg(e.value) and "top_k" in str(e.value)
    with pytest.raises(InferenceServerException) as e:                  # max_tokens over the task's ceiling
        infer(client, "rag", {"query": one("q"), "collection": one("corpus"), "max_tokens": one(1_000_000)},
              ["answer"], headers=identity)
    assert is_invalid_arg(e.value) and "max_tokens" in str(e.value)
    with pytest.raises(InferenceServerException) as e:                  # one document over 2 MiB
        infer(client, "ingest", {"doc_ids": strings(["big"]), "texts": strings(["x" * (2 * 1024 * 1024 + 1)])},
              ["report"])
    assert is_invalid_arg(e.value) and "limit" in str(e.value)
    many = [f"d{i}" for i in range(300)]
    with pytest.raises(InferenceServerException) as e:
        infer(client, "ingest", {"doc_ids": strings(many), "texts": strings(["t"] * 300)}, ["report"])
    assert is_invalid_arg(e.value) and "at most" in str(e.value)
    assert http.is_server_ready()


def test_keys_never_appear_in_the_log(server):
    keys = access_keys()
    log = server.log_path.read_text(errors="replace")
    for secret in (keys.admin_key, keys.writer_key, keys.internal, WRONG, "rotated-writer-key"):
        assert secret not in log
    assert os.stat(keys.dir).st_mode & 0o077 == 0


def test_health_check_needs_no_key(server):
    """tools/health_check.py (and the Kubernetes probes) read health, model readiness and metrics: none restricted."""
    import subprocess
    import sys

    from ragstack_dev.server import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "tools" / "health_check.py"), "--url", f"http://{server.http_url}",
                        "--metrics-url", server.metrics_url, "--models", "rag,ingest,vector_index,model_manager",
                        "--rounds", "1", "--timeout", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 2), r.stderr                  # 2: a threshold breached on a busy machine, still ready
    last = json.loads(r.stdout)["rounds"][-1]
    assert last["server"] and all(last["models"].values()), last
    assert "dead_stubs" in last.get("metrics", {}), last       # the metrics port answered without a key
