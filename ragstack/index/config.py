"""Which :class:`~ragstack.index.VectorStore` a server uses, from the settings (``ragstack/settings.py``) and the
``vector_index`` model's parameters.

    RAG_VECTOR_STORE   flat | pgvector                                    [flat, or the model's vector_store parameter]
    RAG_PG_DSN         the Postgres to use (libpq URI / key=value; Supabase: its connection string)
                       [none: libpq's PGHOST/PGPORT/PGUSER/PGDATABASE if PGHOST is set (the compose file),
                       else tools/serve_triton.sh starts the embedded server and sets it]
    RAG_PG_PASSWORD_FILE  a file holding the password (a compose/k8s secret), not in the DSN   [none]
    RAG_PG_SCHEMA      schema holding the store's tables                  [ragstack]
    RAG_PG_EF_SEARCH   HNSW ef_search (recall vs latency)                 [100]

The environment wins over model parameters (``vector_store``, ``pg_dsn``), so one launcher switch changes every
server sharing a model repository.
"""
from __future__ import annotations

from typing import Mapping, Optional

from ragstack import settings as rs
from ragstack.index.base import VectorStore

STORES = rs.VECTOR_STORES


def store_settings(params: Optional[Mapping[str, str]] = None, environ: Optional[Mapping[str, str]] = None) -> dict:
    """The store's settings: the environment's (``environ``: the process's by default) over ``params``."""
    params = params or {}
    env = rs.current() if environ is None else rs.from_env(environ)
    kind = (env.vector_store or params.get("vector_store") or "flat").strip().lower()
    if kind not in STORES:
        raise ValueError(f"RAG_VECTOR_STORE must be one of {', '.join(STORES)}, got {kind!r}")
    settings = {"kind": kind}
    if kind == "pgvector":
        # No DSN but PGHOST: an empty DSN, which libpq completes from PGHOST, PGPORT, PGUSER, PGDATABASE.
        dsn = env.pg_dsn or params.get("pg_dsn") or ""
        if not dsn and not env.pg_host:
            raise ValueError("RAG_VECTOR_STORE=pgvector needs RAG_PG_DSN or libpq's PGHOST (tools/serve_triton.sh "
                             "sets RAG_PG_DSN when it starts the embedded Postgres)")
        password_file = env.pg_password_file
        if password_file is not None:
            with open(password_file, encoding="utf-8") as f:
                settings["password"] = f.read().strip()
        settings.update(dsn=dsn, schema=env.pg_schema or params.get("pg_schema") or "ragstack",
                        ef_search=env.pg_ef_search or int(params.get("pg_ef_search") or 100))
    return settings


def open_store(index_dir, params: Optional[Mapping[str, str]] = None,
               environ: Optional[Mapping[str, str]] = None) -> VectorStore:
    """The configured store; ``index_dir`` is the flat store's folder (unused by pgvector)."""
    settings = store_settings(params, environ)
    if settings["kind"] == "pgvector":
        from ragstack.index.pgvector import PgVectorStore
        return PgVectorStore(settings["dsn"], settings["schema"], ef_search=settings["ef_search"],
                             password=settings.get("password"))
    from ragstack.index.flatfile import FlatFileStore
    return FlatFileStore(index_dir)
