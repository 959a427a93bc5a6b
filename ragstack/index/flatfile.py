"""The default vector store: exact search over numpy arrays, persisted as flat files: a snapshot plus a log.

Layout, one folder per collection under ``root_dir``::

    <name>/meta.json              the commit record of a snapshot: format, dim, generation, row count, documents
    <name>/vectors.<gen>.npy      float32 [N, dim], L2-normalised rows
    <name>/chunks.<gen>.jsonl     N chunk records, row i describing vectors[i]
    <name>/log.<gen>.bin          mutations since snapshot <gen>, appended in order (may be absent: none yet)

A mutation costs O(its own size): it appends one record to the log and fsyncs it before returning (that is the
acknowledgement). A log record is ``<u32 length><u32 crc32>`` + payload (``<u32 json length>`` + a JSON header
with the operation, document and chunk records + the raw float32 vectors); loading replays the log over the
snapshot and stops at the first record that is short or fails its checksum: a torn tail from a crash mid-append,
which is cut off (that mutation was never acknowledged). A bad record with intact data after it is damage, not a
torn append, and raises.

Compaction writes the current state as the next snapshot generation and drops the log. It runs inside the
mutation that would grow the log past ``compact_ratio`` x the snapshot's size (at least ``min_log_bytes``), or
leave more dead rows than live ones in memory, and then *is* that mutation's commit: so the amortised cost per
mutation stays O(mutation size) (a snapshot of S bytes is rewritten only after >= ratio x S bytes of log), at
the price of one slower mutation now and then. ``compact_ratio=0`` snapshots on every mutation (the behaviour
before the log existed). A snapshot commits as before: the new generation's data files are written next to the
old ones, then ``meta.json``, which names the generation, is replaced; before that a reload sees the old
snapshot plus its log, after it the new snapshot (whose log starts empty). Generation numbers are never reused
(not even after a failed write), so a crash at any point leaves a loadable state, at worst with stray files that
loading removes. Every file goes through :func:`~ragstack.index.atomic.write_atomic` or an fsync'd append.

In memory a collection is an append-only float32 buffer (doubling capacity), row-aligned chunk records, an
``alive`` mask and a row list per document; replacing a document marks its old rows dead and appends new ones.
Dead rows are dropped at compaction, which lays rows out exactly as a reload of the new snapshot does. Lexical
and hybrid search (:mod:`ragstack.index.lexical`) use a BM25 index over the live rows' texts, built in memory on
a collection's first lexical search (and again after a compaction or a reload) and updated row by row by every
upsert and delete; it is read and written under the short lock.

Concurrency: the store is owned by one process (the Triton model instance that holds it). Mutations are
serialised by a lock that covers their disk I/O; their in-memory effect is applied under a second, short lock,
which readers take only to capture a consistent view (row count, alive rows, buffers): rows below the captured
count are never written again, so a search computes on its view without waiting for a write's fsync. Several
processes opening the same ``root_dir`` are not supported: there is no cross-process locking.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ragstack.contracts.errors import InvalidInput
from ragstack.index.atomic import TMP_PREFIX, fsync_dir, write_atomic
from ragstack.index.base import (COLLECTION_NAME, VectorStore, check_collection_name, check_content_hash,
                                 check_dim, check_doc_id, check_doc_ids, check_doc_metadata, check_top_k,
                                 chunk_records, json_copy, normalized_query, normalized_rows, top_hits,
                                 unknown_collection)
from ragstack.index.lexical import Bm25Index, SearchSpec, fuse, rank

log = logging.getLogger(__name__)

FORMAT = "ragstack-flatfile/1"
META = "meta.json"
_DATA_FILE = re.compile(r"^(vectors\.(\d+)\.npy|chunks\.(\d+)\.jsonl|log\.(\d+)\.bin)$")
_HEADER = struct.Struct("<II")
_JSON_LEN = struct.Struct("<I")


class _Collection:
    """One collection's in-memory state (see the module docstring); mutated only under the store's locks."""

    def __init__(self, name: str, dim: int, generation: int, vectors: np.ndarray, records: list, docs: dict):
        self.name, self.dim, self.generation = name, dim, generation
        n = len(records)
        self.buf = np.empty((max(n, 16), dim), np.float32)
        self.buf[:n] = vectors
        self.n = n
        self.alive = np.ones(len(self.buf), bool)
        self.records = list(records)
        self.docs = dict(docs)                    # doc_id -> {"content_hash", "metadata", "chunks"}
        self.doc_rows: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            self.doc_rows.setdefault(r["doc_id"], []).append(i)
        self.live = n
        self.snapshot_bytes = 0                   # size of the snapshot files on disk
        self.log_bytes = 0                        # size of log.<generation>.bin
        self.must_snapshot = False                # set when a snapshot write failed: the next mutation retries it
        self._bm25: Optional[Bm25Index] = None   # built on the first lexical search, then kept current

    def bm25(self) -> Bm25Index:
        """The live rows' lexical index (under the state lock): built once, then updated by add/remove."""
        if self._bm25 is None:
            index = Bm25Index()
            for i in self.live_rows():
                index.add(int(i), self.records[i]["text"])
            self._bm25 = index
        return self._bm25

    def stats(self) -> dict:
        return {"collection": self.name, "dim": self.dim, "docs": len(self.docs), "chunks": self.live}

    def remove(self, doc_id: str) -> None:
        rows = self.doc_rows.pop(doc_id, None)
        self.docs.pop(doc_id, None)
        if rows:
            self.alive[rows] = False
            self.live -= len(rows)
            if self._bm25 is not None:
                for i in rows:
                    self._bm25.remove(i, self.records[i]["text"])

    def add(self, doc_id: str, records: list, vectors: np.ndarray, info: dict) -> None:
        """Replace ``doc_id`` by ``records``: old rows die, new ones are appended."""
        self.remove(doc_id)
        k = len(records)
        if self.n + k > len(self.buf):
            capacity = max(2 * len(self.buf), self.n + k)
            buf = np.empty((capacity, self.dim), np.float32)
            buf[:self.n] = self.buf[:self.n]
            alive = np.zeros(capacity, bool)
            alive[:self.n] = self.alive[:self.n]
            self.buf, self.alive = buf, alive        # readers keep the old arrays: their rows are unchanged
        self.buf[self.n:self.n + k] = vectors
        self.alive[self.n:self.n + k] = True
        self.records.extend(records)
        self.doc_rows[doc_id] = list(range(self.n, self.n + k))
        self.docs[doc_id] = info
        if self._bm25 is not None:
            for i, record in enumerate(records, self.n):
                self._bm25.add(i, record["text"])
        self.n += k
        self.live += k

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.alive[:self.n])

    def compacted(self, generation: int) -> "_Collection":
        rows = self.live_rows()
        return _Collection(self.name, self.dim, generation, self.buf[rows], [self.records[i] for i in rows],
                           self.docs)


