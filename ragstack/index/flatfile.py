"""The default vector store: exact search over numpy arrays, persisted as flat files.

Layout, one folder per collection under ``root_dir``::

    <name>/meta.json              the commit record: format, dim, generation, row count, documents
    <name>/vectors.<gen>.npy      float32 [N, dim], L2-normalised rows
    <name>/chunks.<gen>.jsonl     N chunk records, row i describing vectors[i]

Why generations: a mutation writes the *new* generation's data files next to the old ones and then replaces
``meta.json``, which names the generation, last. That replacement is the commit: before it, a reload sees the
old generation whole; after it, the new one whole. Files are never rewritten in place and a generation number is
never reused (not even after a failed write), so a crash at any point leaves a loadable state, at worst with
stray files (temporaries, other generations) that loading removes. Every file goes through
:func:`~ragstack.index.atomic.write_atomic`, so a mutation returns (is acknowledged) only once it is durable.

Every mutation rewrites its collection's files: O(collection size), fine for the document counts this store is
meant for; beyond that, a pgvector-backed :class:`~ragstack.index.VectorStore` takes over.

Concurrency: the store is owned by one process (the Triton model instance that holds it). Within it, mutations
are serialised by a lock; each builds a new immutable :class:`_Snapshot` and swaps it in after committing, so a
search works on a consistent snapshot without waiting for a write's disk I/O. Several processes opening the same
``root_dir`` are not supported: there is no cross-process locking.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ragstack.errors import InvalidInput
from ragstack.index.atomic import TMP_PREFIX, fsync_dir, write_atomic
from ragstack.index.base import (COLLECTION_NAME, VectorStore, check_collection_name, check_content_hash,
                                 check_dim, check_doc_id, check_doc_ids, check_doc_metadata, check_top_k,
                                 chunk_records, json_copy, normalized_query, normalized_rows, top_hits,
                                 unknown_collection)

log = logging.getLogger(__name__)

FORMAT = "ragstack-flatfile/1"
META = "meta.json"
_DATA_FILE = re.compile(r"^(vectors\.(\d+)\.npy|chunks\.(\d+)\.jsonl)$")


@dataclass(frozen=True)
class _Snapshot:
    """One collection's whole state at one generation; never modified, only replaced."""
    name: str
    dim: int
    generation: int
    vectors: np.ndarray          # [N, dim] float32, read-only
    records: tuple               # N chunk dicts, row-aligned with vectors
    docs: dict                   # doc_id -> {"content_hash", "metadata", "chunks"}

    @classmethod
    def empty(cls, name: str, dim: int, generation: int) -> "_Snapshot":
        return cls.build(name, dim, generation, np.zeros((0, dim), np.float32), (), {})

    @classmethod
    def build(cls, name, dim, generation, vectors, records, docs) -> "_Snapshot":
        vectors.setflags(write=False)
        return cls(name, dim, generation, vectors, tuple(records), docs)

    def without(self, doc_id: str, generation: int) -> "_Snapshot":
        keep = [i for i, r in enumerate(self.records) if r["doc_id"] != doc_id]
        docs = {d: info for d, info in self.docs.items() if d != doc_id}
        return _Snapshot.build(self.name, self.dim, generation, self.vectors[keep],
                               [self.records[i] for i in keep], docs)

    def with_doc(self, doc_id: str, records: list, vectors: np.ndarray, info: dict,
                 generation: int) -> "_Snapshot":
        """This state with ``doc_id``'s chunks replaced by ``records`` (appended at the end)."""
        base = self.without(doc_id, generation)
        return _Snapshot.build(self.name, self.dim, generation, np.concatenate([base.vectors, vectors]),
                               base.records + tuple(records), {**base.docs, doc_id: info})

    def doc_rows(self, doc_ids: frozenset) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r["doc_id"] in doc_ids], dtype=np.int64)

    def stats(self) -> dict:
        return {"collection": self.name, "dim": self.dim, "docs": len(self.docs), "chunks": len(self.records)}


