"""ragstack.engines: batched, padded engine outputs against a plain per-text computation done here."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from ragstack.engines.embedding import EmbeddingEngine
from ragstack.engines.reranking import RerankEngine
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer, pad_batch
from tests.reference import (TASK, qwen3_embedding_ids, qwen3_rerank_ids, reference_embedding,
                             reference_yes_no)

MODELS = Path(__file__).resolve().parents[2] / "build" / "models"
TINY, DEMO = MODELS / "tiny", MODELS / "demo"
TEXTS = ["yes", "the index retrieves the passage and the engine embeds a vector",
         "a batch of token ids streams through the cache; " * 12,          # ~200 tokens
         "Triton answers with citations and metrics. " * 80]               # past max_length: truncated
TOL = 1e-5

if not (TINY / "embed" / "engine.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)
needs_demo = pytest.mark.skipif(not (DEMO / "rerank" / "engine.json").is_file(), reason="demo set not built")


@pytest.fixture(scope="module")
def embed_engine():
    return EmbeddingEngine(TINY / "embed")


@pytest.fixture(scope="module")
def embed_tok():
    return EmbedTokenizer(TINY / "embed")


@pytest.fixture(scope="module")
def rerank_engine():
    return RerankEngine(TINY / "rerank")


@pytest.fixture(scope="module")
def rerank_tok():
    return RerankTokenizer(TINY / "rerank")


def repad(input_ids, attention_mask, side):
    """The same rows, padded on ``side`` instead."""
    rows = [row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask)]
    return pad_batch(rows, pad_id=0, side=side, max_length=input_ids.shape[1])


@pytest.mark.parametrize("input_type", ["query", "document"])
def test_embedding_matches_unbatched_reference(embed_engine, embed_tok, input_type):
    spec = embed_engine.spec
    input_ids, attention_mask, _ = embed_tok.encode(TEXTS, input_type)
    got = embed_engine(input_ids, attention_mask)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), spec.dim)
    assert spec.dim < embed_engine.model.config.hidden_size              # Matryoshka truncation is exercised
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=TOL)
    model = AutoModel.from_pretrained(TINY / "embed", dtype=torch.float32).eval()
    for text, vector in zip(TEXTS, got):
        string = f"Instruct: {TASK}\nQuery:{text}" if input_type == "query" else text
        ids = qwen3_embedding_ids(embed_tok.tokenizer, string, spec.max_length)
        expected = reference_embedding(model, ids, "last_token", spec.dim)
        assert np.abs(vector - expected).max() < TOL


def test_left_and_right_padding_pool_alike(embed_engine, embed_tok):
    input_ids, attention_mask, _ = embed_tok.encode(TEXTS[:3], "document")
    assert embed_tok.spec.padding_side == "left"
    right = embed_engine(*repad(input_ids, attention_mask, "right"))
    assert np.abs(embed_engine(input_ids, attention_mask) - right).max() < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pooling_matches_reference(embed_tok, side):
    engine = EmbeddingEngine(TINY / "embed")
    engine.spec = dataclasses.replace(engine.spec, pooling="mean")
    texts = TEXTS[:3]
    input_ids, attention_mask, _ = embed_tok.encode(texts, "document")
    got = engine(*repad(input_ids, attention_mask, side))
    for text, vector in zip(texts, got):
        ids = qwen3_embedding_ids(embed_tok.tokenizer, text, engine.spec.max_length)
        assert np.abs(vector - reference_embedding(engine.model, ids, "mean", engine.spec.dim)).max() < TOL


def test_rerank_matches_unbatched_reference(rerank_engine, rerank_tok):
    tok, max_length = rerank_tok.tokenizer, rerank_engine.spec.max_length
    query = "what does the server return?"
    input_ids, attention_mask = rerank_tok.encode_pairs(query, TEXTS)
    got = rerank_engine(input_ids, attention_mask)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS),)
    assert input_ids.shape[1] == max_length                             # TEXTS[-1] is cut to fit
    model = AutoModelForCausalLM.from_pretrained(TINY / "rerank", dtype=torch.float32).eval()
    for doc, score in zip(TEXTS, got):
        ids = qwen3_rerank_ids(tok, query, doc, max_length)
        assert abs(score - reference_yes_no(model, tok, ids)) < TOL
    right = rerank_engine(*repad(input_ids, attention_mask, "right"))
    assert np.abs(got - right).max() < TOL
    assert len(set(np.round(got, 4))) > 1                                # scores depend on the document


@pytest.mark.parametrize("engine_name", ["embed_engine", "rerank_engine"])
@pytest.mark.parametrize("input_ids, attention_mask, message", [
    (np.ones((2, 4), np.int32), np.ones((2, 5), np.int32), "differ in shape"),
    (np.ones(4, np.int32), np.ones(4, np.int32), "2-D integer"),
    (np.ones((2, 4), np.float32), np.ones((2, 4), np.int32), "2-D integer"),
    (np.full((1, 4), 10**6, np.int32), np.ones((1, 4), np.int32), r"input_ids must lie in \[0, "),
    (np.full((1, 4), -1, np.int32), np.ones((1, 4), np.int32), r"input_ids must lie in \[0, "),
    (np.ones((2, 4), np.int32), np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.int32), r"rows \[1\] have no real"),
    (np.ones((1, 4), np.int32), np.full((1, 4), 2, np.int32), "only 0 and 1"),
    (np.ones((1, 513), np.int32), np.ones((1, 513), np.int32), "exceeds the engine's max_length 512"),
    (np.ones((0, 4), np.int32), np.ones((0, 4), np.int32), "empty token batch"),
])
def test_bad_token_batches(request, engine_name, input_ids, attention_mask, message):
    engine = request.getfixturevalue(engine_name)
    with pytest.raises(InvalidInput, match=message):
        engine(input_ids, attention_mask)


@needs_demo
def test_bi_encoder_cosine_equals_embedder_cosine():
    embedder, embed_tok = EmbeddingEngine(DEMO / "embed"), EmbedTokenizer(DEMO / "embed")
    reranker, rerank_tok = RerankEngine(DEMO / "rerank"), RerankTokenizer(DEMO / "rerank")
    query = "what is Triton Inference Server?"
    documents = ["Triton Inference Server serves models over HTTP and gRPC.", "A recipe for apple pie.",
                 "GPUs run transformer models quickly when batched. " * 3]
    input_ids, attention_mask = rerank_tok.encode_pairs(query, documents)
    got = reranker(input_ids, attention_mask)
    query_vector = embedder(*embed_tok.encode([query], "query")[:2])[0]
    document_vectors = embedder(*embed_tok.encode(documents, "document")[:2])
    expected = (document_vectors @ query_vector + 1) / 2
    assert np.abs(got - expected).max() < TOL
    assert got[0] > got[1]
    left = reranker(*repad(input_ids, attention_mask, "left"))
    assert np.abs(got - left).max() < TOL
    no_document = input_ids.copy()
    no_document[attention_mask == 1] = rerank_tok.tokenizer.cls_token_id
    with pytest.raises(InvalidInput, match="no \\[SEP\\] found"):
        reranker(no_document, attention_mask)
