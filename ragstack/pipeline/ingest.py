"""Document ingestion as plain Python: validate → chunk (token-aware) → embed in batches → upsert / delete.

The Triton ``ingest`` model wires ``embed`` (BLS to the embed engine) and ``index`` (BLS to the one
``vector_index`` process); the same function runs in-process in tests and tools.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np

from ragstack.contracts import json_input
from ragstack.contracts.errors import InvalidInput

log = logging.getLogger("ragstack.pipeline.ingest")
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
MAX_DOCUMENTS = 256
# Files (bytes) in one request, all together: each is also held to ragstack.pipeline.documents.MAX_FILE_BYTES (50 MB).
MAX_REQUEST_FILE_BYTES = 64 * 1024 * 1024
# Texts of one request, all together (issue 16: 256 documents of 2 MiB would be 512 MiB), and one document's metadata.
MAX_REQUEST_TEXT_BYTES = 64 * 1024 * 1024
MAX_METADATA_CHARS = 64 * 1024
# Chunk texts per embed() call in a batched ingest (embed() itself splits them into the engine's batches).
EMBED_CALL_TEXTS = 256
OPS = ("upsert", "delete")


@dataclasses.dataclass
class Document:
    doc_id: str
    text: str | None
    metadata: dict
    file: bytes | None = None        # a file for Docling (PDF, DOCX, PPTX, XLSX, HTML) instead of text
    file_name: str = ""
    mime_type: str = ""
    fmt: str = "txt"

    def content_hash(self, settings: dict) -> str:
        """Covers everything that shapes the stored chunks: text (or file bytes), metadata, chunking and embedder
        settings."""
        body = {"text": self.text, "metadata": self.metadata, "settings": settings}
        if self.file is not None:
            body["file_sha256"] = hashlib.sha256(self.file).hexdigest()
            body["fmt"] = self.fmt
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def parse_documents(op: str, doc_ids: list, texts: list | None, metadata: list | None,
                    files: list | None = None, file_names: list | None = None,
                    mime_types: list | None = None) -> list:
    """Validate a request's documents before anything is read or written. Upsert takes ``texts`` or ``files``
    (raw bytes, with ``file_names`` and/or ``mime_types`` saying the type): text and Markdown files go the
    plain-text way, other types through Docling. Every document is checked first (type, size, emptiness, an
    encrypted or non-PDF "PDF"), so one bad file refuses the whole request and nothing is written."""
    from ragstack.pipeline import documents as dl

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
    if texts is not None and files is not None:
        raise InvalidInput("give either texts or files, not both")
    given = texts if texts is not None else files
    if given is None or len(given) != len(doc_ids):
        raise InvalidInput(f"upsert needs one text or file per doc_id ({len(doc_ids)}), got "
                           f"{0 if given is None else len(given)}")
    if metadata is not None and len(metadata) != len(doc_ids):
        raise InvalidInput(f"metadata must have one JSON object per doc_id ({len(doc_ids)}), got {len(metadata)}")
    for what, values in (("file_names", file_names), ("mime_types", mime_types)):
        if values is not None and len(values) != len(doc_ids):
            raise InvalidInput(f"{what} must have one entry per doc_id ({len(doc_ids)}), got {len(values)}")
    docs = []
    total = text_total = 0
    for i, doc_id in enumerate(doc_ids):
        meta = {}
        if metadata is not None and metadata[i].strip():
            meta = json_input.loads(metadata[i], f"metadata for {doc_id!r}", expect=dict)
            if len(metadata[i]) > MAX_METADATA_CHARS:
                raise InvalidInput(f"metadata for {doc_id!r} is {len(metadata[i])} characters; the limit is "
                                   f"{MAX_METADATA_CHARS}")
        file, name, mime, fmt, text = None, "", "", "txt", None
        if files is not None:
            file = files[i] if isinstance(files[i], bytes) else bytes(files[i])
            name = file_names[i] if file_names is not None else ""
            mime = mime_types[i] if mime_types is not None else ""
            fmt = dl.detect_format(name, mime)
            dl.check_file(file, fmt, f"document {doc_id!r} ({name or mime})")
            total += len(file)
            if fmt in dl.TEXT_FORMATS:
                try:
                    text = file.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidInput(f"document {doc_id!r} ({name}) is not UTF-8 text "
                                       f"({e.reason} at byte {e.start})") from None
                file = None
            else:
                meta.setdefault("file_name", name)
                meta.setdefault("format", fmt)
        else:
            text = texts[i]
        if text is not None:
            if not text.strip():
                raise InvalidInput(f"document {doc_id!r} is empty")
            size = len(text.encode("utf-8"))
            if size > MAX_DOCUMENT_BYTES:
                raise InvalidInput(f"document {doc_id!r} is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}")
            text_total += size
        docs.append(Document(doc_id, text, meta, file, name, mime, fmt))
    if text_total > MAX_REQUEST_TEXT_BYTES:
        raise InvalidInput(f"the texts of one request total {text_total} bytes; the limit is {MAX_REQUEST_TEXT_BYTES} "
                           "(send fewer per request)")
    if total > MAX_REQUEST_FILE_BYTES:
        raise InvalidInput(f"the files of one request total {total} bytes; the limit is {MAX_REQUEST_FILE_BYTES} "
                           "(send fewer per request)")
    return docs


def ingest(op: str, collection: str, docs: list, *, chunk: Callable, embed: Callable, index: Callable,
           settings: dict, progress: Callable | None = None, chunk_file: Callable | None = None,
           embed_batch: int = EMBED_CALL_TEXTS, embed_phase: Callable | None = None) -> dict:
    """Apply ``op`` to ``docs``. ``chunk(text) -> [Chunk]``; ``chunk_file(doc) -> [Chunk]`` for a document given
    as a file (Docling); ``embed([text]) -> [n, dim]``; ``index(op, payload, vectors) -> dict``.

    Upserts run in three phases: (1) every changed document is converted and chunked, so a file that fails
    conversion refuses the request before anything is written; (2) the chunks of the whole batch are embedded
    together, ``embed_batch`` texts per ``embed`` call (which splits them into engine-sized batches), all of them
    inside ``embed_phase()`` if given (the Triton model's: one engine lease for the phase); (3) each
    document is upserted and acknowledged only once the index has stored it. A document whose content hash
    (text or file, metadata, ``settings``) is already stored is not converted or embedded again."""
    report: list = [None] * len(docs)
    done = 0

    def note(i):
        nonlocal done
        done += 1
        if progress is not None:
            progress(f"{op} {done}/{len(docs)} {docs[i].doc_id}: {report[i]['status']}, {report[i]['chunks']} chunks")

    if op == "delete":
        for i, doc in enumerate(docs):
            result = index("delete", {"doc_id": doc.doc_id}, None)
            report[i] = {"doc_id": doc.doc_id, "status": "deleted" if result.get("removed") else "not_found",
                         "chunks": int(result.get("removed", 0))}
            note(i)
        return {"collection": collection, "op": op, "documents": report}

    pending = []                                            # (i, content_hash, chunks)
    for i, doc in enumerate(docs):
        content_hash = doc.content_hash(settings)
        stored = index("get", {"doc_id": doc.doc_id}, None).get("document")
        if stored is not None and stored["content_hash"] == content_hash:
            report[i] = {"doc_id": doc.doc_id, "status": "unchanged", "chunks": stored["chunks"]}
            note(i)
            continue
        if doc.file is not None:
            if chunk_file is None:
                raise InvalidInput(f"document {doc.doc_id!r}: files of type {doc.fmt} are not accepted here")
            chunks = chunk_file(doc)
        else:
            chunks = chunk(doc.text)
        pending.append((i, content_hash, chunks))

    texts = [c.text for _, _, chunks in pending for c in chunks]
    with embed_phase() if embed_phase is not None and texts else contextlib.nullcontext():
        vectors = [embed(texts[s:s + embed_batch]) for s in range(0, len(texts), embed_batch)]
    vectors = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    at = 0
    for i, content_hash, chunks in pending:
        doc = docs[i]
        payload = {"doc_id": doc.doc_id, "content_hash": content_hash, "doc_metadata": doc.metadata,
                   "chunks": [c.to_dict() for c in chunks]}
        result = index("upsert", payload, vectors[at:at + len(chunks)])
        at += len(chunks)
        report[i] = {"doc_id": doc.doc_id, "status": result["status"], "chunks": len(chunks)}
        note(i)
    return {"collection": collection, "op": op, "documents": report}
