"""Grounded answers (issue 18): a required citation, the citation-support check in usage, abstention below the
reranker threshold, and the extractive `quote` task (its spans, its EBNF, and end to end through rag.run on the
tiny generator: every quote is a verbatim substring of the context it cites)."""
import json
from pathlib import Path

import jsonschema
import pytest

from ragstack import rag
from ragstack.policy import RuntimePolicy
from ragstack.server import ROOT

CONFIGURED = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json")
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The storage team's on-call rotation lasts 7 days. Handover happens every Monday at 10:00 local time.",
         "## Stipend\n- The primary on-call engineer is paid a stipend of $250 for each week; the secondary gets "
         "$100.\n- Stipends are paid monthly.",
         "Meals on domestic travel may cost up to $75 per day, tips included. Keep the \"itemised\" receipt."]


def engines_with(scores, generate):
    def embed_query(query, timer):
        return [1.0], 3

    def search(collection, vector, top_k):
        return [rag.Context(text=t, doc_id=f"d{i}", chunk_id=f"d{i}#0", score=0.5) for i, t in enumerate(TEXTS)]

    def rerank(query, texts, timer):
        return scores[:len(texts)]

    return rag.Engines(embed_query, search, rerank, generate, lambda s, u: len((s + u).split()))


def fixed_reply(text, calls=None):
    def generate(system, user, schema, policy, max_tokens, on_delta, timer, guide=None):
        if calls is not None:
            calls.append(dict(schema=schema, guide=guide, policy=policy))
        return {"text": text(schema, guide) if callable(text) else text, "finish_reason": "stop",
                "num_input_tokens": 10, "num_output_tokens": 5}
    return generate


def test_answer_schema_requires_a_citation_when_contexts_exist():
    schema = rag.answer_schema("answer", ["ctx-1", "ctx-2"], None, 256)
    assert schema["properties"]["citations"]["minItems"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"answer": "a", "citations": []}, schema)
    assert "minItems" not in rag.answer_schema("answer", [], None, 256)["properties"]["citations"]


def test_citation_support_is_reported_in_usage():
    reply = json.dumps({"answer": "The rotation lasts 7 days.", "citations": ["ctx-1", "ctx-2"]})
    result = rag.run(rag.RagRequest(query="how long is on-call?"), engines_with([0.9, 0.8, 0.7], fixed_reply(reply)),
                     CONFIGURED)
    support = {c["id"]: c for c in result.usage["citations"]}
    assert support["ctx-1"]["supported"] and support["ctx-1"]["overlap"] == 1.0   # rotation, lasts, 7, days
    assert not support["ctx-2"]["supported"]
    assert result.usage["citations_supported"] is False and result.usage["abstained"] is False


def test_support_needs_the_answers_number():
    ctx = [rag.Context(text=TEXTS[0], doc_id="d", chunk_id="c", score=0, id="ctx-1")]
    assert not rag.citation_support("The on-call rotation lasts 14 days.", ["ctx-1"], ctx)[0]["supported"]
    assert rag.key_tokens("It is $250, i.e. 7-day.") == {"$250", "7", "day"}


@pytest.mark.parametrize("task", ["answer", "quote"])
def test_below_the_threshold_the_answer_says_not_in_the_documents(task):
    calls = []
    threshold = CONFIGURED.task(task).abstain_below_rerank
    assert threshold is not None
    low = threshold - 0.05
    deltas = []
    result = rag.run(rag.RagRequest(query="what is the dental plan?", task=task),
                     engines_with([low, low - 0.1, low - 0.2], fixed_reply("{}", calls)), CONFIGURED,
                     on_delta=deltas.append)
    assert not calls                                     # nothing generated, nothing invented
    assert json.loads("".join(deltas)) == result.answer  # a streaming caller gets the same answer
    assert result.answer["not_in_documents"] is True and result.answer["citations"] == []
    assert result.answer["answer"] == rag.NOT_IN_DOCUMENTS
    assert result.usage["abstained"] and result.usage["finish_reason"] == "abstained"
    assert result.usage["best_rerank_score"] == pytest.approx(low)


