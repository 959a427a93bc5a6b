"""The vector store interface, and the argument checks every implementation shares.

The RAG models talk to :class:`VectorStore` only, so the default :class:`~ragstack.index.FlatFileStore` can be
replaced by a database-backed store (pgvector) without touching them. The checks live here, not in the
implementations, so that every store refuses the same requests with the same messages.
"""
from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np

from ragstack.contracts.errors import InvalidInput

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_DOC_ID_LENGTH = 512
# Fields of a stored chunk record that the store sets; a caller's chunk dict may add any others.
_RECORD_KEYS = ("chunk_id", "doc_id", "text", "metadata")


class VectorStore(ABC):
    """Collections of documents, each stored as chunks with one embedding per chunk.

    Contract (what a replacement, e.g. a pgvector store, must keep):

    * A collection has a name matching :data:`COLLECTION_NAME` and a fixed vector dimension. It is created by
      :meth:`create_collection` or implicitly by the first :meth:`upsert`; every other method raises
      ``InvalidInput("unknown collection 'x'; known: ...")`` for a name that does not exist.
    * Vectors are L2-normalised when stored, so a search score is the cosine similarity (the inner product of
      normalised vectors), in [-1, 1]. Zero, NaN or infinite vectors are refused.
    * :meth:`upsert` replaces *all* chunks of ``doc_id`` in one step: a reader sees either the old chunks or the
      new ones, never a mix. If the stored ``content_hash`` equals the given one, nothing changes and the
      status is ``"unchanged"``. ``content_hash`` is the caller's: it must cover everything that shapes the
      stored chunks (text, chunking parameters, embedding model, metadata).
    * Chunk ids are ``f"{doc_id}#{i}"``, i the chunk's position in the upserted list.
    * :meth:`search` is exact (or, for an approximate index, documented as not), sorted by score descending,
      ties broken by ``chunk_id`` ascending (string order), so equal inputs give equal outputs.
    * A mutation is durable when the method returns: a new store on the same storage sees it.
    * Implementations are thread-safe.

    Records are plain JSON-serialisable dicts, so they can go into a Triton response as they are.

    :class:`~ragstack.index.pgvector.PgVectorStore` maps a collection to a chunks table (``chunk_id`` primary
    key, ``doc_id``, ``record jsonb``, ``embedding vector(dim)``) plus rows of a shared documents table
    (``doc_id``, ``content_hash``, ``metadata``); an upsert is one transaction (compare the hash, delete the doc's
    rows, insert the new ones); its search goes through an HNSW index and is documented as approximate. The
    checks below are shared by both stores.
    """

    @abstractmethod
    def create_collection(self, name: str, dim: int) -> dict:
        """Create ``name`` for ``dim``-dimensional vectors; a no-op if it exists with that dim (InvalidInput
        with another). Returns :meth:`stats`."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of all collections, sorted."""

    @abstractmethod
    def upsert(self, collection: str, doc_id: str, chunks: list[dict], vectors: np.ndarray,
               doc_metadata: Optional[dict], content_hash: str) -> dict:
        """Store ``doc_id`` as ``chunks`` (dicts with ``text``, optional ``metadata`` and further JSON fields,
        kept as given) with ``vectors`` (``[len(chunks), dim]``), replacing what it had.

        Returns ``{"collection", "doc_id", "status": "created" | "replaced" | "unchanged", "chunks",
        "removed_chunks"}``."""

    @abstractmethod
    def delete(self, collection: str, doc_id: str) -> int:
        """Remove ``doc_id``; the number of chunks removed (0 if it was not there)."""

    @abstractmethod
    def get(self, collection: str, doc_id: str) -> Optional[dict]:
        """``{"doc_id", "content_hash", "metadata", "chunks": [chunk records]}``, or None if absent."""

    @abstractmethod
    def stats(self, collection: str) -> dict:
        """``{"collection", "dim", "docs", "chunks"}``."""

    @abstractmethod
    def search(self, collection: str, query_vector: np.ndarray, top_k: int,
               doc_ids: Optional[Sequence[str]] = None, *, query_text: Optional[str] = None,
               search=None) -> list[dict]:
        """The ``top_k`` chunks most similar to ``query_vector`` (``[dim]``), optionally only from ``doc_ids``:
        dicts with ``chunk_id``, ``doc_id``, ``text``, ``score``, ``metadata`` and the chunk's other fields.

        ``search`` (a :class:`~ragstack.index.lexical.SearchSpec`, its dict or a mode name; None: dense) with
        mode ``lexical`` ranks by the lexical match of ``query_text`` instead, and ``hybrid`` fuses both
        rankings; such hits keep ``score`` = the cosine and add ``lexical_score`` (and ``fused_score``)."""


