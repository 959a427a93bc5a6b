"""The RAG pipeline with in-process engines, no Triton: ``ragstack.pipeline.rag.run`` over the same tokenizers and models the
served path uses, wired by the same ``rag.token_engines`` as ragstack/triton/orchestrator.py (EmbedTokenizer +
EmbeddingEngine, a FlatFileStore, RerankTokenizer + RerankEngine, InflightBatchingEngine with the task's guide and
penalties). benchmarks/rag.py compares the server against it; benchmarks/answers.py measures answers with it.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

TORCH_THREADS = 2


class InProcessPipeline:
    """One model folder set (``models``/embed, rerank, generate) and a flat-file index (``index_dir``), under the
    committed runtime policy and the generator's prices; safe to call from several threads (the in-flight batcher
    batches concurrent generations; tokenization is serialised, see ``rag.token_engines``)."""

    def __init__(self, models: Path, index_dir: Path, torch_threads: int = TORCH_THREADS):
        import torch

        from ragstack.triton import adapter as ta
        from ragstack.tokenization.generation import GeneratorTokenizer
        from ragstack.engines.embedding import EmbeddingEngine
        from ragstack.engines.reranking import RerankEngine
        from ragstack.engines.generation import InflightBatchingEngine
        from ragstack.index import FlatFileStore
        from ragstack.governance.manifest import read_manifest
        from ragstack.governance.policy import RuntimePolicy
        from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer

        torch.set_num_threads(torch_threads)
        self.embed_tok = EmbedTokenizer(models / "embed")
        self.embed = EmbeddingEngine(models / "embed", num_threads=torch_threads)
        self.rerank_tok = RerankTokenizer(models / "rerank")
        self.rerank = RerankEngine(models / "rerank", num_threads=torch_threads)
        self.gen_tok = GeneratorTokenizer(models / "generate")
        self.generator = InflightBatchingEngine(models / "generate", max_batch_size=8, num_threads=torch_threads)
        self.store = FlatFileStore(index_dir)
        self.policy = RuntimePolicy.load(ta.DEFAULT_POLICY_FILE)
        self.prices = getattr(read_manifest(models / "generate"), "pricing", None)
        self.tok_lock = threading.Lock()

    def close(self) -> None:
        self.generator.shutdown(10)

    def _in_batches(self, engine, ids, mask, size: int) -> np.ndarray:
        return np.concatenate([engine(ids[s:s + size], mask[s:s + size]) for s in range(0, len(ids), size)])

    def ingest_corpus(self, collection: str = "default") -> dict:
        """data/corpus chunked and embedded as the `ingest` model does it (its default chunk size and overlap)."""
        from ragstack.triton.bls import EMBED_BATCH
        from ragstack.pipeline.chunking import chunk_text
        from ragstack.index.ops import handle
        from ragstack.pipeline.ingest import Document, ingest
        from ragstack_dev.server import ROOT

        max_tokens = min(256, self.embed_tok.spec.max_length)
        overlap = min(32, max_tokens // 4)
        docs = [Document(p.stem, p.read_text(encoding="utf-8"), {})
                for p in sorted((ROOT / "data" / "corpus").glob("*.md"))]

        def embed(texts):
            ids, mask, _ = self.embed_tok.encode(texts, "document")
            return self._in_batches(self.embed, ids, mask, EMBED_BATCH)

        def index(op, payload, vectors):
            return handle(self.store, op, collection, vectors=vectors, payload=payload)

        settings = {"chunk_tokens": max_tokens, "overlap_tokens": overlap, "embedder": self.embed_tok.spec.name,
                    "dim": self.embed_tok.spec.dim}
        report = ingest("upsert", collection, docs, embed=embed, index=index, settings=settings,
                        chunk=lambda text: chunk_text(text, self.embed_tok, max_tokens, overlap))
        return {"documents": len(docs), "chunks": sum(d["chunks"] for d in report["documents"])}

    def engines(self):
        from ragstack.pipeline import rag
        from ragstack.triton.bls import RERANK_BATCH
        from ragstack.engines.generation import GenerationRequest
        from ragstack.contracts.trtllm import finish_reason

        def search(collection, vector, top_k, query=None, search=None):
            return self.store.search(collection, np.asarray(vector, dtype=np.float32), int(top_k),
                                     query_text=query, search=search)

        def generate(system, user, guide_type, guide, policy, max_tokens, on_delta, timer):
            with (timer.stage("tokenize") if timer is not None else contextlib.nullcontext()), self.tok_lock:
                ids = self.gen_tok.prompt_ids(user, system)
            self.gen_tok.check_budget(len(ids), max_tokens)
            req = GenerationRequest(input_ids=ids, max_new_tokens=max_tokens, end_id=self.gen_tok.end_id,
                                    pad_id=self.gen_tok.pad_id, temperature=policy.temperature, top_k=0,
                                    top_p=policy.top_p, guide_type=guide_type, guide=guide,
                                    exclude_input_in_output=True, **policy.penalties())
            res = self.generator.generate(req, timeout=900)
            if res.finish_reason == "error":
                raise RuntimeError(res.error)
            return {"text": self.gen_tok.decode(res.output_ids), "num_input_tokens": res.num_input_tokens,
                    "num_output_tokens": res.num_output_tokens,
                    "finish_reason": finish_reason(res.num_output_tokens, max_tokens),
                    "queue_delay_us": (res.first_scheduled_time_ns - res.arrival_time_ns) / 1000.0}

        return rag.token_engines(
            self.embed_tok, self.rerank_tok, self.gen_tok, embed=self.embed, search=search, generate=generate,
            rerank=lambda ids, mask: self._in_batches(self.rerank, ids, mask, RERANK_BATCH),
            tokenize_lock=self.tok_lock)

    def ask(self, query: str, top_k: int, top_n: int, max_tokens) -> dict:
        from ragstack.pipeline import rag

        req = rag.validate_rag_request(rag.RagRequest(query=query, top_k=top_k, top_n=top_n, max_tokens=max_tokens))
        result = rag.run(req, self.engines(), self.policy, prices=self.prices)
        return {"answer": result.answer, "usage": result.usage}
