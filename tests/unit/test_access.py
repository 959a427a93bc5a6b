"""ragstack.governance.access: roles, constant-time key checks, key files re-read on change, the internal proof."""
import os

import pytest

from ragstack.governance import access
from ragstack.governance.access import KEY_HEADER, INTERNAL_HEADER, KeyStore, PermissionDenied


def test_roles_and_rotation(tmp_path):
    admin = tmp_path / "admin"
    admin.write_text("# comment\nadmin-1\n")
    keys = KeyStore({"RAG_ADMIN_KEY_FILE": str(admin), "RAG_WRITER_KEYS": "w1, w2"})
    assert keys.role_of("admin-1") == "admin" and keys.role_of("w2") == "writer"
    assert keys.role_of("nope") is None and keys.role_of("") is None and keys.role_of(None) is None
    access.require({KEY_HEADER: "w1"}, "writer", "ingest", keys)
    access.require({KEY_HEADER: "admin-1"}, "writer", "ingest", keys)     # admin opens writing too
    access.require({}, "reader", "rag", keys)                              # no reader keys: reading is open
    with pytest.raises(PermissionDenied) as e:
        access.require({KEY_HEADER: "w1"}, "admin", "model_manager op 'set_budget'", keys)
    assert "w1" not in str(e.value) and str(e.value).startswith("permission denied: ")
    with pytest.raises(PermissionDenied):
        access.require({}, "writer", "ingest", keys)
    # rotation: a new file content takes effect at the next check, the old key stops working
    admin.write_text("admin-2\n")
    os.utime(admin, ns=(1, 1))
    assert keys.role_of("admin-2") == "admin" and keys.role_of("admin-1") is None


def test_reader_keys_close_reading_and_no_key_configured_says_how():
    keys = KeyStore({"RAG_API_KEYS": "r1"})
    access.require({KEY_HEADER: "r1"}, "reader", "rag", keys)
    with pytest.raises(PermissionDenied, match="reader key"):
        access.require({KEY_HEADER: "bad"}, "reader", "rag", keys)
    with pytest.raises(PermissionDenied, match="none is configured"):
        access.require({KEY_HEADER: "r1"}, "admin", "model_manager", keys)


def test_internal_proof(tmp_path, monkeypatch):
    secret = tmp_path / "internal_secret"
    secret.write_text("s3cret\n")
    monkeypatch.setenv(access.SECRET_FILE_ENV, str(secret))
    monkeypatch.delenv(access.DIRECT_ENV, raising=False)
    access._secret_cache.clear()
    with pytest.raises(PermissionDenied, match="internal"):
        access.require_internal({}, "vector_index")
    with pytest.raises(PermissionDenied):
        access.require_internal({INTERNAL_HEADER: "guess"}, "vector_index")
    params = access.child_parameters({INTERNAL_HEADER: "forged", KEY_HEADER: "k", "x-engine-hash": "h"})
    assert params == {INTERNAL_HEADER: "s3cret", "x-engine-hash": "h"}     # the caller's key and forgery dropped
    access.require_internal(params, "vector_index")
    access.require_role(params, "admin", "model_manager")                  # a BLS parent passes role checks
    monkeypatch.setenv(access.DIRECT_ENV, "generate_text")
    access.require_internal({}, "generate_text")
    with pytest.raises(PermissionDenied):
        access.require_internal({}, "generate")


def test_denial_is_a_client_error():
    from ragstack.triton import adapter as ta

    class PB:
        class TritonError:
            INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

            def __init__(self, msg, code=None):
                self.msg, self.code = msg, code

        class InferenceResponse:
            def __init__(self, error=None):
                self.error = error

    r = ta.error_response(PB, PermissionDenied("ingest needs a writer key"))
    assert r.error.code == "INVALID_ARG" and "permission denied: ingest" in r.error.msg


# Where each Python model of the stack checks access (issue 16): a model added without a check would answer every
# client, so this list must name every Python-backend model folder. (module or model file, what it must call)
CHECKS = {
    "bls_models/docling": ("bls_models/docling/1/model.py", "access.require_internal("),
    "bls_models/embed_text": ("ragstack/triton/adapter.py", "require_internal(request.parameters()"),
    "bls_models/rerank_text": ("bls_models/rerank_text/1/model.py", "access.require_internal("),
    "bls_models/generate_text": ("bls_models/generate_text/1/model.py", "access.require_internal("),
    "bls_models/vector_index": ("bls_models/vector_index/1/model.py", "access.require_internal("),
    "bls_models/ingest": ("bls_models/ingest/1/model.py", 'access.require_role(request.parameters(), "writer"'),
    "bls_models/model_manager": ("bls_models/model_manager/1/model.py", 'access.require_role(request.parameters(), "admin"'),
    "bls_models/rag_orchestrator": ("ragstack/triton/orchestrator.py", 'access.require_role(request.parameters(), "reader"'),
    "bls_models/rag_stream_orchestrator": ("ragstack/triton/orchestrator.py",
                                           'access.require_role(request.parameters(), "reader"'),
    "model_repository/reference/embed": ("ragstack/triton/adapter.py", "require_internal(request.parameters()"),
    "model_repository/reference/rerank": ("ragstack/triton/adapter.py", "require_internal(request.parameters()"),
    "model_repository/reference/generate": ("model_repository/reference/generate/1/model.py",
                                            "access.require_internal("),
    "model_repository/trtllm/embed": ("ragstack/triton/adapter.py", "require_internal(request.parameters()"),
    "model_repository/trtllm/rerank": ("ragstack/triton/adapter.py", "require_internal(request.parameters()"),
}
# The models that reach their check through shared code, and the call that leads there.
VIA = {"bls_models/rag_orchestrator": "OrchestratorModel", "bls_models/rag_stream_orchestrator": "OrchestratorModel",
       "bls_models/embed_text": "ta.execute_token_batch(",
       "model_repository/reference/embed": "ta.execute_token_batch(", "model_repository/reference/rerank":
       "ta.execute_token_batch(", "model_repository/trtllm/embed": "TritonPlanModel(",
       "model_repository/trtllm/rerank": "TritonPlanModel("}


def test_every_python_model_checks_access():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    python_models = {str(p.parent.relative_to(root)) for repo in ("bls_models", "model_repository")
                     for p in (root / repo).rglob("config.pbtxt") if 'backend: "python"' in p.read_text()}
    assert python_models == set(CHECKS), python_models ^ set(CHECKS)
    for model, (source, call) in CHECKS.items():
        assert call in (root / source).read_text(), (model, source, call)
        if model in VIA:
            assert VIA[model] in (root / model / "1" / "model.py").read_text(), model
    assert "ta.execute_token_batch(" in (root / "ragstack" / "engines" / "trt_plan.py").read_text()
    # model_manager's loader (a model it creates from a file override) checks the proof inline
    assert "_check_internal(request)" in (root / "bls_models" / "model_manager" / "loader.py").read_text()
