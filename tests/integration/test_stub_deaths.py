"""kill -9 of each kind of Python stub under traffic: the requests in flight end within seconds, the model is back
within seconds, and no acknowledged document is lost.

Triton 2.51 neither restarts a dead Python stub nor answers the requests it held; the stack does both: an
orchestrator or text model's execute() returns only when its requests are answered (so Triton fails the ones a
dead stub held), a BLS parent watches the stubs of a decoupled child it streams from, and ``model_manager``
reloads any Python model whose stub died. Its own server: killing stubs must not disturb the other tests.
"""
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

from ragstack.lifecycle.procmem import stub_processes
from ragstack_dev.soak import pid_alive
from tests.integration.conftest import CORPUS, private_server
from tests.integration.helpers import infer, stream, strings

pytestmark = pytest.mark.integration
# Bounds that tell "ends / comes back" from "hangs / never comes back", not speed targets: on a 2-core machine
# shared with other jobs a heal of generate took 11-12 s (4 s when the machine is otherwise idle).
IN_FLIGHT_LIMIT_S = 20.0      # a request in flight when its stub dies ends within this
BACK_LIMIT_S = float(os.environ.get("STUB_HEAL_LIMIT_S", "30"))   # the model serves again within this (tiny)


@pytest.fixture(scope="module")
def srv(tiny_models, tmp_path_factory):
    with private_server(tiny_models, tmp_path_factory, "stub-deaths") as proc:
        yield proc


@pytest.fixture(scope="module")
def identity_headers(tiny_models):
    from ragstack.governance.manifest import read_manifest

    return read_manifest(tiny_models / "generate").headers()


@pytest.fixture(scope="module")
def corpus_ingested(srv):
    with httpclient.InferenceServerClient(srv.http_url, network_timeout=120) as c:
        ingest(c, [p.stem for p in CORPUS], [p.read_text() for p in CORPUS])


def ingest(client, doc_ids, texts, collection="corpus"):
    out = infer(("http", client), "ingest", {"doc_ids": strings(doc_ids), "texts": strings(texts),
                                              "collection": strings([collection]), "op": strings(["upsert"])},
                ["report"])
    return json.loads(out["report"].reshape(-1)[0])


def rag_request(client, headers, query="How long is a primary on-call shift?"):
    arrays = {"query": strings([query]).reshape(1, 1), "collection": strings(["corpus"]).reshape(1, 1)}
    return infer(("http", client), "rag", arrays, ["answer"], headers=dict(headers))


def generate_text_request(grpc_url):
    return stream(grpc_url, "generate_text", {"prompt": strings(["Say something about shifts."]),
                                              "max_tokens": np.array([32], np.int32)}, timeout=60)


def get_document(client, collection, doc_id):
    out = infer(("http", client), "vector_index", {"op": strings(["get"]), "collection": strings([collection]),
                                                    "payload": strings([json.dumps({"doc_id": doc_id})])}, ["result"])
    return json.loads(out["result"].reshape(-1)[0])["document"]


class Traffic:
    """Client threads looping over one kind of request; every request's (start, end, ok, error) is kept."""

    def __init__(self, fn, threads=3):
        self.fn, self.records, self.stop = fn, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def _loop(self, i):
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.fn(i)
                ok, err = True, None
            except Exception as e:  # noqa: BLE001 - counted
                ok, err = False, str(e)
                time.sleep(0.2)
            with self.lock:
                self.records.append((t0, time.monotonic(), ok, err))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client request never ended"


def kill_one_stub(server_pid, model):
    stubs = [s for s in stub_processes(server_pid) if s.model == model]
    assert stubs, f"no stub of {model}"
    os.kill(stubs[0].pid, signal.SIGKILL)
    return time.monotonic(), stubs[0].pid


def server_state(srv) -> str:
    """For a failure message: is tritonserver alive, and the end of its log (CI shows only pytest's output)."""
    rc = srv.proc.poll()
    stubs = stub_processes(srv.proc.pid) if rc is None else []
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
    return (f"tritonserver {'alive' if rc is None else f'exited with {rc}'}, {len(stubs)} stubs "
            f"({sum(s.rss_bytes for s in stubs) / 2**20:.0f} MiB RSS: {sorted({s.model for s in stubs})}); machine "
            f"MemAvailable {meminfo.get('MemAvailable', '?').strip()}; "
            f"end of its log ({srv.log_path}):\n{srv.log_tail(80)}")


def wait_serving(fn, since, limit, srv):
    """Poll ``fn`` until it succeeds; return the seconds from ``since``."""
    deadline = since + limit + 30                 # keep polling past the limit so a failure says by how much
    last = None
    while time.monotonic() < deadline:
        try:
            fn()
            return time.monotonic() - since
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(0.2)
    raise AssertionError(f"not serving again {deadline - since:.0f} s after the kill: {last}\n{server_state(srv)}")


def in_flight_at(records, t_kill):
    return [r for r in records if r[0] < t_kill < r[1]]


