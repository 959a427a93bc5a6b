""":class:`~ragstack.index.VectorStore` on PostgreSQL with pgvector: any Postgres by DSN (Supabase included) or
the project's embedded one (:mod:`ragstack.index.pgserver`).

Layout, in one schema (``ragstack`` unless told otherwise)::

    collections(name, dim, tbl, coltype)              one row per collection
    documents(collection, doc_id, content_hash, metadata jsonb, chunks)
    <tbl>(chunk_id PK, doc_id, pos, record jsonb, embedding vector(dim),
          tsv tsvector GENERATED from record->>'text')                     one table per collection

Why a table per collection rather than a ``collection`` column: an HNSW index needs one fixed dimension per
column, and collections have their own dims (an embedding model change makes a new collection); a table each
also keeps each collection's HNSW graph to its own rows, so a filter on one collection never walks the others'.
Columns are ``vector(dim)`` up to 2,000 dims (pgvector's HNSW limit), ``halfvec(dim)`` up to 4,000 (stored and
compared in half precision), and above that ``vector(dim)`` without an index (exact scans).

Search is approximate: rows are L2-normalised, so the HNSW index uses the inner product (``vector_ip_ops``, the
cosine on unit vectors) and ``ORDER BY embedding <#> q`` may miss a true neighbour (recall@10 on realistic 100k x
384 vectors ~0.97 at ``ef_search`` 100; 1M x 384 ~0.95 at 300, p50 13.5 ms; see benchmarks/index.py). The index
returns ``top_k + 32`` candidates, which are then sorted exactly by (score, ``chunk_id``) in the "C" collation
(Python's string order), so ties among them are broken by chunk id as the contract asks. ``exact=True`` turns the
index off for this store's searches (a full scan: exact, O(rows)); otherwise sequential scans are off for the
search, since the planner underprices them for wide (TOASTed) vectors. Searches filtered by ``doc_ids`` use the
``doc_id`` index when the filter is selective (exact), otherwise pgvector's iterative index scan.

Lexical and hybrid search (:mod:`ragstack.index.lexical`): ``tsv`` (``to_tsvector('english', text)``, a GIN
index) is matched by the query's terms OR-ed and ranked by ``ts_rank_cd``; a hybrid search fuses that list with
the dense one in Python, as the flat store does. Opening the store adds the column and index to tables made
before they existed (one table rewrite each).

Every mutation is one transaction, committed with ``synchronous_commit=on`` (durable once the method returns).
Several processes (Triton servers) may share the database: an upsert or delete of a document takes a
transaction-scoped advisory lock on (schema, collection, doc_id), so two concurrent upserts of the same document
run one after the other and each sees the other's committed hash; DDL (schema, a new collection's table) takes
a lock of its own. Readers never wait for writers (MVCC): a search sees a document's old chunks or its new ones.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np

from ragstack.contracts.errors import InvalidInput
from ragstack.index.base import (VectorStore, check_collection_name, check_content_hash, check_dim, check_doc_id,
                                 check_doc_ids, check_doc_metadata, check_top_k, chunk_records, normalized_query,
                                 normalized_rows, unknown_collection)
from ragstack.index.lexical import SearchSpec, fuse

MAX_VECTOR_HNSW_DIM = 2000
MAX_HALFVEC_HNSW_DIM = 4000
CANDIDATE_SLACK = 32
# Lexical search: a generated tsvector of each chunk's text (Postgres' English configuration: stemmed, stop
# words dropped) with a GIN index; a query matches a chunk holding any of its terms, ranked by ts_rank_cd.
TSV_COLUMN = "tsv"
TSV_CONFIG = "english"
_TSV_DDL = (f"ADD COLUMN {TSV_COLUMN} tsvector GENERATED ALWAYS AS "
            f"(to_tsvector('{TSV_CONFIG}'::regconfig, coalesce(record->>'text', ''))) STORED")


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts``."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PgVectorStore(VectorStore):
    """The store over the database at ``dsn`` (a libpq URI or key=value string), in ``schema``.

    ``ef_search``: HNSW candidate list size per search (higher: better recall, slower); ``hnsw_m`` and
    ``ef_construction`` shape an index when its collection is created. ``pool_size``: connections kept open."""

    def __init__(self, dsn: str, schema: str = "ragstack", *, ef_search: int = 100, hnsw_m: int = 16,
                 ef_construction: int = 64, exact: bool = False, pool_size: int = 4,
                 password: Optional[str] = None):
        import psycopg  # noqa: F401  (fail here, clearly, when the driver is missing)

        self.dsn = dsn
        self._connect_kwargs = {"password": password} if password else {}
        self.schema = schema
        self._schema_q = _quote_ident(schema)
        self.ef_search = int(ef_search)
        self.hnsw_m, self.ef_construction = int(hnsw_m), int(ef_construction)
        self.exact = bool(exact)
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._pool_size = pool_size
        self._known: dict[str, tuple[int, str, str]] = {}      # name -> (dim, table, coltype); never changes
        self._known_lock = threading.Lock()
        self._closed = False
        self._bootstrap()

    # ---- connections

    def _connect(self):
        import psycopg
        from pgvector.psycopg import register_vector

        conn = psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs)
        ext = conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'"
                           ).fetchone()
        path = [self._schema_q] + ([ext[0]] if ext else [])
        conn.execute(f"SET search_path TO {', '.join(path)}")
        conn.execute("SET synchronous_commit TO on")
        if ext:
            register_vector(conn)
        return conn

    @contextmanager
    def _conn(self):
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and not conn.closed and conn.info.transaction_status == 0 and self._pool.qsize() < self._pool_size:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return

    def _bootstrap(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, **self._connect_kwargs) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key("ragstack-ddl")])
            if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error as exc:
                    raise RuntimeError(f"the database lacks the pgvector extension and this role cannot create "
                                       f"it (on Supabase: enable 'vector' under Database > Extensions): {exc}") from exc
            s = self._schema_q
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.collections (name text COLLATE \"C\" PRIMARY KEY, "
                         f"dim integer NOT NULL, tbl text NOT NULL, coltype text NOT NULL)")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.documents (collection text COLLATE \"C\" NOT NULL, "
                         f"doc_id text COLLATE \"C\" NOT NULL, content_hash text NOT NULL, metadata jsonb NOT NULL, "
                         f"chunks integer NOT NULL, PRIMARY KEY (collection, doc_id))")
            # Migration: chunk tables made before lexical search lack the tsvector column and its index.
            for (tbl,) in conn.execute(f"SELECT tbl FROM {s}.collections").fetchall():
                self._add_lexical(conn, tbl)

    def _add_lexical(self, conn, tbl: str) -> None:
        """Inside the caller's DDL-locked transaction: the tsvector column and GIN index on ``tbl`` if missing
        (adding the column rewrites the table once, filling it from the stored chunk texts)."""
        t = self._table(tbl)
        has = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s "
                           "AND NOT attisdropped", [t, TSV_COLUMN]).fetchone()
        if not has:
            conn.execute(f"ALTER TABLE {t} {_TSV_DDL}")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {_quote_ident(tbl + '_' + TSV_COLUMN)} ON {t} "
                     f"USING gin ({TSV_COLUMN})")

    # ---- collections

    def _lookup(self, conn, name: str) -> Optional[tuple[int, str, str]]:
        found = self._known.get(name)
        if found is None:
            row = conn.execute("SELECT dim, tbl, coltype FROM collections WHERE name = %s", [name]).fetchone()
            if row is not None:
                found = (row[0], row[1], row[2])
                with self._known_lock:
                    self._known[name] = found
        return found

    def _require(self, conn, name: str) -> tuple[int, str, str]:
        found = self._lookup(conn, check_collection_name(name))
        if found is None:
            raise unknown_collection(name, self._names(conn))
        return found

    @staticmethod
    def _names(conn) -> list[str]:
        return [r[0] for r in conn.execute("SELECT name FROM collections ORDER BY name")]

    def _create(self, conn, name: str, dim: int) -> tuple[int, str, str]:
        """Inside the caller's transaction: the collection ``name`` (made if missing), checked against ``dim``."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key("ragstack-ddl")])
        row = conn.execute("SELECT dim, tbl, coltype FROM collections WHERE name = %s", [name]).fetchone()
        if row is None:
            tbl = "chunks_" + hashlib.sha1(name.encode()).hexdigest()[:24]
            coltype = "halfvec" if MAX_VECTOR_HNSW_DIM < dim <= MAX_HALFVEC_HNSW_DIM else "vector"
            t = f"{self._schema_q}.{_quote_ident(tbl)}"
            conn.execute(f"CREATE TABLE {t} (chunk_id text COLLATE \"C\" PRIMARY KEY, doc_id text COLLATE \"C\" "
                         f"NOT NULL, pos integer NOT NULL, record jsonb NOT NULL, embedding {coltype}({dim}) NOT NULL)")
            conn.execute(f"CREATE INDEX ON {t} (doc_id)")
            self._add_lexical(conn, tbl)
            if dim <= MAX_HALFVEC_HNSW_DIM:
                conn.execute(f"CREATE INDEX ON {t} USING hnsw (embedding {coltype}_ip_ops) "
                             f"WITH (m = {self.hnsw_m}, ef_construction = {self.ef_construction})")
            conn.execute("INSERT INTO collections VALUES (%s, %s, %s, %s)", [name, dim, tbl, coltype])
            row = (dim, tbl, coltype)
        elif row[0] != dim:
            raise InvalidInput(f"collection {name!r} has dim {row[0]}, not {dim}")
        return row[0], row[1], row[2]

    def _table(self, tbl: str) -> str:
        return f"{self._schema_q}.{_quote_ident(tbl)}"

    def create_collection(self, name: str, dim: int) -> dict:
        check_collection_name(name)
        dim = check_dim(dim)
        with self._conn() as conn:
            known = self._lookup(conn, name)
            if known is None:
                with conn.transaction():
                    self._create(conn, name, dim)
            elif known[0] != dim:
                raise InvalidInput(f"collection {name!r} has dim {known[0]}, not {dim}")
            return self._stats(conn, name, dim)

    def collections(self) -> list[str]:
        with self._conn() as conn:
            return self._names(conn)

    def stats(self, collection: str) -> dict:
        with self._conn() as conn:
            dim, _, _ = self._require(conn, collection)
            return self._stats(conn, collection, dim)

    @staticmethod
    def _stats(conn, name: str, dim: int) -> dict:
        docs, chunks = conn.execute("SELECT count(*), coalesce(sum(chunks), 0) FROM documents WHERE collection = %s",
                                    [name]).fetchone()
        return {"collection": name, "dim": dim, "docs": int(docs), "chunks": int(chunks)}

    # ---- documents

    def upsert(self, collection: str, doc_id: str, chunks: list[dict], vectors: np.ndarray,
               doc_metadata: Optional[dict], content_hash: str) -> dict:
        from psycopg.types.json import Jsonb

        check_collection_name(collection)
        check_doc_id(doc_id)
        records = chunk_records(doc_id, chunks)
        content_hash = check_content_hash(content_hash)
        metadata = check_doc_metadata(doc_metadata)
        summary = {"collection": collection, "doc_id": doc_id}
        with self._conn() as conn:
            known = self._lookup(conn, collection)
            vectors = normalized_rows(vectors, None if known is None else known[0], "vectors")
            if vectors.shape[0] != len(records):
                raise InvalidInput(f"{vectors.shape[0]} vectors for {len(records)} chunks")
            with conn.transaction():
                if known is None:
                    known = self._create(conn, collection, vectors.shape[1])
                dim, tbl, coltype = known
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self.schema, collection, doc_id)])
                old = conn.execute("SELECT content_hash, chunks FROM documents WHERE collection = %s AND doc_id = %s",
                                   [collection, doc_id]).fetchone()
                if old is not None and old[0] == content_hash:
                    return {**summary, "status": "unchanged", "chunks": old[1], "removed_chunks": 0}
                t = self._table(tbl)
                conn.execute(f"DELETE FROM {t} WHERE doc_id = %s", [doc_id])
                cast = "" if coltype == "vector" else f"::vector::{coltype}"
                with conn.cursor() as cur:
                    cur.executemany(f"INSERT INTO {t} (chunk_id, doc_id, pos, record, embedding) "
                                    f"VALUES (%s, %s, %s, %s, %s{cast})",
                                    [(r["chunk_id"], doc_id, i, Jsonb(r), vectors[i]) for i, r in enumerate(records)])
                conn.execute("INSERT INTO documents VALUES (%s, %s, %s, %s, %s) ON CONFLICT (collection, doc_id) "
                             "DO UPDATE SET content_hash = excluded.content_hash, metadata = excluded.metadata, "
                             "chunks = excluded.chunks", [collection, doc_id, content_hash, Jsonb(metadata),
                                                          len(records)])
        if old is None:
            return {**summary, "status": "created", "chunks": len(records), "removed_chunks": 0}
        return {**summary, "status": "replaced", "chunks": len(records), "removed_chunks": old[1]}

    def delete(self, collection: str, doc_id: str) -> int:
        check_doc_id(doc_id)
        with self._conn() as conn:
            _, tbl, _ = self._require(conn, collection)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self.schema, collection, doc_id)])
                old = conn.execute("DELETE FROM documents WHERE collection = %s AND doc_id = %s RETURNING chunks",
                                   [collection, doc_id]).fetchone()
                if old is None:
                    return 0
                conn.execute(f"DELETE FROM {self._table(tbl)} WHERE doc_id = %s", [doc_id])
                return int(old[0])

    def get(self, collection: str, doc_id: str) -> Optional[dict]:
        with self._conn() as conn:
            _, tbl, _ = self._require(conn, collection)
            check_doc_id(doc_id)
            with conn.transaction():           # one snapshot for the document row and its chunks
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                doc = conn.execute("SELECT content_hash, metadata FROM documents WHERE collection = %s AND doc_id = %s",
                                   [collection, doc_id]).fetchone()
                if doc is None:
                    return None
                rows = conn.execute(f"SELECT record FROM {self._table(tbl)} WHERE doc_id = %s ORDER BY pos",
                                    [doc_id]).fetchall()
        return {"doc_id": doc_id, "content_hash": doc[0], "metadata": doc[1], "chunks": [r[0] for r in rows]}

    def search(self, collection: str, query_vector: np.ndarray, top_k: int,
               doc_ids: Optional[Sequence[str]] = None, *, query_text: Optional[str] = None,
               search=None) -> list[dict]:
        """Dense (HNSW, see the module docstring), lexical (full-text: the chunks holding any of the query's
        terms, by ``ts_rank_cd``) or hybrid (both lists, ``spec.depth`` deep, fused in Python as the flat store
        fuses them). Lexical and hybrid hits keep ``score`` = the cosine and add ``lexical_score`` (ts_rank_cd;
        hybrid: and ``fused_score``)."""
        spec = SearchSpec.parse(search)
        if spec.mode != "dense" and not (isinstance(query_text, str) and query_text.strip()):
            raise InvalidInput(f"a {spec.mode} search needs the query text")
        with self._conn() as conn:
            dim, tbl, coltype = self._require(conn, collection)
            top_k = check_top_k(top_k)
            query = normalized_query(query_vector, dim)
            wanted = check_doc_ids(doc_ids)
            if wanted is not None and not wanted:
                return []
            cast = "" if coltype == "vector" else f"::vector::{coltype}"
            where, params = "", [query]
            if wanted is not None:
                where, params = "WHERE doc_id = ANY(%s)", [query, sorted(wanted)]
            depth = top_k if spec.mode == "dense" else max(spec.depth, top_k)
            candidates = depth + CANDIDATE_SLACK
            sql = (f"SELECT chunk_id, record, -dist FROM (SELECT chunk_id, record, embedding <#> %s{cast} AS dist "
                   f"FROM {self._table(tbl)} {where} ORDER BY dist LIMIT {candidates}) c "
                   f"ORDER BY dist, chunk_id LIMIT {depth}")
            with conn.transaction():
                if self.exact:
                    conn.execute("SET LOCAL enable_indexscan TO off")
                else:
                    conn.execute(f"SET LOCAL hnsw.ef_search TO {max(self.ef_search, candidates)}")
                    conn.execute("SET LOCAL hnsw.iterative_scan TO relaxed_order")
                    # A vector over ~2 kB (2,000 dims: 8 kB) is TOASTed out of the table, so the planner prices a
                    # full scan by the small main table and picks it over the HNSW index (seen: 50k x 2000, ~0.9 s
                    # per query instead of milliseconds). The doc_id index stays a choice for a filtered search.
                    conn.execute("SET LOCAL enable_seqscan TO off")
                # prepare=False: a cached plan would ignore a later enable_indexscan change.
                rows = [] if spec.mode == "lexical" else conn.execute(sql, params, prepare=False).fetchall()
            if spec.mode == "dense":
                return [{**record, "score": float(score)} for _, record, score in rows]
            lexical = self._lexical(conn, tbl, cast, query, query_text, wanted, depth)
        records = {cid: record for cid, record, _ in rows}
        cosine = {cid: float(score) for cid, _, score in rows}
        for cid, record, cos, _ in lexical:
            records.setdefault(cid, record)
            cosine.setdefault(cid, float(cos))
        lex = {cid: float(r) for cid, _, _, r in lexical}
        if spec.mode == "lexical":
            picked = [(cid, lex[cid]) for cid, _, _, _ in lexical[:top_k]]
        else:
            picked = fuse({cid: cosine[cid] for cid, _, _ in rows}, lex, spec, top_k)
        hits = []
        for cid, fused in picked:
            hit = {**records[cid], "score": cosine[cid], "lexical_score": lex.get(cid, 0.0)}
            if spec.mode == "hybrid":
                hit["fused_score"] = float(fused)
            hits.append(hit)
        return hits

    def _lexical(self, conn, tbl: str, cast: str, query, text: str, wanted, depth: int) -> list:
        """``[(chunk_id, record, cosine, ts_rank_cd)]`` of the ``depth`` chunks that best match ``text``: its
        terms as ``plainto_tsquery`` parses them (stemmed, stop words dropped), OR-ed, so that a chunk holding
        any of them matches (a question's words rarely all stand in one chunk)."""
        where, params = "", [query, text]
        if wanted is not None:
            where, params = "AND doc_id = ANY(%s)", [query, text, sorted(wanted)]
        sql = (f"SELECT chunk_id, record, -(embedding <#> %s{cast}), ts_rank_cd({TSV_COLUMN}, q) AS r "
               f"FROM {self._table(tbl)}, "
               f"(SELECT replace(plainto_tsquery('{TSV_CONFIG}', %s)::text, ' & ', ' | ')::tsquery AS q) t "
               f"WHERE {TSV_COLUMN} @@ q {where} ORDER BY r DESC, chunk_id LIMIT {depth}")
        return conn.execute(sql, params).fetchall()
