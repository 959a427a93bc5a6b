"""Grounded answers (issue 18): a required citation, the citation-support check in usage, abstention below the
reranker threshold, and the extractive `quote` task (its spans, its EBNF, and end to end through rag.run on the
tiny generator: every quote is a verbatim substring of the context it cites)."""
import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest

from ragstack.pipeline import rag
from ragstack.governance.policy import RuntimePolicy
from ragstack_dev.server import ROOT

CONFIGURED = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json")
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The storage team's on-call rotation lasts 7 days. Handover happens every Monday at 10:00 local time.",
         "## Stipend\n- The primary on-call engineer is paid a stipend of $250 for each week; the secondary gets "
         "$100.\n- Stipends are paid monthly.",
         "Meals on domestic travel may cost up to $75 per day, tips included. Keep the \"itemised\" receipt."]


def quote_policy(**settings):
    """The configured policy with the quote task's selection settings replaced."""
    quote = dataclasses.replace(CONFIGURED.task("quote"), **settings)
    return RuntimePolicy({**CONFIGURED.tasks, "quote": quote}, CONFIGURED.default_task, CONFIGURED.thresholds)


def engines_with(scores, generate):
    def embed_query(query, timer):
        return [1.0], 3

    def search(collection, vector, top_k, query=None, search=None):
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


MARKDOWN = """ps, and how on-call work is compensated. It applies to every team.

### Lodging

- Hotels in high-cost cities: up to **$320 per night**, before taxes. The high-cost cities are London,
  New York and Tokyo.
- Stays longer than 14 nights should use an apartment.

| Plan | Requests per minute | Streams |
|------|---------------------|---------|
| Free | 60 | 2 |
| Pro | 600 | 20 |

Rate limits are enforced with a token bucket. A client that has been idle may send a burst of up to twice its
per-minute limit within 10 seconds; after that, requests are admitted at the steady rate."""


def test_quote_units_follow_the_markdown_structure():
    units = rag.quote_units(MARKDOWN)
    texts = [u.text for u in units]
    assert all(t in MARKDOWN for t in texts)                             # verbatim, wrapped lines included
    assert texts[0] == "It applies to every team."                       # the chunk's cut first sentence is dropped
    item = "Hotels in high-cost cities: up to **$320 per night**, before taxes. The high-cost cities are London,\n  New York and Tokyo."
    assert item in texts                                                 # a list item whole, with its wrapped line
    assert units[texts.index(item)].label == ("Lodging: Hotels in high-cost cities: up to $320 per night, before "
                                              "taxes. The high-cost cities are London, New York and Tokyo.")
    row = units[texts.index("Pro | 600 | 20")]                           # a table row, scored with its header
    assert row.label == "Lodging: Plan: Pro; Requests per minute: 600; Streams: 20"
    assert not any("---" in t or t.startswith("Plan |") for t in texts)
    assert "Rate limits are enforced with a token bucket." in texts     # a paragraph: one sentence a span
    assert any(t.startswith("A client that has been idle") and "\n" in t for t in texts)
    # before the chunk's own first heading, the chunk's heading path labels its spans
    assert rag.quote_units("The rotation lasts 7 days.", "# Policy > ## Rotations")[0].label == \
        "Rotations: The rotation lasts 7 days."


def test_quote_candidates_are_the_best_labelled_spans_once_each():
    ctx = [rag.Context(text=MARKDOWN, doc_id="d", chunk_id=f"c{i}", score=0, id=f"ctx-{i}") for i in (1, 2)]
    scored = []

    def rerank(query, texts, timer):
        scored.extend(texts)
        return [1.0 if "Requests per minute: 600" in t else 0.1 for t in texts]
    def unused(*args, **kwargs):
        raise AssertionError("quote_candidates uses the reranker only")
    eng = rag.Engines(unused, unused, rerank, unused, unused)
    best = rag.quote_candidates("Pro rate limit?", ctx, eng, rag.Timer(), limit=3)
    assert len(scored) == len(rag.quote_units(MARKDOWN))                # the second copy's spans: not scored again
    assert [c.text for c in best][0] == "Pro | 600 | 20" and best[0].id == "ctx-1" and len(best) == 3


def test_quote_by_rerank_generates_nothing_and_cites_the_best_span():
    calls, deltas = [], []
    policy = quote_policy(quote_select="rerank", max_quotes=1)
    scores = iter([[0.9, 0.8, 0.75], [0.2, 0.95, 0.3, 0.1, 0.4, 0.2]])
    eng = engines_with(None, fixed_reply("{}", calls))
    eng.rerank = lambda query, texts, timer: next(scores)[:len(texts)]
    result = rag.run(rag.RagRequest(query="how much is the stipend?", task="quote"), eng, policy,
                     on_delta=deltas.append)
    assert not calls and result.usage["tokens_out"] == 0 and result.usage["finish_reason"] == "extracted"
    spans = [s for t in TEXTS for s in rag.quote_spans(t)]
    assert result.answer["quotes"] == [{"context": "ctx-1", "text": spans[1]}]
    assert result.answer["answer"] == spans[1] and result.answer["citations"] == ["ctx-1"]
    assert json.loads(deltas[0])["quotes"] == result.answer["quotes"]


