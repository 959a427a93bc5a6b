"""The vector_index model's operations over a VectorStore, as plain Python (JSON-able results)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ragstack.contracts.errors import InvalidInput

OPS = ("search", "upsert", "delete", "get", "stats", "collections")


def _field(payload: Optional[dict], name: str, op: str):
    """payload[name], or InvalidInput naming what ``op`` is missing. The value itself is the store's to check."""
    if payload is None or name not in payload:
        raise InvalidInput(f"{op} needs payload.{name}")
    return payload[name]


def handle(store, op: str, collection: str, *, query_vector: Optional[np.ndarray] = None,
           top_k: Optional[int] = None, vectors: Optional[np.ndarray] = None, payload: Optional[dict] = None) -> dict:
    if payload is not None and not isinstance(payload, dict):
        raise InvalidInput(f"payload must be a JSON object, got {type(payload).__name__}")
    if op == "search":
        if query_vector is None or top_k is None:
            raise InvalidInput("search needs query_vector and top_k")
        if payload and ("search" in payload or "query_text" in payload):
            # lexical / hybrid search (ragstack/index/lexical.py): the query's text and the search spec
            return {"hits": store.search(collection, query_vector, int(top_k), query_text=payload.get("query_text"),
                                         search=payload.get("search"))}
        return {"hits": store.search(collection, query_vector, int(top_k))}
    if op == "upsert":
        if vectors is None:
            raise InvalidInput("upsert needs vectors")
        return store.upsert(collection, _field(payload, "doc_id", op), _field(payload, "chunks", op), vectors,
                            payload.get("doc_metadata") or {}, _field(payload, "content_hash", op))
    if op == "delete":
        return {"removed": store.delete(collection, _field(payload, "doc_id", op))}
    if op == "get":
        doc_id = _field(payload, "doc_id", op)
        if collection not in store.collections():
            return {"document": None}
        doc = store.get(collection, doc_id)
        return {"document": None if doc is None else {"content_hash": doc["content_hash"], "chunks": len(doc["chunks"])}}
    if op == "stats":
        return store.stats(collection)
    if op == "collections":
        return {"collections": store.collections()}
    raise InvalidInput(f"unknown index op {op!r:.100}; expected one of {', '.join(OPS)}")