class FlatFileStore(VectorStore):
    """:class:`~ragstack.index.VectorStore` over flat files in ``root_dir`` (see the module docstring).

    Construction loads every collection from disk (snapshot + log; stray files of interrupted writes and a torn
    log tail are removed), so a new store on the same folder sees everything an earlier one acknowledged."""

    def __init__(self, root_dir, compact_ratio: float = 1.0, min_log_bytes: int = 4 << 20):
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compact_ratio, self.min_log_bytes = float(compact_ratio), int(min_log_bytes)
        self._lock = threading.Lock()             # mutations, including their disk I/O
        self._state_lock = threading.Lock()       # in-memory state: short holds
        self._colls: dict[str, _Collection] = {}
        # The last generation number used per collection, successful or not: never reused (module docstring).
        self._last_generation: dict[str, int] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and COLLECTION_NAME.match(folder.name):
                coll = _load(folder)
                if coll is not None:
                    self._colls[folder.name] = coll
                    self._last_generation[folder.name] = coll.generation

    # ---- reads: capture a view under the state lock, compute outside it

    def collections(self) -> list[str]:
        return sorted(self._colls)

    def stats(self, collection: str) -> dict:
        with self._state_lock:
            return self._coll(collection).stats()

    def get(self, collection: str, doc_id: str) -> Optional[dict]:
        with self._state_lock:
            coll = self._coll(collection)
            info = coll.docs.get(check_doc_id(doc_id))
            if info is None:
                return None
            chunks = [coll.records[i] for i in coll.doc_rows[doc_id]]
            doc = {"doc_id": doc_id, "content_hash": info["content_hash"], "metadata": info["metadata"],
                   "chunks": chunks}
        return json_copy(doc, "document")

    def search(self, collection: str, query_vector: np.ndarray, top_k: int,
               doc_ids: Optional[Sequence[str]] = None, *, query_text: Optional[str] = None,
               search=None) -> list[dict]:
        spec = SearchSpec.parse(search)
        if spec.mode != "dense" and not (isinstance(query_text, str) and query_text.strip()):
            raise InvalidInput(f"a {spec.mode} search needs the query text")
        with self._state_lock:
            coll = self._coll(collection)
            top_k = check_top_k(top_k)
            query = normalized_query(query_vector, coll.dim)
            wanted = check_doc_ids(doc_ids)
            if wanted is None:
                rows = coll.live_rows()
            else:
                rows = np.array(sorted(i for d in wanted for i in coll.doc_rows.get(d, ())), dtype=np.int64)
            buf, n, records = coll.buf, coll.n, coll.records
            # BM25 under the lock: its postings change in place with every upsert and delete.
            lexical = (coll.bm25().scores(query_text, None if wanted is None else rows.tolist())
                       if spec.mode != "dense" and len(rows) else {})
        if not len(rows):
            return []
        if wanted is None or len(rows) * 4 > n:
            scores = (buf[:n] @ query)[rows]       # one pass over contiguous rows beats a gather of most of them
        else:
            scores = buf[rows] @ query
        if spec.mode == "dense":
            return top_hits(scores, records, rows, top_k)
        return _fused_hits(spec, scores, rows, lexical, records, top_k)

    # ---- mutations: under the lock, append to the log (or compact), then apply in memory

    def create_collection(self, name: str, dim: int) -> dict:
        check_collection_name(name)
        dim = check_dim(dim)
        with self._lock:
            coll = self._colls.get(name)
            if coll is None:
                coll = _Collection(name, dim, self._next_generation(name), np.zeros((0, dim), np.float32), [], {})
                self._commit_snapshot(coll)
            elif coll.dim != dim:
                raise InvalidInput(f"collection {name!r} has dim {coll.dim}, not {dim}")
            with self._state_lock:
                return coll.stats()

    def upsert(self, collection: str, doc_id: str, chunks: list[dict], vectors: np.ndarray,
               doc_metadata: Optional[dict], content_hash: str) -> dict:
        check_collection_name(collection)
        check_doc_id(doc_id)
        records = chunk_records(doc_id, chunks)
        info = {"content_hash": check_content_hash(content_hash),
                "metadata": check_doc_metadata(doc_metadata), "chunks": len(records)}
        with self._lock:
            coll = self._colls.get(collection)
            vectors = normalized_rows(vectors, None if coll is None else coll.dim, "vectors")
            if vectors.shape[0] != len(records):
                raise InvalidInput(f"{vectors.shape[0]} vectors for {len(records)} chunks")
            summary = {"collection": collection, "doc_id": doc_id}
            if coll is None:                       # a new collection: its first snapshot holds the document
                coll = _Collection(collection, vectors.shape[1], self._next_generation(collection),
                                   np.zeros((0, vectors.shape[1]), np.float32), [], {})
                coll.add(doc_id, records, vectors, info)
                self._commit_snapshot(coll)
                return {**summary, "status": "created", "chunks": len(records), "removed_chunks": 0}
            old = coll.docs.get(doc_id)
            if old is not None and old["content_hash"] == content_hash:
                return {**summary, "status": "unchanged", "chunks": old["chunks"], "removed_chunks": 0}
            entry = _log_entry({"op": "upsert", "doc_id": doc_id, "info": info, "records": records}, vectors)
            self._mutate(coll, entry, len(records), old["chunks"] if old else 0,
                         lambda c: c.add(doc_id, records, vectors, info))
            if old is None:
                return {**summary, "status": "created", "chunks": len(records), "removed_chunks": 0}
            return {**summary, "status": "replaced", "chunks": len(records), "removed_chunks": old["chunks"]}

    def delete(self, collection: str, doc_id: str) -> int:
        check_doc_id(doc_id)
        with self._lock:
            coll = self._coll(collection)
            old = coll.docs.get(doc_id)
            if old is None:
                return 0
            entry = _log_entry({"op": "delete", "doc_id": doc_id}, None)
            self._mutate(coll, entry, 0, old["chunks"], lambda c: c.remove(doc_id))
            return old["chunks"]

    def compact(self, collection: str) -> None:
        """Write ``collection`` as a new snapshot now (drops its log and dead rows)."""
        with self._lock:
            coll = self._coll(collection)
            with self._state_lock:
                new = coll.compacted(self._next_generation(collection))
            self._commit_snapshot(new)

    def _mutate(self, coll: _Collection, entry: bytes, added: int, removed: int, apply) -> None:
        """Commit one mutation: by appending ``entry`` to the log, or (past the thresholds) by a new snapshot."""
        log_limit = max(self.compact_ratio * coll.snapshot_bytes, self.min_log_bytes)
        dead_after = coll.n + added - (coll.live + added - removed)
        if coll.must_snapshot or coll.log_bytes + len(entry) > log_limit or dead_after > max(coll.live, 1024):
            with self._state_lock:
                new = coll.compacted(self._next_generation(coll.name))
            apply(new)                             # not yet published: no reader sees it
            if new.live != new.n:
                new = new.compacted(new.generation)    # the row layout a reload of the snapshot has
            self._commit_snapshot(new)
            return
        path = coll_log_path(self.root / coll.name, coll.generation)
        _append(path, entry, coll.log_bytes)
        with self._state_lock:
            apply(coll)
            coll.log_bytes += len(entry)

    def _coll(self, name: str) -> _Collection:
        coll = self._colls.get(check_collection_name(name))
        if coll is None:
            raise unknown_collection(name, list(self._colls))
        return coll

    def _next_generation(self, name: str) -> int:
        self._last_generation[name] = self._last_generation.get(name, 0) + 1
        return self._last_generation[name]

    def _commit_snapshot(self, coll: _Collection) -> None:
        """Write ``coll`` (all rows live) as its generation's snapshot durably, then publish it. The mapping is
        replaced, not updated, so that a reader iterating it (:meth:`collections`) never sees it change."""
        try:
            coll.snapshot_bytes = _save(self.root / coll.name, coll)
        except BaseException:
            # Perhaps committed on disk (a failure after meta.json was replaced) though not published here: the
            # live collection's log may no longer be the one a reload reads, so its next mutation snapshots.
            published = self._colls.get(coll.name)
            if published is not None:
                published.must_snapshot = True
            raise
        coll.log_bytes = 0
        with self._state_lock:
            self._colls = {**self._colls, coll.name: coll}


