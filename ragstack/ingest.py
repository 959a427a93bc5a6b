"""Document ingestion as plain Python: validate → chunk (token-aware) → embed in batches → upsert / delete.

The Triton ``ingest`` model wires ``embed`` (BLS to the embed engine) and ``index`` (BLS to the one
``vector_index`` process); the same function runs in-process in tests and tools.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Callable, Optional

from ragstack import json_input
from ragstack.errors import InvalidInput

log = logging.getLogger("ragstack.ingest")
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
MAX_DOCUMENTS = 256
OPS = ("upsert", "delete")


@dataclasses.dataclass
class Document:
    doc_id: str
    text: Optional[str]
    metadata: dict

    def content_hash(self, settings: dict) -> str:
        """Covers everything that shapes the stored chunks: text, metadata, chunking and embedder settings."""
        body = json.dumps({"text": self.text, "metadata": self.metadata, "settings": settings}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()


def parse_documents(op: str, doc_ids: list, texts: Optional[list], metadata: Optional[list]) -> list:
    if op not in OPS:
        raise InvalidInput(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if not doc_ids:
        raise InvalidInput("doc_ids is empty")
    if len(doc_ids) > MAX_DOCUMENTS:
        raise InvalidInput(f"at most {MAX_DOCUMENTS} documents per request, got {len(doc_ids)}")
    if len(set(doc_ids)) != len(doc_ids):
        raise InvalidInput("doc_ids has duplicates")
    for i, doc_id in enumerate(doc_ids):
        if not doc_id.strip() or len(doc_id) > 256 or "#" in doc_id:
            raise InvalidInput(f"doc_ids[{i}] {doc_id!r} must be 1-256 characters without '#'")
    if op == "delete":
        return [Document(d, None, {}) for d in doc_ids]
    if texts is None or len(texts) != len(doc_ids):
        raise InvalidInput(f"upsert needs one text per doc_id ({len(doc_ids)}), got "
                           f"{0 if texts is None else len(texts)}")
    if metadata is not None and len(metadata) != len(doc_ids):
        raise InvalidInput(f"metadata must have one JSON object per doc_id ({len(doc_ids)}), got {len(metadata)}")
    docs = []
    for i, (doc_id, text) in enumerate(zip(doc_ids, texts)):
        if not text.strip():
            raise InvalidInput(f"document {doc_id!r} is empty")
        size = len(text.encode("utf-8"))
        if size > MAX_DOCUMENT_BYTES:
            raise InvalidInput(f"document {doc_id!r} is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}")
        meta = {}
        if metadata is not None and metadata[i].strip():
            meta = json_input.loads(metadata[i], f"metadata for {doc_id!r}", expect=dict)
        docs.append(Document(doc_id, text, meta))
    return docs


def ingest(op: str, collection: str, docs: list, *, chunk: Callable, embed: Callable, index: Callable,
           settings: dict, progress: Optional[Callable] = None) -> dict:
    """Apply ``op`` to ``docs``. ``chunk(text) -> [Chunk]``; ``embed([text]) -> [n, dim]``;
    ``index(op, payload, vectors) -> dict``. Each document is acknowledged only once the index has stored it;
    a document whose content hash (text, metadata, ``settings``) is already stored is not embedded again."""
    report = []
    for n, doc in enumerate(docs, 1):
        if op == "delete":
            result = index("delete", {"doc_id": doc.doc_id}, None)
            report.append({"doc_id": doc.doc_id, "status": "deleted" if result.get("removed") else "not_found",
                           "chunks": int(result.get("removed", 0))})
        else:
            content_hash = doc.content_hash(settings)
            stored = index("get", {"doc_id": doc.doc_id}, None).get("document")
            if stored is not None and stored["content_hash"] == content_hash:
                report.append({"doc_id": doc.doc_id, "status": "unchanged", "chunks": stored["chunks"]})
            else:
                chunks = chunk(doc.text)
                vectors = embed([c.text for c in chunks])
                payload = {"doc_id": doc.doc_id, "content_hash": content_hash, "doc_metadata": doc.metadata,
                           "chunks": [c.to_dict() for c in chunks]}
                result = index("upsert", payload, vectors)
                report.append({"doc_id": doc.doc_id, "status": result["status"], "chunks": len(chunks)})
        if progress is not None:
            progress(f"{op} {n}/{len(docs)} {doc.doc_id}: {report[-1]['status']}, {report[-1]['chunks']} chunks")
    return {"collection": collection, "op": op, "documents": report}
