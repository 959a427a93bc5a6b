"""Document store for retrieval: the :class:`VectorStore` interface, its default :class:`FlatFileStore`, and
:class:`~ragstack.index.pgvector.PgVectorStore` (Postgres + pgvector; imported on demand: it needs psycopg).
:func:`~ragstack.index.config.open_store` picks one from the configuration.

Pure Python and numpy (no Triton import), so ingestion tools and tests use it directly and the Triton model
that owns the store only wires it up.
"""
__all__ = ["COLLECTION_NAME", "FlatFileStore", "VectorStore"]


def __getattr__(name: str):
    # Imported on first use: a model that only needs ragstack.index.lexical (the orchestrators, through the
    # policy) does not load the flat store and what it imports (tempfile, shutil, the compression modules).
    if name in ("COLLECTION_NAME", "VectorStore"):
        from ragstack.index import base

        return getattr(base, name)
    if name == "FlatFileStore":
        from ragstack.index.flatfile import FlatFileStore

        return FlatFileStore
    raise AttributeError(f"module 'ragstack.index' has no attribute {name!r}")
