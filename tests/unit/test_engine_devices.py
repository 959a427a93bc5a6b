"""The engines' ``device`` / ``dtype`` / ``model`` arguments, on CPU (and on CUDA where there is one).

The default stays CPU float32; bfloat16 must run the same code paths (sampling on float32 logits, grammar masks,
pooling) and keep greedy in-flight batching identical to generating alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ragstack.engines.embedding import EmbeddingEngine
from ragstack.engines.reranking import RerankEngine
from ragstack.engines.common import resolve_device, resolve_dtype
from ragstack.contracts.errors import InvalidInput
from ragstack.engines.generation import GenerationRequest, InflightBatchingEngine, guided
from ragstack.engines.generation.sampling import make_generator
from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer

TINY = Path(__file__).resolve().parents[2] / "build" / "models" / "tiny"
WAIT = 60
NO_END = -1
SCHEMA = {"type": "object",
          "properties": {"answer": {"type": "string", "maxLength": 20},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["answer", "n"], "additionalProperties": False}

if not (TINY / "generate" / "engine.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def prompts(tokenizer) -> list[list[int]]:
    texts = ["the server returns JSON output", "a query", "the reranker scores three documents and the engine "
             "streams token ids back", "Is it relevant?"]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                               add_generation_prompt=True)["input_ids"]) for t in texts]


def greedy(ids, max_new_tokens=16, **kw) -> GenerationRequest:
    kw.setdefault("end_id", NO_END)
    return GenerationRequest(list(ids), max_new_tokens, temperature=0.0, exclude_input_in_output=True, **kw)


def batched_equals_alone(engine: InflightBatchingEngine) -> None:
    """Each prompt alone, then all at once (admitted in one iteration, leaving at different steps)."""
    inputs = prompts(engine.tokenizer)
    caps = [16, 9, 13, 5]
    alone = [engine.generate(greedy(ids, cap), timeout=WAIT).output_ids for ids, cap in zip(inputs, caps)]
    handles = [engine.submit(greedy(ids, cap), lambda *_: None) for ids, cap in zip(inputs, caps)]
    together = [h.wait(WAIT).output_ids for h in handles]
    assert [len(t) for t in alone] == caps
    assert together == alone
    assert engine.stats()["max_batch_seen"] > 1


def test_dtype_and_device_resolution():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("int8", torch.int32, "fp8"):
        with pytest.raises(ValueError, match="unsupported dtype"):
            resolve_dtype(bad)
    assert resolve_device(None) == torch.device("cpu") == resolve_device("cpu")
    assert make_generator(7, "cpu").device == torch.device("cpu")
    # Same seed, same stream: the device argument does not change the CPU behaviour.
    assert torch.equal(torch.rand(4, generator=make_generator(7)), torch.rand(4, generator=make_generator(7, "cpu")))


def test_generation_defaults_are_cpu_float32():
    engine = InflightBatchingEngine(TINY / "generate", max_batch_size=4)
    try:
        assert engine.device == torch.device("cpu") and engine.dtype is torch.float32
        assert engine.model.dtype is torch.float32 and engine.model.device.type == "cpu"
    finally:
        engine.shutdown()


def test_generation_bfloat16_on_cpu_batches_like_alone():
    engine = InflightBatchingEngine(TINY / "generate", max_batch_size=4, dtype="bfloat16")
    try:
        assert engine.model.dtype is torch.bfloat16
        # transformers keeps the rotary frequencies in float32; the engine must not cast them down.
        assert engine.model.model.rotary_emb.inv_freq.dtype is torch.float32
        batched_equals_alone(engine)
        # Sampling (on float32 logits) and a grammar mask work on a bfloat16 model too.
        ids = prompts(engine.tokenizer)[0]
        sampled = engine.generate(GenerationRequest(ids, 8, end_id=NO_END, temperature=0.8, top_k=50, top_p=0.9,
                                                    seed=3, exclude_input_in_output=True), timeout=WAIT)
        assert sampled.num_output_tokens == 8 and all(0 <= t < engine.vocab_size for t in sampled.output_ids)
        guided_result = engine.generate(greedy(ids, 120, guide_type="json_schema", guide=json.dumps(SCHEMA)),
                                        timeout=WAIT)
        assert guided_result.finish_reason == "grammar_terminated"
        jsonschema.validate(json.loads(engine.tokenizer.decode(guided_result.output_ids)), SCHEMA)
    finally:
        engine.shutdown()


def test_injected_model_is_placed_in_the_requested_dtype():
    model = AutoModelForCausalLM.from_pretrained(TINY / "generate", dtype=torch.float32)
    engine = InflightBatchingEngine(TINY / "generate", max_batch_size=2, dtype=torch.float16, model=model)
    try:
        assert engine.model is model and model.dtype is torch.float16
        result = engine.generate(greedy(prompts(engine.tokenizer)[1], 6), timeout=WAIT)
        assert result.num_output_tokens == 6
    finally:
        engine.shutdown()


def test_generation_without_xgrammar(monkeypatch):
    """Unguided requests are served as usual; a guided one fails at submit as InvalidInput."""
    def missing():
        raise ImportError("No module named 'xgrammar'")

    monkeypatch.setattr(guided, "_import_xgrammar", missing)
    engine = InflightBatchingEngine(TINY / "generate", max_batch_size=2)
    try:
        ids = prompts(engine.tokenizer)[1]
        assert engine.generate(greedy(ids, 5), timeout=WAIT).num_output_tokens == 5
        with pytest.raises(InvalidInput, match="guided decoding is not available"):
            engine.submit(greedy(ids, 5, guide_type="json"), lambda *_: None)
        with pytest.raises(InvalidInput, match="unknown guided decoding guide type"):
            engine.submit(greedy(ids, 5, guide_type="yaml", guide="x"), lambda *_: None)
    finally:
        engine.shutdown()


def test_placeholder_xgrammar_module_means_no_guides(monkeypatch):
    """An empty module standing in for xgrammar (as benchmarks/gpu_engines.py registers) counts as absent."""
    import types

    from transformers import AutoTokenizer

    monkeypatch.setitem(sys.modules, "xgrammar", types.ModuleType("xgrammar"))
    compiler = guided.GuideCompiler(AutoTokenizer.from_pretrained(TINY / "generate"), 605)
    assert compiler.unavailable and "placeholder" in compiler.unavailable
    with pytest.raises(InvalidInput, match="guided decoding is not available"):
        compiler.compile("json_schema", json.dumps(SCHEMA))


def test_embedding_and_rerank_in_bfloat16():
    texts = ["yes", "the index retrieves the passage and the engine embeds a vector",
             "a batch of token ids streams through the cache; " * 12]
    embed_tok = EmbedTokenizer(TINY / "embed")
    input_ids, attention_mask, _ = embed_tok.encode(texts, "document")
    full = EmbeddingEngine(TINY / "embed")(input_ids, attention_mask)
    half = EmbeddingEngine(TINY / "embed", dtype="bfloat16")
    assert half.model.dtype is torch.bfloat16
    got = half(input_ids, attention_mask)
    assert got.dtype == np.float32 and got.shape == full.shape == (len(texts), half.dim)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert (np.sum(got * full, axis=1) > 0.98).all()  # bfloat16 rounding only

    rerank_tok = RerankTokenizer(TINY / "rerank")
    pair_ids, pair_mask = rerank_tok.encode_pairs("what does the server return?", texts)
    full_scores = RerankEngine(TINY / "rerank")(pair_ids, pair_mask)
    half_scores = RerankEngine(TINY / "rerank", dtype=torch.bfloat16)(pair_ids, pair_mask)
    assert half_scores.dtype == np.float32 and half_scores.shape == (len(texts),)
    assert np.abs(half_scores - full_scores).max() < 0.05


@needs_cuda
def test_generation_on_cuda_batches_like_alone():
    engine = InflightBatchingEngine(TINY / "generate", max_batch_size=4, device="cuda", dtype="float32")
    try:
        assert engine.model.device.type == "cuda"
        batched_equals_alone(engine)
        ids = prompts(engine.tokenizer)[0]
        result = engine.generate(greedy(ids, 120, guide_type="json_schema", guide=json.dumps(SCHEMA)), timeout=WAIT)
        assert result.finish_reason == "grammar_terminated"
        jsonschema.validate(json.loads(engine.tokenizer.decode(result.output_ids)), SCHEMA)
    finally:
        engine.shutdown()


@needs_cuda
def test_embedding_on_cuda_matches_cpu():
    embed_tok = EmbedTokenizer(TINY / "embed")
    input_ids, attention_mask, _ = embed_tok.encode(["a query", "the engine embeds a vector"], "query")
    cpu = EmbeddingEngine(TINY / "embed")(input_ids, attention_mask)
    gpu = EmbeddingEngine(TINY / "embed", device="cuda")(input_ids, attention_mask)
    assert gpu.dtype == np.float32 and np.abs(gpu - cpu).max() < 1e-3