def _fused_hits(spec: SearchSpec, scores: np.ndarray, rows: np.ndarray, lexical: dict, records: list,
                top_k: int) -> list[dict]:
    """A lexical or hybrid search's hits: ``scores`` the cosine of each of ``rows``, ``lexical`` their BM25
    (rows without a query term absent). Each hit keeps ``score`` = its cosine, and adds ``lexical_score`` and
    (hybrid) ``fused_score``; the order is the fused one (lexical: BM25), ties by chunk id."""
    cosine = dict(zip(rows.tolist(), scores.tolist()))
    chunk_id = lambda i: records[i]["chunk_id"]          # noqa: E731
    depth = max(spec.depth, top_k)
    lex = {i: lexical[i] for i in rank(lexical, chunk_id, depth)}
    if spec.mode == "lexical":
        picked = [(i, lex[i]) for i in list(lex)[:top_k]]
    else:
        dense = {i: cosine[i] for i in _top_rows(scores, rows, records, depth)}
        picked = fuse(dense, lex, spec, top_k, chunk_id)
    hits = []
    for i, fused in picked:
        hit = {**copy.deepcopy(records[i]), "score": float(cosine[i]), "lexical_score": float(lexical.get(i, 0.0))}
        if spec.mode == "hybrid":
            hit["fused_score"] = float(fused)
        hits.append(hit)
    return hits


