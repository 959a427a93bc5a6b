"""kill -9 of tritonserver in the middle of an ingest through the real `ingest` endpoint loses no acknowledged
document, for both stores, selected as the launcher selects them (RAG_VECTOR_STORE, and RAG_PG_DSN for pgvector).

Client threads ingest batches of new documents, replace some and delete some; every request's outcome is kept in a
ledger: an acknowledged request fixes each of its documents' state (present with the reported chunk count, or
absent), a request that failed (the kill caught it in flight) leaves each of its documents in the old state or the
new one. Mid-ingest the server is killed -9 together with its Python stubs (its process group: what a killed
container or pod does; the stubs are the processes that write). Then:

* pgvector: the database is still up, so the ledger is checked against it directly before Triton comes back;
* both: a new tritonserver starts on the same data (same folder, same DSN), the ledger is checked through its
  `vector_index` model, and it ingests again.

Its own servers (the session server is left alone); the tiny models, 3 models loaded: ~30-45 s per store.
"""
import collections
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from ragstack.lifecycle.procmem import stub_processes
from ragstack_dev.server import ROOT, TritonProcess
from tests.integration.helpers import infer, strings

pytestmark = pytest.mark.integration

MODELS = "embed vector_index ingest"
COLLECTION = "killtest"
CLIENTS = 4
BATCH = 3                          # new documents per upsert request
CHUNK_TOKENS = 32                  # small chunks: a replaced (longer) version has more of them
ANY = "present"                    # a state: present with any chunk count (a replace that may or may not have landed)
KILL_AFTER = {"created": 45, "replaced": 3, "deleted": 3}      # kill once this much is acknowledged ...
KILL_DEADLINE_S = 40                                           # ... or after this long
AT_LEAST = {"created": 10, "replaced": 1, "deleted": 1}        # and require at least this much


def version_text(doc_id: str, version: int) -> str:
    if version == 1:
        return f"Document {doc_id}, first version: the on-call engineer hands over the pager at nine."
    return " ".join(f"Document {doc_id}, second version, paragraph {k}: escalations go to the secondary "
                    f"after fifteen minutes without an acknowledgement." for k in range(6))


class Ledger:
    """For every document the states it may be in after the crash: a chunk count, None (absent) or ANY."""

    def __init__(self):
        self.lock = threading.Lock()
        self.allowed: dict[str, set] = {}
        self.acknowledged = collections.Counter()
        self.chunks = collections.defaultdict(set)       # status -> chunk counts acknowledged with it
        self.failures: list[tuple[float, str]] = []      # (monotonic time, error) of requests that failed
        self.wrong: list[dict] = []                      # acknowledged with a status other than the expected one

    def acknowledge(self, report: dict, expected_status: str) -> None:
        with self.lock:
            for d in report["documents"]:
                if d["status"] != expected_status:
                    self.wrong.append({**d, "expected": expected_status})
                self.allowed[d["doc_id"]] = {None} if expected_status == "deleted" else {d["chunks"]}
                self.acknowledged[expected_status] += 1
                self.chunks[expected_status].add(d["chunks"])

    def unfinished(self, doc_ids, target, error: str) -> None:
        """A request that got no answer: each document keeps its state or takes ``target``."""
        with self.lock:
            self.failures.append((time.monotonic(), error))
            for doc_id in doc_ids:
                self.allowed[doc_id] = self.allowed.get(doc_id, {None}) | {target}

    def mismatches(self, lookup) -> list:
        """``lookup(doc_id)`` -> chunk count or None; the documents whose state the ledger does not allow."""
        bad = []
        for doc_id, allowed in sorted(self.allowed.items()):
            found = lookup(doc_id)
            if not (found in allowed or (found is not None and ANY in allowed)):
                bad.append((doc_id, sorted(map(str, allowed)), found))
        return bad

    def doc_count_range(self) -> tuple[int, int]:
        surely = sum(1 for a in self.allowed.values() if None not in a)
        maybe = sum(1 for a in self.allowed.values() if a != {None})
        return surely, maybe


def ingest_call(client, op, doc_ids, texts=None):
    arrays = {"doc_ids": strings(doc_ids), "collection": strings([COLLECTION]), "op": strings([op]),
              "chunk_tokens": np.array([CHUNK_TOKENS], np.int32)}
    if texts is not None:
        arrays["texts"] = strings(texts)
    return json.loads(infer(("http", client), "ingest", arrays, ["report"])["report"].reshape(-1)[0])


def index_call(client, op, payload=None):
    arrays = {"op": strings([op]), "collection": strings([COLLECTION])}
    if payload is not None:
        arrays["payload"] = strings([json.dumps(payload)])
    return json.loads(infer(("http", client), "vector_index", arrays, ["result"])["result"].reshape(-1)[0])