@pytest.mark.parametrize("context_scores, span_scores, abstains", [
    ([0.6, 0.5, 0.4], [0.1, 0.95, 0.3, 0.1, 0.4, 0.2], False),    # contexts below the threshold, a span above it
    ([0.9, 0.8, 0.75], [0.1, 0.5, 0.3, 0.1, 0.4, 0.2], True)])    # contexts above it, every span below it
def test_quote_can_abstain_on_the_best_spans_score(context_scores, span_scores, abstains):
    policy = quote_policy(quote_select="rerank", max_quotes=1, abstain_on="span", abstain_below_rerank=0.722)
    scores = iter([context_scores, span_scores])
    eng = engines_with(None, fixed_reply("{}"))
    eng.rerank = lambda query, texts, timer: next(scores)[:len(texts)]
    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote"), eng, policy)
    assert result.usage["abstained"] is abstains
    if abstains:
        assert result.answer["not_in_documents"] and result.usage["best_rerank_score"] == 0.5
    else:
        assert result.usage["best_span_score"] == 0.95 and result.answer["citations"] == ["ctx-1"]


def test_quote_by_index_maps_the_generators_numbers_to_spans():
    calls = []
    policy = quote_policy(quote_select="index", quote_candidates=3, max_quotes=1)
    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote"),
                     engines_with([0.9, 0.8, 0.75], fixed_reply('{"quotes": [2]}', calls)), policy)
    schema = calls[0]["schema"]
    assert schema["properties"]["quotes"]["items"]["enum"] == [1, 2, 3] and calls[0]["guide"] is None
    quote = result.answer["quotes"][0]
    assert quote["text"] in {c.id: c.text for c in result.contexts}[quote["context"]]


def test_quote_settings_are_validated():
    base = RuntimePolicy.load(REPO / "config" / "runtime_policy.json")
    data = {"version": 1, "default_task": "answer",
            "tasks": {"answer": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64},
                      "quote": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "quote_select": "index",
                                "quote_candidates": 6, "max_quotes": 1}},
            "thresholds": base.thresholds.as_dict(), "events": {"log_path": None}}
    q = RuntimePolicy.from_dict(data).task("quote")
    assert (q.quote_select, q.quote_candidates, q.max_quotes) == ("index", 6, 1)
    for key, bad in (("quote_select", "vote"), ("max_quotes", 0), ("quote_candidates", 1.5), ("abstain_on", "doc")):
        broken = json.loads(json.dumps(data))
        broken["tasks"]["quote"][key] = bad
        with pytest.raises(ValueError, match=key):
            RuntimePolicy.from_dict(broken)


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
    writer = quote_policy(quote_select="generate")
    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote"),
                     engines_with([0.9, 0.8, 0.75], fixed_reply(good, calls)), writer)
    assert calls[0]["guide"][0] == "ebnf_grammar"
    assert result.answer["citations"] == ["ctx-1"] and result.answer["answer"].endswith("7 days.")
    assert result.usage["citations_supported"] is True
    bad = json.dumps({"quotes": [{"context": "ctx-2", "text": "The storage team's on-call rotation lasts 7 days."}]})
    with pytest.raises(RuntimeError, match="not verbatim"):
        rag.run(rag.RagRequest(query="q", task="quote"), engines_with([0.9, 0.8, 0.75], fixed_reply(bad)), writer)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from ragstack.engines.generation import InflightBatchingEngine

    built = REPO / "build" / "models" / "tiny" / "generate"
    if not (built / "engine.json").is_file():
        from ragstack_dev.model_builders import build_tiny
        built = build_tiny(tmp_path_factory.mktemp("models") / "tiny") / "generate"
    eng = InflightBatchingEngine(built, max_batch_size=4, cancel_poll_s=0.0)
    yield eng
    eng.shutdown(10)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quote_through_rag_on_the_tiny_generator_is_verbatim(tiny_engine, seed):
    """The random-weight generator under the quote EBNF (sampled, so each seed picks other spans): every quote
    is a substring of the context it cites, whatever the model prefers."""
    from ragstack.engines.generation import GenerationRequest

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

    policy = quote_policy(quote_select="generate", max_quotes=2, quote_candidates=4)
    result = rag.run(rag.RagRequest(query="how long is on-call?", task="quote", max_tokens=256),
                     engines_with([0.9, 0.8, 0.75], generate), policy)
    by_id = {c.id: c.text for c in result.contexts}
    assert 1 <= len(result.answer["quotes"]) <= 2
    for q in result.answer["quotes"]:
        assert q["text"] in by_id[q["context"]]
