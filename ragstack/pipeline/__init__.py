"""The request logic in plain Python: RAG (rag.py), ingestion (ingest.py, chunking.py, documents.py) and the prompt
runtime (prompt_runtime.py). The Triton models call into it; nothing here imports Triton."""