def test_quote_spans_are_verbatim_sentences_without_markup():
    spans = rag.quote_spans(TEXTS[1])
    assert spans[0].startswith("The primary on-call engineer") and "Stipends are paid monthly." in spans
    assert all(s in TEXTS[1] for s in spans) and not any(s.startswith(("-", "#")) for s in spans)
    long = "word " * 80 + "end; and then a clause that is long enough to stand."
    assert all(len(s) <= rag.QUOTE_MAX_CHARS and s in long for s in rag.quote_spans(long))


def test_quote_grammar_is_built_per_request_and_cached():
    ctx = [rag.Context(text=t, doc_id="d", chunk_id="c", score=0, id=f"ctx-{i}") for i, t in enumerate(TEXTS, 1)]
    grammar = rag.quote_grammar(ctx)
    assert grammar.startswith("root ::=") and grammar.count("q") >= 3
    assert rag.quote_grammar(ctx) is grammar                     # the same contexts: the cached text
    xgrammar = pytest.importorskip("xgrammar")
    xgrammar.Grammar.from_ebnf(grammar)                          # parses in xgrammar's dialect


def test_quote_task_checks_and_summarises_the_quotes():
    calls = []
    good = json.dumps({"quotes": [{"context": "ctx-1", "text": "The storage team's on-call rotation lasts 7 days."}]})
    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote"),
                     engines_with([0.9, 0.8, 0.75], fixed_reply(good, calls)), CONFIGURED)
    assert calls[0]["guide"][0] == "ebnf_grammar"
    assert result.answer["citations"] == ["ctx-1"] and result.answer["answer"].endswith("7 days.")
    assert result.usage["citations_supported"] is True
    bad = json.dumps({"quotes": [{"context": "ctx-2", "text": "The storage team's on-call rotation lasts 7 days."}]})
    with pytest.raises(RuntimeError, match="not verbatim"):
        rag.run(rag.RagRequest(query="q", task="quote"), engines_with([0.9, 0.8, 0.75], fixed_reply(bad)), CONFIGURED)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from ragstack.generation import InflightBatchingEngine

    built = REPO / "build" / "models" / "tiny" / "generate"
    if not (built / "engine.json").is_file():
        from ragstack.model_builders import build_tiny
        built = build_tiny(tmp_path_factory.mktemp("models") / "tiny") / "generate"
    eng = InflightBatchingEngine(built, max_batch_size=4, cancel_poll_s=0.0)
    yield eng
    eng.shutdown(10)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quote_through_rag_on_the_tiny_generator_is_verbatim(tiny_engine, seed):
    """The random-weight generator under the quote EBNF (sampled, so each seed picks other spans): every quote
    is a substring of the context it cites, whatever the model prefers."""
    from ragstack.generation import GenerationRequest

    tok = tiny_engine.tokenizer

    def generate(system, user, schema, policy, max_tokens, on_delta, timer, guide=None):
        guide_type, guide_text = guide or ("json_schema", json.dumps(schema))
        prompt = tok.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        res = tiny_engine.generate(GenerationRequest(
            input_ids=ids, max_new_tokens=max_tokens, end_id=tok.eos_token_id, temperature=1.0, seed=seed,
            guide_type=guide_type, guide=guide_text, exclude_input_in_output=True, **policy.penalties()),
            timeout=120)
        return {"text": tok.decode(res.output_ids, skip_special_tokens=True), "num_input_tokens": len(ids),
                "num_output_tokens": res.num_output_tokens, "finish_reason": res.finish_reason}

    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote", max_tokens=256),
                     engines_with([0.9, 0.8, 0.75], generate), CONFIGURED)
    by_id = {c.id: c.text for c in result.contexts}
    assert 1 <= len(result.answer["quotes"]) <= rag.MAX_QUOTES
    for q in result.answer["quotes"]:
        assert q["text"] in by_id[q["context"]]
