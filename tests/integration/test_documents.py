"""Docling inside Triton, end to end: generated PDF / DOCX / HTML / PPTX files → `ingest` (which calls `docling`
over BLS) → structure-aware chunks in the index; a question about a fact in the PDF's table finds that table's
chunk with its page number. Bad files (corrupt or encrypted PDF, empty, unknown type, 100 MB) are INVALID_ARG and
leave nothing behind.

This module runs its own small server on the demo models (the real all-MiniLM-L6-v2 embedder: retrieval must be
semantic here, which the tiny random embedder is not), loading only the models ingest and search need."""
import json
import os

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from ragstack_dev.server import ROOT, TritonProcess, access_keys
from tests import docgen
from tests.integration.helpers import infer, is_invalid_arg, strings

DEMO = ROOT / "build" / "models" / "demo"
MODELS = "embed embed_text vector_index docling ingest"
COLLECTION = "docs"


@pytest.fixture(scope="module")
def doc_server(tmp_path_factory):
    if not (DEMO / "embed" / "engine.json").exists():
        pytest.skip("demo models not built (tools/build_models.py demo)")
    proc = TritonProcess(DEMO, load_models=MODELS, log_path=ROOT / "build" / "logs" / "integration-documents.log",
                         env={"RAG_DATA_PATH": str(tmp_path_factory.mktemp("doc-data"))})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def grpc(doc_server):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(doc_server.grpc_url) as client:
        yield ("grpc", client)


@pytest.fixture(scope="module")
def http(doc_server):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(doc_server.http_url, network_timeout=120) as client:
        yield ("http", client)


def ingest_files(pair, files: dict, collection=COLLECTION):
    """files: {doc_id: (file name, bytes)} in one request."""
    ids = list(files)
    arrays = {"doc_ids": strings(ids), "collection": strings([collection]),
              "files": np.array([files[i][1] for i in ids], dtype=object),
              "file_names": strings([files[i][0] for i in ids])}
    return json.loads(infer(pair, "ingest", arrays, ["report"])["report"].reshape(-1)[0])


def search(pair, query, collection=COLLECTION, top_k=3):
    vec = infer(pair, "embed_text", {"text": strings([[query]]), "input_type": strings([["query"]])},
                ["embedding"])["embedding"].reshape(-1).astype(np.float32)
    out = infer(pair, "vector_index", {"op": strings(["search"]), "collection": strings([collection]),
                                       "query_vector": vec, "top_k": np.array([top_k], dtype=np.int32)}, ["result"])
    return json.loads(out["result"].reshape(-1)[0])["hits"]


def stats(pair, collection):
    out = infer(pair, "vector_index", {"op": strings(["collections"])}, ["result"])
    return json.loads(out["result"].reshape(-1)[0])


def test_docling_model_converts_each_format(grpc):
    for name, data in (("m.pdf", docgen.pdf()), ("h.docx", docgen.docx()), ("s.pptx", docgen.pptx()),
                       ("p.html", docgen.html()), ("b.xlsx", docgen.xlsx())):
        out = infer(grpc, "docling", {"data": np.array([data], dtype=object), "file_name": strings([name])})
        doc = json.loads(out["document"].reshape(-1)[0])
        assert doc["schema_name"] == "DoclingDocument" and doc["texts"] or doc["tables"], name
        assert out["markdown"].reshape(-1)[0].strip(), name
    md = infer(grpc, "docling", {"data": np.array([docgen.html()], dtype=object),
                                 "mime_type": strings(["text/html"])})["markdown"].reshape(-1)[0].decode()
    assert "| North" in md and "# Bike policy" in md