class FlatFileStore(VectorStore):
    """:class:`~ragstack.index.VectorStore` over flat files in ``root_dir`` (see the module docstring).

    Construction loads every collection from disk (and removes stray files of interrupted writes), so a new
    store on the same folder sees everything an earlier one acknowledged."""

    def __init__(self, root_dir):
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}
        # The last generation number used per collection, successful or not: never reused (module docstring).
        self._last_generation: dict[str, int] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and COLLECTION_NAME.match(folder.name):
                snapshot = _load(folder)
                if snapshot is not None:
                    self._snapshots[folder.name] = snapshot
                    self._last_generation[folder.name] = snapshot.generation

    # Reads take no lock: they look up an immutable snapshot once (the mapping itself is replaced, never
    # modified) and use it throughout.

    def collections(self) -> list[str]:
        return sorted(self._snapshots)

    def stats(self, collection: str) -> dict:
        return self._snapshot(collection).stats()

    def get(self, collection: str, doc_id: str) -> Optional[dict]:
        snapshot = self._snapshot(collection)
        info = snapshot.docs.get(check_doc_id(doc_id))
        if info is None:
            return None
        chunks = [snapshot.records[i] for i in snapshot.doc_rows(frozenset([doc_id]))]
        return json_copy({"doc_id": doc_id, "content_hash": info["content_hash"], "metadata": info["metadata"],
                          "chunks": chunks}, "document")

    def search(self, collection: str, query_vector: np.ndarray, top_k: int,
               doc_ids: Optional[Sequence[str]] = None) -> list[dict]:
        snapshot = self._snapshot(collection)
        top_k = check_top_k(top_k)
        query = normalized_query(query_vector, snapshot.dim)
        wanted = check_doc_ids(doc_ids)
        if wanted is None:
            rows = np.arange(len(snapshot.records))
            scores = snapshot.vectors @ query
        else:
            rows = snapshot.doc_rows(wanted)
            scores = snapshot.vectors[rows] @ query
        if not len(rows):
            return []
        return top_hits(scores, snapshot.records, rows, top_k)

    # Mutations: under the lock, build the next snapshot, commit it to disk, then publish it.

    def create_collection(self, name: str, dim: int) -> dict:
        check_collection_name(name)
        dim = check_dim(dim)
        with self._lock:
            snapshot = self._snapshots.get(name)
            if snapshot is None:
                snapshot = self._commit(_Snapshot.empty(name, dim, self._next_generation(name)))
            elif snapshot.dim != dim:
                raise InvalidInput(f"collection {name!r} has dim {snapshot.dim}, not {dim}")
            return snapshot.stats()

    def upsert(self, collection: str, doc_id: str, chunks: list[dict], vectors: np.ndarray,
               doc_metadata: Optional[dict], content_hash: str) -> dict:
        check_collection_name(collection)
        check_doc_id(doc_id)
        records = chunk_records(doc_id, chunks)
        info = {"content_hash": check_content_hash(content_hash),
                "metadata": check_doc_metadata(doc_metadata), "chunks": len(records)}
        with self._lock:
            current = self._snapshots.get(collection)
            vectors = normalized_rows(vectors, None if current is None else current.dim, "vectors")
            if vectors.shape[0] != len(records):
                raise InvalidInput(f"{vectors.shape[0]} vectors for {len(records)} chunks")
            if current is None:
                current = _Snapshot.empty(collection, vectors.shape[1], generation=0)   # the base, not stored
            old = current.docs.get(doc_id)
            summary = {"collection": collection, "doc_id": doc_id}
            if old is not None and old["content_hash"] == content_hash:
                return {**summary, "status": "unchanged", "chunks": old["chunks"], "removed_chunks": 0}
            self._commit(current.with_doc(doc_id, records, vectors, info, self._next_generation(collection)))
            if old is None:
                return {**summary, "status": "created", "chunks": len(records), "removed_chunks": 0}
            return {**summary, "status": "replaced", "chunks": len(records), "removed_chunks": old["chunks"]}

    def delete(self, collection: str, doc_id: str) -> int:
        check_doc_id(doc_id)
        with self._lock:
            current = self._snapshot(collection)
            old = current.docs.get(doc_id)
            if old is None:
                return 0
            self._commit(current.without(doc_id, self._next_generation(collection)))
            return old["chunks"]

    def _snapshot(self, name: str) -> _Snapshot:
        snapshot = self._snapshots.get(check_collection_name(name))
        if snapshot is None:
            raise unknown_collection(name, list(self._snapshots))
        return snapshot

    def _next_generation(self, name: str) -> int:
        self._last_generation[name] = self._last_generation.get(name, 0) + 1
        return self._last_generation[name]

    def _commit(self, snapshot: _Snapshot) -> _Snapshot:
        """Write ``snapshot`` durably, then publish it. The mapping is replaced, not updated, so that a reader
        iterating it (:meth:`collections`) never sees it change underneath."""
        _save(self.root / snapshot.name, snapshot)
        self._snapshots = {**self._snapshots, snapshot.name: snapshot}
        return snapshot


