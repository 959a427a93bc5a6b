"""embed / rerank served by a real tritonserver equal a plain in-process transformers computation."""
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from tritonclient.utils import InferenceServerException

from ragstack.governance.engine_spec import EngineSpec
from tests.integration.helpers import admin_headers, infer, is_invalid_arg, make_input, strings, wire_headers
from tests.reference import (TASK, qwen3_embedding_ids, qwen3_rerank_ids, reference_embedding,
                             reference_yes_no)

pytestmark = pytest.mark.integration
TOL = 1e-5
TEXTS = ["yes", "the reranker scores the passage", "a batch of token ids streams through the cache; " * 9]


@pytest.fixture(scope="module")
def embed_reference(tiny_models):
    folder = tiny_models / "embed"
    spec = EngineSpec.read(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)

    def embed(text, input_type):
        string = f"Instruct: {TASK}\nQuery:{text}" if input_type == "query" else text
        return reference_embedding(model, qwen3_embedding_ids(tok, string, spec.max_length), "last_token", spec.dim)
    return embed


@pytest.mark.parametrize("input_type", ["query", "document"])
def test_embed_text_equals_in_process(client, embed_reference, input_type):
    out = infer(client, "embed_text", {"text": strings(TEXTS).reshape(-1, 1),
                                       "input_type": strings([input_type] * len(TEXTS)).reshape(-1, 1)})
    assert out["embedding"].shape == (len(TEXTS), 48)
    for text, vector in zip(TEXTS, out["embedding"]):
        assert np.abs(vector - embed_reference(text, input_type)).max() < TOL
    assert (out["num_tokens"].reshape(-1) > 0).all()


def test_concurrent_embed_requests_are_batched_and_exact(http, embed_reference):
    """Many one-text requests of different lengths at once: Triton's batcher merges them; results stay exact."""
    texts = [f"document {i}: " + "token " * (3 * i) for i in range(24)]

    pending = [http.async_infer("embed_text", [make_input("http", "text", strings([t]).reshape(1, 1))],
                                headers=wire_headers("http", None))
               for t in texts]                         # the HTTP client keeps up to 8 in flight
    vectors = [p.get_result().as_numpy("embedding")[0] for p in pending]
    for text, vector in zip(texts, vectors):
        assert np.abs(vector - embed_reference(text, "document")).max() < TOL
    stats = http.get_inference_statistics("embed", headers=admin_headers())["model_stats"][0]
    assert int(stats["execution_count"]) < int(stats["inference_count"])     # some executions held > 1 row


def test_raw_embed_engine_contract(client, embed_reference, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models / "embed")
    ids = qwen3_embedding_ids(tok, "the reranker scores the passage", 512)
    out = infer(client, "embed", {"input_ids": np.array([ids], np.int32),
                                  "attention_mask": np.ones((1, len(ids)), np.int32)})
    assert np.abs(out["embedding"][0] - embed_reference("the reranker scores the passage", "document")).max() < TOL


def test_rerank_text_equals_in_process(client, tiny_models):
    folder = tiny_models / "rerank"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    query = "what does the reranker score?"
    docs = TEXTS + ["Triton answers with citations. " * 200]          # too long: only the body is cut
    out = infer(client, "rerank_text", {"query": strings([query]), "documents": strings(docs)})
    scores = out["scores"]
    assert scores.shape == (len(docs),)
    for doc, score in zip(docs, scores):
        assert abs(score - reference_yes_no(model, tok, qwen3_rerank_ids(tok, query, doc, 512))) < TOL


BAD = [
    ("embed_text", {"text": strings([""]).reshape(1, 1)}, "empty"),
    ("embed_text", {"text": np.array([[b"\xff\xfe"]], dtype=object)}, "UTF-8"),
    ("embed_text", {"text": strings(["a"]).reshape(1, 1), "input_type": strings(["passage"]).reshape(1, 1)},
     "input_type"),
    ("embed_text", {"text": np.array([[1]], np.int32)}, "data-type"),                  # wrong dtype
    ("embed_text", {"text": strings(["a", "b"])}, "shape"),                           # wrong shape
    ("rerank_text", {"query": strings(["q"]), "documents": strings([])}, ""),
    ("rerank_text", {"query": strings([" "]), "documents": strings(["d"])}, "empty"),
    ("embed", {"input_ids": np.full((1, 4), 10 ** 6, np.int32), "attention_mask": np.ones((1, 4), np.int32)},
     "input_ids must lie in"),
    ("embed", {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 5), np.int32)}, "shape"),
    ("embed", {"input_ids": np.ones((1, 600), np.int32), "attention_mask": np.ones((1, 600), np.int32)},
     "max_length"),
]


@pytest.mark.parametrize("model, inputs, message", BAD, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input_is_invalid_arg_and_server_keeps_serving(client, model, inputs, message):
    with pytest.raises(InferenceServerException) as err:
        infer(client, model, inputs)
    assert is_invalid_arg(err.value), err.value
    assert message.lower() in str(err.value).lower()
    assert "Traceback" not in str(err.value)
    out = infer(client, "embed_text", {"text": strings(["still serving"]).reshape(1, 1)})
    assert out["embedding"].shape == (1, 48)