def test_batch_of_documents_and_the_table_fact_comes_back_with_its_page(grpc):
    pdf = docgen.pdf()          # reportlab stamps each build with its time: the bytes are kept for the re-ingest
    report = ingest_files(grpc, {"manual": ("fleet-manual.pdf", pdf),
                                 "handbook": ("handbook.docx", docgen.docx()),
                                 "policy": ("bike-policy.html", docgen.html()),
                                 "review": ("review.pptx", docgen.pptx()),
                                 "notes": ("notes.md", b"# Notes\n\nThe coffee machine is descaled on Fridays.\n")})
    assert [d["status"] for d in report["documents"]] == ["created"] * 5, report
    assert all(d["chunks"] >= 1 for d in report["documents"])
    hits = search(grpc, docgen.TABLE_QUESTION)
    top = hits[0]
    assert top["doc_id"] == "manual", hits
    assert docgen.TABLE_FACT[0] in top["text"] and docgen.TABLE_FACT[1] in top["text"], top
    meta = top["metadata"]
    assert meta["page"] == 2 and meta["pages"] == [2], meta          # the table is on page 2 of the PDF
    assert "Drone specifications" in meta["heading_path"], meta
    # DOCX / HTML tables stay whole, as Markdown, under their heading path.
    hits = search(grpc, "How many bicycle spaces does the north rack have?", top_k=5)
    table = next(h for h in hits if h["doc_id"] == "policy" and h["metadata"].get("kind") == "table")
    assert table["text"].startswith("| Rack") and "North" in table["text"]
    assert table["metadata"]["heading_path"] == "# Bike policy > ## Parking"
    # The same files again: unchanged, nothing converted or embedded twice.
    again = ingest_files(grpc, {"manual": ("fleet-manual.pdf", pdf)})
    assert again["documents"][0]["status"] == "unchanged"


def _bad(pair, files, fragment):
    with pytest.raises(InferenceServerException) as e:
        ingest_files(pair, files, collection="bad")
    assert is_invalid_arg(e.value), e.value
    assert fragment in str(e.value).lower(), e.value


def test_bad_files_are_invalid_arg_and_nothing_is_written(grpc, http):
    good = ("ok.docx", docgen.docx())
    corrupt = docgen.pdf()[:400] + b"\x00garbage" * 50
    for files, fragment in (
            ({"ok": good, "enc": ("secret.pdf", docgen.pdf(encrypt=True))}, "encrypted"),
            ({"ok": good, "bad": ("broken.pdf", corrupt)}, "could not be converted"),
            ({"ok": good, "fake": ("fake.pdf", b"this is not a pdf at all")}, "not a pdf"),
            ({"ok": good, "empty": ("empty.pdf", b"")}, "empty"),
            ({"ok": good, "what": ("data.xyz", b"some bytes")}, "unknown document type")):
        _bad(grpc, files, fragment)
    _bad(http, {"ok": good, "fake": ("fake.docx", b"plain words")}, "not a docx")
    # 100 MB: refused by ingest before any conversion; the server keeps serving.
    _bad(grpc, {"big": ("big.pdf", b"%PDF-1.4\n" + b"0" * (100 * 1024 * 1024))}, "limit")
    names = stats(grpc, "bad")
    assert "bad" not in json.dumps(names), names            # the good document of each batch was not written
    assert ingest_files(grpc, {"after": good}, collection="after")["documents"][0]["status"] == "created"


def test_rag_client_ingests_a_folder_in_batches_with_progress(doc_server, tmp_path, grpc):
    import subprocess
    import sys

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.html").write_bytes(docgen.html())
    (tmp_path / "b.docx").write_bytes(docgen.docx())
    (tmp_path / "sub" / "c.md").write_text("# C\n\nThe lift is serviced in March.\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    cmd = [sys.executable, str(ROOT / "tools" / "rag_client.py"), "--url", doc_server.http_url,
           "--collection", "client", "ingest", str(tmp_path), "--batch-size", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_API_KEY")}
    # ingest is a writer operation (README "Security"): without a key every batch is refused, and said so
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "permission denied" in out.stderr, out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**env, "RAG_API_KEY": access_keys().writer_key})
    assert out.returncode == 0, out.stderr
    assert "[ingest 1/3]" in out.stderr and "[ingest 3/3]" in out.stderr, out.stderr
    assert "3 documents" in out.stderr, out.stderr
