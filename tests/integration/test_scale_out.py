"""Scale-out on this machine (issue 15): two reference-profile replicas (tiny models, ingest + query path only)
on one embedded Postgres + pgvector over loopback TCP, behind haproxy from Debian with health checks.

One module-scoped deployment, four tests in order: shared store (ingest through the balancer, query each replica
and the balancer), access control through the balancer, the same document ingested through both replicas at once,
kill -9 of one replica under load. Keys (ragstack.governance.access): the replicas share this process's keys and internal
secret; requests send the operator's headers (admin key + internal proof) unless SCALE_OUT_HEADERS (JSON) says
otherwise; SCALE_OUT_REPLICA_ENV (JSON) is added to each replica's environment."""
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from ragstack_dev import scaleout as so

pytestmark = pytest.mark.integration

REPLICA_ENV = json.loads(os.environ.get("SCALE_OUT_REPLICA_ENV", "{}"))
HEADERS = json.loads(os.environ.get("SCALE_OUT_HEADERS", "{}")) or None


@pytest.fixture(scope="module")
def deployment(tiny_models):
    if so.haproxy_binary() is None:
        pytest.skip("haproxy is not installed (Debian package 'haproxy'; tools/setup.sh installs it)")
    from ragstack.index.pgserver import LocalPostgres

    work = Path(tempfile.mkdtemp(prefix="ragstack-scale-"))
    work.chmod(0o755)                                    # the Postgres user (not root) must reach pgdata
    pg = LocalPostgres(work / "pgdata", fsync=False).start()
    replicas = {}
    balancer = None
    try:
        for name in ("r1", "r2"):
            replicas[name] = so.replica(tiny_models, name, work / name, pg.dsn, env=REPLICA_ENV)
        # Start both at once (each loads its models in its own process; the machine has 2 cores).
        errors = []
        threads = [threading.Thread(target=lambda p=p: _start(p, errors)) for p in replicas.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        balancer = so.Haproxy([so.Backend(n, p.http_port, p.metrics_port) for n, p in replicas.items()], work,
                              inter_ms=300, fall=2, rise=2).start()
        balancer.wait_status({"r1": "UP", "r2": "UP"}, timeout=30)
        yield {"pg": pg, "replicas": replicas, "balancer": balancer, "work": work}
    finally:
        if balancer:
            balancer.stop()
        for p in replicas.values():
            p.stop()
            if p.proc is not None:
                so.reap(p)
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)


def _start(proc, errors):
    try:
        proc.start()
    except Exception as e:  # noqa: BLE001
        errors.append(e)


def clients(dep):
    out = {n: httpclient.InferenceServerClient(p.http_url, network_timeout=60) for n, p in dep["replicas"].items()}
    out["lb"] = httpclient.InferenceServerClient(dep["balancer"].url, network_timeout=60)
    return out


def test_any_replica_answers_over_documents_ingested_through_the_balancer(deployment):
    c = clients(deployment)
    docs = {f"shared-{i}": so.doc_text(f"shared-{i}") for i in range(4)}
    # Ingest through the balancer: round-robin spreads the four requests over both replicas.
    for doc, text in docs.items():
        assert so.ingest(c["lb"], [doc], [text], headers=HEADERS)["documents"][0]["status"] == "created"
    for name in ("r1", "r2", "lb"):
        assert so.missing_docs(c[name], docs, headers=HEADERS) == [], name
        hits = so.query(c[name], "replica shared-2 and shared storage", headers=HEADERS)
        assert hits and all(h["chunk_id"].split("#")[0] in docs for h in hits), (name, hits)
    # Re-ingesting through the other replica is a no-op (content hash), whichever replica answers.
    assert so.ingest(c["r2"], ["shared-0"], [docs["shared-0"]], headers=HEADERS)["documents"][0]["status"] == "unchanged"
    assert so.ingest(c["r1"], ["shared-1"], [docs["shared-1"]], headers=HEADERS)["documents"][0]["status"] == "unchanged"


def test_access_control_holds_through_the_balancer(deployment):
    """haproxy passes the key headers on unchanged: each replica checks them as if called directly."""
    from tritonclient.utils import InferenceServerException

    from ragstack_dev.server import access_keys

    c = clients(deployment)
    for name in ("lb", "r1", "r2"):
        for headers in ({}, {"x-api-key": "not-a-key"}):
            with pytest.raises(InferenceServerException) as e:
                so.ingest(c[name], ["acl-lb"], [so.doc_text("acl-lb")], headers=headers)
            assert str(e.value.status()) == "400" and "permission denied" in str(e.value), (name, e.value)
            assert "not-a-key" not in str(e.value)
        with pytest.raises(InferenceServerException) as e:       # an internal model, without the proof
            so.index_op(c[name], "get", payload={"doc_id": "shared-0"}, headers={"x-api-key": access_keys().admin_key})
        assert "permission denied" in str(e.value) and "internal" in str(e.value), (name, e.value)
    report = so.ingest(c["lb"], ["acl-lb"], [so.doc_text("acl-lb")], headers={"x-api-key": access_keys().writer_key})
    assert report["documents"][0]["status"] == "created"


def test_the_same_document_ingested_through_both_replicas_at_once(deployment):
    c = clients(deployment)
    text = " ".join(so.doc_text("race") for _ in range(20))        # several chunks: a torn write would show
    results = {}
    for rnd in range(3):
        doc = f"race-{rnd}"
        barrier = threading.Barrier(2)

        def go(name, barrier=barrier, rnd=rnd, doc=doc):
            client = httpclient.InferenceServerClient(deployment["replicas"][name].http_url, network_timeout=60)
            barrier.wait()
            results[(rnd, name)] = so.ingest(client, [doc], [text], headers=HEADERS)["documents"][0]
        threads = [threading.Thread(target=go, args=(n,)) for n in ("r1", "r2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(results[(rnd, n)]["status"] for n in ("r1", "r2"))
        assert statuses == ["created", "unchanged"], statuses        # serialised by the advisory lock
        got = so.index_op(c["lb"], "get", payload={"doc_id": doc}, headers=HEADERS)["document"]
        assert got["chunks"] == results[(rnd, "r1")]["chunks"] == results[(rnd, "r2")]["chunks"]


def test_kill_one_replica_under_load_the_balancer_routes_around_it(deployment):
    dep = deployment
    report = so.kill_drill(dep["balancer"], dep["replicas"]["r2"], "r2", clients=4, duration=12, kill_after=4,
                           headers=HEADERS)
    so.reap(dep["replicas"]["r2"])
    summary = {k: v for k, v in report.items() if k not in ("acked", "events")}
    print(json.dumps(summary))
    # No acknowledged document lost: each one is in the shared store, seen through the survivor and the balancer.
    survivor = httpclient.InferenceServerClient(dep["replicas"]["r1"].http_url, network_timeout=60)
    assert report["acked"] and so.missing_docs(survivor, report["acked"], headers=HEADERS) == []
    lb = httpclient.InferenceServerClient(dep["balancer"].url, network_timeout=60)
    assert so.missing_docs(lb, report["acked"][:10], headers=HEADERS) == []
    # Failures bounded during detection (at most the requests in flight on the victim), none after it.
    assert report["failed_after_detection"] == 0, summary
    assert report["ok_after_detection"] > 0, summary
    assert report["failed_during_detection"] <= 4, summary
    assert report["detect_s"] < 5, summary
