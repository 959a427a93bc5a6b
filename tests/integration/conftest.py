"""One real tritonserver for the whole integration session, on the tiny model set, over loopback."""
import os
from pathlib import Path

import pytest

from ragstack.model_builders import build_tiny, is_built
from ragstack.server import ROOT, TritonProcess

TINY = ROOT / "build" / "models" / "tiny"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    if not is_built(TINY):
        build_tiny(TINY)
    return TINY


@pytest.fixture(scope="session")
def server(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("rag-data")            # a fresh vector index per test session
    proc = TritonProcess(tiny_models, load_models=os.environ.get("TEST_LOAD_MODELS", "*"),
                         log_path=ROOT / "build" / "logs" / "integration.log", env={"RAG_DATA_PATH": str(data)})
    proc.start()
    yield proc
    proc.stop()


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