def _top_rows(scores: np.ndarray, rows: np.ndarray, records: list, k: int) -> list[int]:
    """The ``k`` best of ``rows`` by cosine, ties by chunk id (as :func:`top_hits` orders them)."""
    if len(rows) > k:
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
        rows, scores = rows[keep], scores[keep]
    order = sorted(range(len(rows)), key=lambda j: (-float(scores[j]), records[rows[j]]["chunk_id"]))
    return [int(rows[j]) for j in order[:k]]


def coll_log_path(folder: Path, generation: int) -> Path:
    return folder / f"log.{generation}.bin"


def _data_paths(folder: Path, generation: int) -> tuple[Path, Path]:
    return folder / f"vectors.{generation}.npy", folder / f"chunks.{generation}.jsonl"


def _log_entry(header: dict, vectors: Optional[np.ndarray]) -> bytes:
    js = json.dumps(header, ensure_ascii=False).encode()
    payload = _JSON_LEN.pack(len(js)) + js + (b"" if vectors is None else np.ascontiguousarray(vectors, "<f4").tobytes())
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _append(path: Path, entry: bytes, expected_size: int) -> None:
    """Append ``entry`` to the log and fsync it; on any failure cut the file back, so that a record that was not
    acknowledged is not replayed by a later load either."""
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            _write_all(fd, entry)
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, expected_size)
                os.fsync(fd)
            except OSError as exc:            # pragma: no cover - the disk is failing
                log.error("%s: could not cut back a failed append: %s", path, exc)
            raise
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _save(folder: Path, coll: _Collection) -> int:
    """Data files first, ``meta.json`` (the commit) last, then the superseded files go. Returns the bytes written."""
    folder.mkdir(exist_ok=True)
    vectors_path, chunks_path = _data_paths(folder, coll.generation)
    rows = coll.live_rows()
    vectors = coll.buf[:coll.n][rows] if len(rows) != coll.n else coll.buf[:coll.n]
    write_atomic(vectors_path, lambda f: np.save(f, vectors, allow_pickle=False))
    write_atomic(chunks_path, lambda f: f.writelines(
        (json.dumps(coll.records[i], ensure_ascii=False) + "\n").encode() for i in rows))
    meta = {"format": FORMAT, "collection": coll.name, "dim": coll.dim,
            "generation": coll.generation, "chunks": len(rows), "docs": coll.docs}
    write_atomic(folder / META, lambda f: f.write(json.dumps(meta, ensure_ascii=False, indent=1).encode()))
    fsync_dir(folder)
    _remove_strays(folder, coll.generation)
    return vectors_path.stat().st_size + chunks_path.stat().st_size


