"""vector_index on the pgvector store inside a real tritonserver, with the embedded Postgres that
tools/serve_triton.sh starts (RAG_VECTOR_STORE=pgvector, no RAG_PG_DSN) and stops with the server.

Its own tritonserver (only vector_index loaded), started twice: what the first acknowledged is there after a
restart of both Triton and Postgres."""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from ragstack_dev.server import ROOT, TritonProcess
from tests.integration.helpers import infer

pytestmark = pytest.mark.integration


def call(client, op, collection="pg", **inputs):
    tensors = {"op": np.array([op.encode()], dtype=object), "collection": np.array([collection.encode()], dtype=object)}
    if "payload" in inputs:
        tensors["payload"] = np.array([json.dumps(inputs.pop("payload")).encode()], dtype=object)
    tensors.update(inputs)
    out = infer(("http", client), "vector_index", tensors, ["result"])["result"]
    return json.loads(out.reshape(-1)[0])


def postgres_running(pgdata: Path) -> bool:
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def test_vector_index_on_the_embedded_pgvector_store(tiny_models):
    data = Path(tempfile.mkdtemp(prefix="ragstack-pgdata-"))
    data.chmod(0o755)                                   # the Postgres user (not root) must reach pgdata
    env = {"RAG_DATA_PATH": str(data), "RAG_VECTOR_STORE": "pgvector", "RAG_PG_DSN": ""}
    log = ROOT / "build" / "logs" / "integration-pgvector.log"
    vectors = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    payload = {"doc_id": "d1", "content_hash": "h1",
               "chunks": [{"text": f"chunk {i}", "metadata": {"page": i}} for i in range(3)]}
    try:
        with TritonProcess(tiny_models, load_models="vector_index", log_path=log, env=env) as server:
            client = httpclient.InferenceServerClient(server.http_url)
            assert postgres_running(data / "pgdata")
            assert call(client, "upsert", payload=payload, vectors=vectors)["status"] == "created"
            assert call(client, "upsert", payload=payload, vectors=vectors)["status"] == "unchanged"
            hits = call(client, "search", query_vector=vectors[2], top_k=np.array([2], np.int32))["hits"]
            assert [h["chunk_id"] for h in hits][0] == "d1#2" and hits[0]["metadata"] == {"page": 2}
            # Postgres full-text search through vector_index: the lexical list alone, and fused with the dense
            # one (RRF: only d1#1 holds the term "1", which lifts it over the dense favourite d1#2)
            for mode, expected in (("lexical", ["d1#1"]), ("hybrid", ["d1#1"])):
                hits = call(client, "search", query_vector=vectors[2], top_k=np.array([1], np.int32),
                            payload={"query_text": "1", "search": {"mode": mode}})["hits"]
                assert [h["chunk_id"] for h in hits] == expected and hits[0]["lexical_score"] > 0, mode
            assert call(client, "stats") == {"collection": "pg", "dim": 16, "docs": 1, "chunks": 3}
        deadline = time.monotonic() + 15
        while postgres_running(data / "pgdata") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not postgres_running(data / "pgdata"), "the launcher did not stop its Postgres"
        with TritonProcess(tiny_models, load_models="vector_index", log_path=log, env=env) as server:
            client = httpclient.InferenceServerClient(server.http_url)
            assert call(client, "get", payload={"doc_id": "d1"})["document"] == {"content_hash": "h1", "chunks": 3}
            assert call(client, "collections") == {"collections": ["pg"]}
    finally:
        from ragstack.index.pgserver import LocalPostgres
        if postgres_running(data / "pgdata"):
            LocalPostgres(data / "pgdata").stop("immediate")
        shutil.rmtree(data, ignore_errors=True)