@pytest.mark.parametrize("model", ["rag_orchestrator", "generate", "vector_index", "generate_text"])
def test_kill_9_of_a_stub_under_traffic(srv, corpus_ingested, identity_headers, model):
    server_pid = srv.proc.pid
    assert srv.proc.poll() is None, server_state(srv)
    local = threading.local()           # tritonclient.http (gevent) clients must not cross threads

    def client():
        if not hasattr(local, "http"):
            local.http = httpclient.InferenceServerClient(srv.http_url, network_timeout=60)
        return local.http
    acknowledged, counter = [], iter(range(10**6))

    if model == "generate_text":
        def request(i):
            generate_text_request(srv.grpc_url)
    elif model == "vector_index":
        def request(i):                        # queries and writes both go through the index
            if i == 0:
                n = next(counter)
                report = ingest(client(), [f"kill-doc-{n}"], [f"Kill test document number {n} about shifts."],
                                collection="killtest")
                assert report["documents"][0]["status"] in ("created", "unchanged")
                acknowledged.append(f"kill-doc-{n}")
            else:
                rag_request(client(), identity_headers)
    else:
        def request(i):
            rag_request(client(), identity_headers)

    status_client = httpclient.InferenceServerClient(srv.http_url, network_timeout=10)   # a stuck manager shows

    def heals():
        status = json.loads(infer(("http", status_client), "model_manager", {"op": strings(["status"])},
                                  ["result"])["result"].reshape(-1)[0])
        entry = status["models"].get(model) or status["watched"][model]
        return entry["heals"], entry["state"]

    def healed():
        count, state = heals()
        assert count >= 1 and state in ("ready", "watching"), (count, state)

    with Traffic(request) as traffic:
        time.sleep(3)
        t_kill, pid = kill_one_stub(server_pid, model)
        # back = the manager has replaced the dead instance (a surviving instance may answer before that)
        wait_serving(healed, t_kill, BACK_LIMIT_S, srv)
        back = wait_serving(lambda: request(1), t_kill, BACK_LIMIT_S, srv)
        # the traffic goes on until a request it sent after the heal has ended (a fixed 2 s was too short for
        # one rag request on a loaded 2-core machine), or 60 s: then the assertion below fails
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [r for r in traffic.records if r[0] > t_kill + back]:
            time.sleep(0.2)
    records = traffic.records
    hung = [r for r in in_flight_at(records, t_kill) if r[1] - t_kill > IN_FLIGHT_LIMIT_S]
    assert not hung, f"requests in flight when {model}'s stub {pid} died ended {[r[1] - t_kill for r in hung]} s later"
    assert back <= BACK_LIMIT_S, f"{model} served again only {back:.1f} s after the kill"
    late_failures = [r for r in records if r[0] > t_kill + back and not r[2]]
    assert not late_failures, f"requests failed after {model} was back: {late_failures[:3]}"
    assert any(r[2] for r in records if r[0] > t_kill + back), "no request succeeded after the heal"

    http = client()
    assert acknowledged or model != "vector_index", "no ingest was acknowledged during the test"
    missing = [d for d in acknowledged if get_document(http, "killtest", d) is None]
    assert not missing, f"acknowledged documents lost: {missing[:5]}"
    http.close()
    status_client.close()



STUB_EXIT_LIMIT_S = 15.0      # ragstack's exit_with_server: 1 s checks + 5 s grace, on a loaded machine


def test_no_stub_outlives_a_killed_server(srv, corpus_ingested, identity_headers):
    """kill -9 of tritonserver itself under streaming traffic: every stub is gone within seconds. Triton 2.51's
    own check deadlocks when the server dies during a stub-to-parent round trip (is_cancelled(), a send), and
    such a stub lived on holding its memory; ragstack.triton.adapter.exit_with_server ends it. Last in this
    module: it kills the module's server."""
    server_pid = srv.proc.pid
    stubs = stub_processes(server_pid)
    assert len(stubs) >= 8, f"{[s.model for s in stubs]}; {server_state(srv)}"
    local = threading.local()

    def request(i):
        if i % 2:
            generate_text_request(srv.grpc_url)
        else:
            if not hasattr(local, "http"):
                local.http = httpclient.InferenceServerClient(srv.http_url, network_timeout=30)
            rag_request(local.http, identity_headers)

    traffic = Traffic(request, threads=4)
    with traffic:
        time.sleep(4)
        os.kill(server_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        srv.proc.wait(10)
        deadline = t_kill + STUB_EXIT_LIMIT_S
        while time.monotonic() < deadline and any(pid_alive(s.pid) for s in stubs):
            time.sleep(0.25)
        survivors = [(s.model, s.pid) for s in stubs if pid_alive(s.pid)]
        for _, pid in survivors:             # do not leave them behind for the rest of the run
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"stubs alive {STUB_EXIT_LIMIT_S:.0f} s after tritonserver was killed: {survivors}"