def _data_paths(folder: Path, generation: int) -> tuple[Path, Path]:
    return folder / f"vectors.{generation}.npy", folder / f"chunks.{generation}.jsonl"


def _save(folder: Path, snapshot: _Snapshot) -> None:
    """Data files first, ``meta.json`` (the commit) last, then the superseded files go."""
    folder.mkdir(exist_ok=True)
    vectors_path, chunks_path = _data_paths(folder, snapshot.generation)
    write_atomic(vectors_path, lambda f: np.save(f, snapshot.vectors, allow_pickle=False))
    write_atomic(chunks_path, lambda f: f.writelines(
        (json.dumps(r, ensure_ascii=False) + "\n").encode() for r in snapshot.records))
    meta = {"format": FORMAT, "collection": snapshot.name, "dim": snapshot.dim,
            "generation": snapshot.generation, "chunks": len(snapshot.records), "docs": snapshot.docs}
    write_atomic(folder / META, lambda f: f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode()))
    fsync_dir(folder)
    _remove_strays(folder, snapshot.generation)


def _load(folder: Path) -> Optional[_Snapshot]:
    """The committed state of a collection folder; None for a folder whose first commit never happened.

    An inconsistent committed state cannot come from a crash (module docstring), only from damage outside this
    store; it raises rather than serving or overwriting a partial collection."""
    meta_path = folder / META
    if not meta_path.is_file():
        log.warning("%s: no %s (a collection whose creation was interrupted); ignored", folder, META)
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise RuntimeError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    generation, dim, count = meta["generation"], meta["dim"], meta["chunks"]
    vectors_path, chunks_path = _data_paths(folder, generation)
    vectors = np.load(vectors_path, allow_pickle=False)
    with chunks_path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    docs = meta["docs"]
    if (vectors.dtype != np.float32 or vectors.shape != (count, dim) or len(records) != count
            or sum(info["chunks"] for info in docs.values()) != count):
        raise RuntimeError(f"{folder}: generation {generation} is inconsistent (vectors {vectors.shape} "
                           f"{vectors.dtype}, {len(records)} chunk records, meta says {count} x {dim})")
    _remove_strays(folder, generation)
    return _Snapshot.build(folder.name, dim, generation, vectors, records, docs)


def _remove_strays(folder: Path, generation: int) -> None:
    """Delete leftovers of interrupted or superseded writes: temporaries and other generations' data files.
    Best effort: a file that cannot be removed now is removed by a later write or load."""
    current = {p.name for p in _data_paths(folder, generation)}
    for path in folder.iterdir():
        name = path.name
        if name.startswith(TMP_PREFIX) or (_DATA_FILE.match(name) and name not in current):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