def writer(url: str, worker: int, ledger: Ledger, stop: threading.Event) -> None:
    """Loop: upsert BATCH new documents; every 5th request replaces 2 of them, every 5th deletes 1. A document is
    touched by one request at a time and never again after a request on it failed."""
    client = httpclient.InferenceServerClient(url, network_timeout=60)     # one per thread (gevent)
    live, fresh, step = [], 0, 0
    try:
        while not stop.is_set():
            step += 1
            if step % 5 == 3 and len(live) >= 2:
                op, doc_ids, status, target = "upsert", [live.pop(0), live.pop(0)], "replaced", ANY
                texts = [version_text(d, 2) for d in doc_ids]
            elif step % 5 == 4 and live:
                op, doc_ids, status, target, texts = "delete", [live.pop(0)], "deleted", None, None
            else:
                doc_ids = [f"w{worker}-d{fresh + k}" for k in range(BATCH)]
                fresh += BATCH
                op, status, texts = "upsert", "created", [version_text(d, 1) for d in doc_ids]
                target = ANY
            try:
                report = ingest_call(client, op, doc_ids, texts)
            except Exception as e:  # noqa: BLE001 - the kill; anything else fails the test below
                ledger.unfinished(doc_ids, target, f"{type(e).__name__}: {e}")
                continue
            ledger.acknowledge(report, status)
            if status == "created":
                live.extend(doc_ids)
    except Exception as e:  # noqa: BLE001 - reported by the test
        ledger.wrong.append({"writer": worker, "crashed": repr(e)})
    finally:
        client.close()


def kill_server_group(server: TritonProcess) -> float:
    """SIGKILL tritonserver and its stubs; returns when all are gone."""
    pid = server.proc.pid                      # the launcher execs tritonserver in its own session
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver"
    stubs = [s.pid for s in stub_processes(pid)]
    assert stubs, "no Python stubs under tritonserver"
    t_kill = time.monotonic()
    os.killpg(pid, signal.SIGKILL)
    for stub in stubs:                         # in case a stub is not in the group
        try:
            os.kill(stub, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(15)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in stubs):
        time.sleep(0.1)
    assert not any(_alive(p) for p in stubs), "a stub outlived its killed server"
    server.stop()
    return t_kill


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def chunks_via_triton(client):
    def lookup(doc_id):
        doc = index_call(client, "get", {"doc_id": doc_id})["document"]
        return None if doc is None else doc["chunks"]
    return lookup


@pytest.mark.timeout(600)
@pytest.mark.parametrize("store", ["flat", "pgvector"])
def test_kill_9_of_tritonserver_mid_ingest_loses_no_acknowledged_document(tiny_models, store):
    folder = Path(tempfile.mkdtemp(prefix=f"ragstack-kill-{store}-"))
    folder.chmod(0o755)                        # as root, Postgres runs as another user that must reach pgdata
    env = {"RAG_DATA_PATH": str(folder / "data"), "RAG_VECTOR_STORE": store}
    postgres = None
    if store == "pgvector":                    # a database of its own that outlives the Triton server
        from ragstack.index.pgserver import LocalPostgres
        postgres = LocalPostgres(folder / "pgdata").start()
        env["RAG_PG_DSN"] = postgres.dsn
    log = ROOT / "build" / "logs" / f"integration-ingest-kill-{store}"
    ledger, stop = Ledger(), threading.Event()
    server = TritonProcess(tiny_models, load_models=MODELS, log_path=Path(f"{log}-1.log"), env=env)
    try:
        server.start()
        threads = [threading.Thread(target=writer, args=(server.http_url, w, ledger, stop), daemon=True)
                   for w in range(CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + KILL_DEADLINE_S
        while time.monotonic() < deadline and any(ledger.acknowledged[k] < n for k, n in KILL_AFTER.items()):
            time.sleep(0.2)
        stop.set()                             # no new request after the kill; the ones in flight meet it
        t_kill = kill_server_group(server)
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a client request never ended"

        acknowledged = dict(ledger.acknowledged)
        early = [e for t, e in ledger.failures if t < t_kill]
        assert not early, f"requests failed before the kill: {early[:3]}"
        assert not ledger.wrong, f"unexpected statuses: {ledger.wrong[:3]}"
        assert ledger.failures, "no request was in flight when the server was killed"
        assert all(acknowledged.get(k, 0) >= n for k, n in AT_LEAST.items()), f"too little ingested: {acknowledged}"
        # a replaced document's chunk count tells its second version from its first
        assert min(ledger.chunks["replaced"]) > max(ledger.chunks["created"]), dict(ledger.chunks)
        surely, maybe = ledger.doc_count_range()

        if postgres is not None:               # the database stayed up: what the dead server committed is there
            from ragstack.index.pgvector import PgVectorStore
            direct = PgVectorStore(postgres.dsn)
            try:
                def direct_lookup(doc_id):
                    doc = direct.get(COLLECTION, doc_id)
                    return None if doc is None else len(doc["chunks"])
                bad = ledger.mismatches(direct_lookup)
                assert not bad, f"in Postgres after the kill (doc, allowed, found): {bad[:5]} of {len(bad)}"
                assert surely <= direct.stats(COLLECTION)["docs"] <= maybe
            finally:
                direct.close()

        with TritonProcess(tiny_models, load_models=MODELS, log_path=Path(f"{log}-2.log"), env=env) as again, \
                httpclient.InferenceServerClient(again.http_url, network_timeout=60) as client:
            bad = ledger.mismatches(chunks_via_triton(client))
            assert not bad, f"after the restart (doc, allowed, found): {bad[:5]} of {len(bad)}; acked {acknowledged}"
            docs = index_call(client, "stats")["docs"]
            assert surely <= docs <= maybe, (surely, docs, maybe)
            # and the recovered store takes writes again
            report = ingest_call(client, "upsert", ["after-restart"], [version_text("after-restart", 1)])
            assert report["documents"][0]["status"] == "created"
            assert index_call(client, "stats")["docs"] == docs + 1
        print(f"{store}: acknowledged {acknowledged}, {len(ledger.failures)} requests cut by the kill, "
              f"{docs} documents after the restart (allowed {surely}..{maybe})")
    finally:
        stop.set()
        server.stop()
        if postgres is not None:
            postgres.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