def _load(folder: Path) -> Optional[_Collection]:
    """The committed state of a collection folder: snapshot + log; None for a folder whose first commit never
    happened.

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
    coll = _Collection(folder.name, dim, generation, vectors, records, docs)
    coll.snapshot_bytes = vectors_path.stat().st_size + chunks_path.stat().st_size
    coll.log_bytes = _replay(coll_log_path(folder, generation), coll)
    return coll


def _replay(path: Path, coll: _Collection) -> int:
    """Apply the log's records to ``coll``; cut off a torn tail. Returns the log's (valid) length."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        end = pos + _HEADER.size
        if end > len(data):
            break
        length, crc = _HEADER.unpack_from(data, pos)
        if end + length > len(data):
            break                                          # torn: the append did not finish
        payload = data[end:end + length]
        if zlib.crc32(payload) != crc:
            if end + length < len(data):
                raise RuntimeError(f"{path}: record at byte {pos} fails its checksum and more data follows "
                                   f"(damage, not an interrupted append)")
            break
        (js_len,) = _JSON_LEN.unpack_from(payload, 0)
        header = json.loads(payload[4:4 + js_len].decode())
        if header["op"] == "upsert":
            vectors = np.frombuffer(payload, "<f4", offset=4 + js_len).reshape(len(header["records"]), coll.dim)
            coll.add(header["doc_id"], header["records"], vectors.astype(np.float32), header["info"])
        elif header["op"] == "delete":
            coll.remove(header["doc_id"])
        else:
            raise RuntimeError(f"{path}: unknown log operation {header['op']!r} at byte {pos}")
        pos = end + length
    if pos < len(data):
        log.warning("%s: dropping a torn tail of %d bytes (an append interrupted by a crash)", path, len(data) - pos)
        with path.open("r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
    return pos


def _remove_strays(folder: Path, generation: int) -> None:
    """Delete leftovers of interrupted or superseded writes: temporaries and other generations' files.
    Best effort: a file that cannot be removed now is removed by a later write or load."""
    current = {p.name for p in _data_paths(folder, generation)} | {coll_log_path(folder, generation).name}
    for path in folder.iterdir():
        name = path.name
        if name.startswith(TMP_PREFIX) or (_DATA_FILE.match(name) and name not in current):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)
