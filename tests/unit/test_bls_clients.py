"""The BLS clients of ragstack.triton.bls for the non-engine models: vector_index (index_op, search) and docling.

A fake Python backend serves `vector_index` the way its model.py does (the tensors read through the contract,
``index_ops.handle`` over a real flat-file store), so a request the client builds wrongly fails here.
"""
import json

import numpy as np
import pytest

from ragstack.triton import bls
from ragstack.contracts import tensors as contracts
from ragstack.index import ops as index_ops
from ragstack.triton import adapter as ta
from ragstack.index import FlatFileStore
from tests.unit.fake_pb import FakePb


@pytest.fixture
def index_pb(tmp_path):
    store = FlatFileStore(tmp_path / "store")
    C = contracts.VECTOR_INDEX

    def serve(model, inputs):
        assert model == "vector_index"
        for name, arr in inputs.items():       # each tensor as the contract declares it
            assert arr.dtype == C.input(name).np_dtype and arr.ndim == len(C.input(name).dims), name
        pb, request = FakePb(), inputs
        payload = ta.input_string(pb, request, C, "payload")
        result = index_ops.handle(store, ta.input_string(pb, request, C, "op"),
                                  ta.input_string(pb, request, C, "collection", "default"),
                                  query_vector=ta.input_array(pb, request, C, "query_vector"),
                                  top_k=ta.input_scalar(pb, request, C, "top_k"),
                                  vectors=ta.input_array(pb, request, C, "vectors"),
                                  payload=None if payload is None else json.loads(payload))
        return {"result": contracts.one_string(json.dumps(result))}
    return FakePb(serve)


def _chunk(i, text):
    return {"chunk_id": f"d1-{i}", "text": text, "index": i, "metadata": {}}


def test_upsert_then_search_through_the_vector_index_client(index_pb):
    vectors = np.eye(3, dtype=np.float64)[:2]           # float64 in: the client sends the contract's FP32
    payload = {"doc_id": "d1", "content_hash": "h1", "doc_metadata": {"title": "one"},
               "chunks": [_chunk(0, "alpha"), _chunk(1, "beta")]}
    assert bls.index_op(index_pb, "upsert", "docs", vectors=vectors, payload=payload)["status"] == "created"
    hits = bls.search(index_pb, "docs", [0.0, 1.0, 0.0], top_k=1)
    assert [h["text"] for h in hits] == ["beta"]
    assert bls.index_op(index_pb, "get", "docs", payload={"doc_id": "d1"})["document"]["chunks"] == 2
    assert [r.model for r in index_pb.requests] == ["vector_index"] * 3


def test_docling_gets_the_files_bytes_and_its_names_as_one_string_each():
    seen = {}

    def serve(model, inputs):
        seen.update(model=model, **{k: v.tolist() for k, v in inputs.items()})
        return {"document": contracts.one_string('{"name": "doc"}')}
    text = bls.convert_document(FakePb(serve), b"%PDF-1.7 raw", "a.pdf", None)
    assert text == '{"name": "doc"}'
    assert seen == {"model": "docling", "data": [b"%PDF-1.7 raw"], "file_name": [b"a.pdf"], "mime_type": [b""]}
