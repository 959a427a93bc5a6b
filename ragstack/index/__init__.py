"""Document store for retrieval: the :class:`VectorStore` interface, its default :class:`FlatFileStore`, and
:class:`~ragstack.index.pgvector.PgVectorStore` (Postgres + pgvector; imported on demand: it needs psycopg).
:func:`~ragstack.index.config.open_store` picks one from the configuration.

Pure Python and numpy (no Triton import), so ingestion tools and tests use it directly and the Triton model
that owns the store only wires it up.
"""
from ragstack.index.base import COLLECTION_NAME, VectorStore
from ragstack.index.flatfile import FlatFileStore

__all__ = ["COLLECTION_NAME", "FlatFileStore", "VectorStore"]
