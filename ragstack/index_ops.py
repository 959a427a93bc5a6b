"""The vector_index model's operations over a VectorStore, as plain Python (JSON-able results)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ragstack.errors import InvalidInput

OPS = ("search", "upsert", "delete", "get", "stats", "collections")


def handle(store, op: str, collection: str, *, query_vector: Optional[np.ndarray] = None,
           top_k: Optional[int] = None, vectors: Optional[np.ndarray] = None, payload: Optional[dict] = None) -> dict:
    if op == "search":
        if query_vector is None or top_k is None:
            raise InvalidInput("search needs query_vector and top_k")
        return {"hits": store.search(collection, query_vector, int(top_k))}
    if op == "upsert":
        if payload is None or vectors is None:
            raise InvalidInput("upsert needs payload and vectors")
        return store.upsert(collection, payload["doc_id"], payload["chunks"], vectors,
                            payload.get("doc_metadata") or {}, payload["content_hash"])
    if op == "delete":
        if payload is None or "doc_id" not in payload:
            raise InvalidInput("delete needs payload.doc_id")
        return {"removed": store.delete(collection, payload["doc_id"])}
    if op == "get":
        if payload is None or "doc_id" not in payload:
            raise InvalidInput("get needs payload.doc_id")
        if collection not in store.collections():
            return {"document": None}
        doc = store.get(collection, payload["doc_id"])
        return {"document": None if doc is None else {"content_hash": doc["content_hash"], "chunks": len(doc["chunks"])}}
    if op == "stats":
        return store.stats(collection)
    if op == "collections":
        return {"collections": store.collections()}
    raise InvalidInput(f"unknown index op {op!r}; expected one of {', '.join(OPS)}")
