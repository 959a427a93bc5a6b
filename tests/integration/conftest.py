"""One real tritonserver for the whole integration session, on the tiny model set, over loopback."""
import contextlib
import json
import os
from pathlib import Path

import pytest

from ragstack_dev.model_builders import build_tiny, is_built
from ragstack_dev.server import ROOT, TritonProcess

TINY = ROOT / "build" / "models" / "tiny"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    if not is_built(TINY):
        build_tiny(TINY)
    return TINY


class WebhookReceiver:
    """A readiness-webhook receiver on loopback: keeps every JSON body POSTed to it."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                import json

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def events(self, name):
        return [e for e in self.received if e.get("event") == name]


@contextlib.contextmanager
def private_server(models: Path, tmp_path_factory, name: str, **env):
    """A server of a test module's own (tests that kill stubs or load it hard must not disturb the others):
    a fresh data folder, its log in build/logs/<name>.log."""
    data = tmp_path_factory.mktemp(name)
    proc = TritonProcess(models, log_path=ROOT / "build" / "logs" / f"{name}.log",
                         env={"RAG_DATA_PATH": str(data), **env})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.httpd.shutdown()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rag-data")            # a fresh vector index and event log per session


@pytest.fixture(scope="session")
def server(tiny_models, data_dir, webhook):
    # The answer task's abstention threshold is calibrated for the demo reranker; the tiny models' random one
    # scores below it at random, and the policy tests need answers that were generated. The quote task keeps
    # its threshold (test_rag tolerates either outcome there).
    policy = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    policy["tasks"]["answer"].pop("abstain_below_rerank", None)
    # test_rag's long answers must outlast a short query's whole pipeline on a loaded 2-core machine by far:
    # a 512-token cap allowed a 600-character essay, which a loaded CI run generated as fast as a short query.
    policy["tasks"]["generate_json"]["max_tokens"] = 1900
    (data_dir / "policy.json").write_text(json.dumps(policy))
    env = {"RAG_DATA_PATH": str(data_dir), "RAGSTACK_EVENT_WEBHOOK_URL": webhook.url,
           "TRITON_TRACE_FILE": str(data_dir / "trace.json"), "RAG_POLICY_FILE": str(data_dir / "policy.json")}
    proc = TritonProcess(tiny_models, load_models=os.environ.get("TEST_LOAD_MODELS", "*"),
                         log_path=ROOT / "build" / "logs" / "integration.log", env=env)
    proc.start()
    _settle_manager(proc)
    yield proc
    proc.stop()


def _settle_manager(proc) -> None:
    """Wait until model_manager (when loaded) has taken over the engines Triton loaded at start. Its first load
    attempts can run before the server listens; one refused there leaves the engine 'failed' for retry_after_s, and
    a lease asked for in that window is UNAVAILABLE (a start-up race of the lifecycle manager, not of the tests)."""
    import tritonclient.http as httpclient

    from ragstack.lifecycle.client import ManagerClient
    from ragstack_dev.server import access_keys

    with httpclient.InferenceServerClient(proc.http_url) as h:
        if not h.is_model_ready("model_manager"):
            return
    with ManagerClient(proc.http_url, api_key=access_keys().admin_key) as mc:
        mc.wait(lambda s: all(m["state"] == "ready" for m in s["models"].values()), timeout_s=180)


@pytest.fixture(scope="session")
def http(server):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(server.http_url, concurrency=8, network_timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def grpc(server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


@pytest.fixture(params=["http", "grpc"])
def client(request):
    """Each test that takes `client` runs once over HTTP and once over gRPC."""
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def identity(tiny_models) -> dict:
    """The engine-identity headers the policy requires on the rag endpoint, from the served manifest."""
    from ragstack.governance.manifest import read_manifest

    return read_manifest(tiny_models / "generate").headers()


CORPUS = sorted((ROOT / "data" / "corpus").glob("*.md"))


def ingest(client_pair, doc_ids, texts=None, collection="corpus", op="upsert"):
    import json

    from tests.integration.helpers import infer, strings

    arrays = {"doc_ids": strings(doc_ids), "collection": strings([collection]), "op": strings([op])}
    if texts is not None:
        arrays["texts"] = strings(texts)
    return json.loads(infer(client_pair, "ingest", arrays, ["report"])["report"].reshape(-1)[0])


@pytest.fixture(scope="session")
def corpus(http):
    """The bundled corpus, ingested once into collection 'corpus'."""
    report = ingest(("http", http), [p.stem for p in CORPUS], [p.read_text() for p in CORPUS])
    assert [d["status"] for d in report["documents"]] == ["created"] * len(CORPUS)
    return report