def check_collection_name(name) -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.match(name):
        raise InvalidInput(f"collection name must match {COLLECTION_NAME.pattern}, got {name!r}")
    return name


def unknown_collection(name: str, known: Sequence[str]) -> InvalidInput:
    return InvalidInput(f"unknown collection {name!r}; known: {', '.join(sorted(known)) or '(none)'}")


def check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidInput(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


def check_doc_id(doc_id) -> str:
    if not isinstance(doc_id, str) or not doc_id.strip() or len(doc_id) > MAX_DOC_ID_LENGTH:
        raise InvalidInput(f"doc_id must be a non-blank string of at most {MAX_DOC_ID_LENGTH} characters, "
                           f"got {doc_id!r:.80}")
    return doc_id


def check_content_hash(content_hash) -> str:
    if not isinstance(content_hash, str) or not content_hash:
        raise InvalidInput(f"content_hash must be a non-empty string, got {content_hash!r:.80}")
    return content_hash


def check_doc_metadata(metadata) -> dict:
    """The document's metadata as a detached JSON copy; None means none."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInput(f"doc_metadata must be a dict, got {type(metadata).__name__}")
    return json_copy(metadata, "doc_metadata")


def check_doc_ids(doc_ids) -> Optional[frozenset]:
    """The optional search filter as a set; a bare string is refused rather than read as characters."""
    if doc_ids is None:
        return None
    if isinstance(doc_ids, str) or not isinstance(doc_ids, (list, tuple, set, frozenset)):
        raise InvalidInput(f"doc_ids must be a list of strings, got {type(doc_ids).__name__}")
    return frozenset(check_doc_id(d) for d in doc_ids)


def check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


def normalized_rows(vectors, dim: Optional[int], what: str) -> np.ndarray:
    """``vectors`` as float32 ``[N, dim]`` with unit rows; InvalidInput for a wrong shape or a zero or
    non-finite row (whose direction, hence cosine, is undefined). ``dim`` None accepts any width."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        expected = f"[n, {dim}]" if dim is not None else "[n, dim]"
        raise InvalidInput(f"{what} must have shape {expected}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"{what} contains NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInput(f"{what} contains a zero vector")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def normalized_query(query_vector, dim: int) -> np.ndarray:
    """A ``[dim]`` (or ``[1, dim]``) query as a float32 unit vector ``[dim]``."""
    array = np.asarray(query_vector, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] != 1:
        raise InvalidInput(f"query_vector must have shape [{dim}], got {list(np.shape(query_vector))}")
    return normalized_rows(array, dim, "query_vector")[0]


def chunk_records(doc_id: str, chunks) -> list[dict]:
    """The stored form of ``chunks``: each caller dict with ``chunk_id``, ``doc_id`` and a ``metadata`` dict
    set, checked to be JSON-serialisable now rather than failing halfway through a write."""
    if not isinstance(chunks, (list, tuple)) or not chunks:
        raise InvalidInput("chunks must be a non-empty list (delete the document to remove it)")
    records = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict):
            raise InvalidInput(f"chunks[{i}] must be a dict, got {type(chunk).__name__}")
        text, metadata = chunk.get("text"), chunk.get("metadata", {})
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"chunks[{i}].text must be a non-blank string")
        if not isinstance(metadata, dict):
            raise InvalidInput(f"chunks[{i}].metadata must be a dict, got {type(metadata).__name__}")
        extra = {k: v for k, v in chunk.items() if k not in _RECORD_KEYS}
        record = {"chunk_id": f"{doc_id}#{i}", "doc_id": doc_id, "text": text, "metadata": metadata, **extra}
        records.append(json_copy(record, f"chunks[{i}]"))
    return records


def json_copy(value, what: str):
    """A deep copy of ``value`` through JSON: proves it can be stored, detaches it from the caller's objects,
    and makes it exactly what a reload from disk gives back (tuples become lists, and so on)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from None


def top_hits(scores: np.ndarray, records: Sequence[dict], rows: np.ndarray, top_k: int) -> list[dict]:
    """The ``top_k`` of ``rows`` by ``scores`` (one per row), as hit dicts, ties in ``chunk_id`` order.

    ``argpartition`` alone would pick arbitrarily among rows tied at the k-th score, so every row scoring at
    least the k-th best is kept as a candidate and the exact order is settled by sorting on (score, chunk_id)."""
    if len(rows) > top_k:
        kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
        keep = scores >= kth
        rows, scores = rows[keep], scores[keep]
    order = sorted(range(len(rows)), key=lambda i: (-float(scores[i]), records[rows[i]]["chunk_id"]))
    return [{**copy.deepcopy(records[rows[i]]), "score": float(scores[i])} for i in order[:top_k]]
