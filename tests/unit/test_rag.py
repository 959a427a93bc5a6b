"""The RAG pipeline core with in-test engines: validation, ordering, schema, citations, timings."""
import dataclasses
import json
import time

import pytest

from ragstack.pipeline import rag
from ragstack.contracts.errors import InvalidInput
from ragstack.governance.policy import BudgetError, RuntimePolicy
from ragstack_dev.server import ROOT

CONFIGURED = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json")


def _without_abstention(path):
    data = json.loads(path.read_text())
    for task in data["tasks"].values():
        task.pop("abstain_below_rerank", None)
    return RuntimePolicy.from_dict(data)


# These tests drive fake rerank scores: abstention (tested on its own below) would stop them before generation.
POLICY = _without_abstention(ROOT / "config" / "runtime_policy.json")


def fake_engines(hits, rerank_scores, reply):
    calls = {}

    def embed_query(query, timer):
        with timer.stage("tokenize"):
            time.sleep(0.002)
        return [1.0, 0.0], 5

    def search(collection, vector, top_k, query=None, search=None):
        calls["search"] = (collection, top_k)
        calls["search_spec"] = (query, search)
        return [rag.Context(text=t, doc_id=f"d{i}", chunk_id=f"d{i}#0", score=s)
                for i, (t, s) in enumerate(hits)][:top_k]

    def rerank(query, texts, timer):
        calls["rerank"] = texts
        return rerank_scores[:len(texts)]

    def generate(system, user, schema, policy, max_tokens, on_delta, timer, guide=None):
        calls["generate"] = dict(system=system, user=user, schema=schema, policy=policy, max_tokens=max_tokens)
        text = reply(schema) if callable(reply) else reply
        if on_delta:
            on_delta(text)
        return {"text": text, "finish_reason": "stop", "num_input_tokens": 42, "num_output_tokens": 7}
    def count_tokens(system, user):
        return len((system + user).split())
    return rag.Engines(embed_query, search, rerank, generate, count_tokens), calls


HITS = [("alpha", 0.9), ("beta", 0.8), ("gamma", 0.7), ("delta", 0.6)]


def test_rerank_reorders_and_top_n_trims_and_citations_are_enumerated():
    engines, calls = fake_engines(HITS, [0.1, 0.9, 0.5, 0.2],
                                  lambda schema: json.dumps({"answer": "b", "citations": ["ctx-1"]}))
    result = rag.run(rag.RagRequest(query="q", top_k=4, top_n=2), engines, POLICY)
    assert [c.chunk_id for c in result.contexts] == ["d1#0", "d2#0"]
    assert [c.id for c in result.contexts] == ["ctx-1", "ctx-2"]
    schema = calls["generate"]["schema"]
    assert schema["properties"]["citations"]["items"]["enum"] == ["ctx-1", "ctx-2"]
    assert "[ctx-1] beta" in calls["generate"]["user"] and "alpha" not in calls["generate"]["user"]
    assert result.answer == {"answer": "b", "citations": ["ctx-1"]}
    usage = result.usage
    assert usage["tokens_in"] == 42 and usage["tokens_out"] == 7 and usage["query_tokens"] == 5
    assert set(usage["timings_ms"]) == {*rag.STAGES, "total"}
    assert usage["timings_ms"]["tokenize"] >= 2.0                       # nested inside embed, counted once
    assert sum(usage["timings_ms"][s] for s in rag.STAGES) <= usage["timings_ms"]["total"] + 0.01


def test_equal_rerank_scores_keep_retrieval_order():
    engines, _ = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    result = rag.run(rag.RagRequest(query="q", top_k=4, top_n=4), engines, POLICY)
    assert [c.text for c in result.contexts] == ["alpha", "beta", "gamma", "delta"]


def test_the_task_search_spec_reaches_the_index_and_usage_names_it():
    import dataclasses

    from ragstack.index.lexical import SearchSpec
    from ragstack.governance.policy import RuntimePolicy

    def with_search(spec):
        answer = dataclasses.replace(POLICY.task("answer"), search=spec, abstain_below_rerank=None)
        return RuntimePolicy({**POLICY.tasks, "answer": answer}, POLICY.default_task, POLICY.thresholds)

    hybrid = SearchSpec(mode="hybrid", depth=20)
    engines, calls = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    result = rag.run(rag.RagRequest(query="what is alpha", top_k=4, top_n=2), engines, with_search(hybrid))
    assert calls["search_spec"] == ("what is alpha", hybrid) and result.usage["search"] == "hybrid"
    dense = rag.run(rag.RagRequest(query="q", top_k=4, top_n=2), engines, with_search(SearchSpec()))
    assert calls["search_spec"] == ("q", SearchSpec()) and dense.usage["search"] == "dense"


def test_caller_documents_bypass_the_index():
    engines, calls = fake_engines([], [0.2, 0.8], json.dumps({"answer": "x", "citations": ["ctx-1"]}))
    docs = rag.parse_caller_documents(['{"id": "a", "text": "first"}', '{"id": "b", "text": "second"}'])
    result = rag.run(rag.RagRequest(query="q", documents=docs, top_n=1), engines, POLICY)
    assert "search" not in calls and [c.doc_id for c in result.contexts] == ["b"]


def test_citation_outside_the_contexts_is_refused():
    engines, _ = fake_engines(HITS, [0.9, 0.1], json.dumps({"answer": "a", "citations": ["nope"]}))
    with pytest.raises(RuntimeError):
        rag.run(rag.RagRequest(query="q", top_k=2, top_n=1), engines, POLICY)


def test_truncated_json_at_token_cap_is_reported_as_such():
    with pytest.raises(InvalidInput, match="max_tokens"):
        rag.check_answer('{"answer": "abc', {"type": "object"}, "length", [])


@pytest.mark.parametrize("task, policy", [("generate_json", (0.0, 1.0)), ("rank_candidates", (0.0, 1.0)),
                                          ("judge", (0.1, 0.9)), ("answer", (0.0, 1.0))])
def test_task_policies_reach_the_generator(task, policy):
    docs = rag.parse_caller_documents(["one", "two"])
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}

    def reply(s):
        return json.dumps({"generate_json": {"x": 1}, "rank_candidates": {"ranking": ["ctx-1", "ctx-2"]},
                           "judge": {"verdict": "supported", "reason": "r", "citations": ["ctx-1"]},
                           "answer": {"answer": "a", "citations": ["ctx-1"]}}[task])
    engines, calls = fake_engines([], [0.3, 0.6], reply)
    req = rag.RagRequest(query="q", task=task, documents=docs, schema=schema if task == "generate_json" else None)
    rag.run(rag.validate_rag_request(req), engines, POLICY)
    p = calls["generate"]["policy"]
    assert (p.temperature, p.top_p) == policy
    if task == "rank_candidates":                     # every candidate is ranked, not only top_n
        assert calls["generate"]["schema"]["properties"]["ranking"]["items"]["enum"] == ["ctx-1", "ctx-2"]
        assert "[ctx-1] two" in calls["generate"]["user"]             # the higher rerank score comes first


@pytest.mark.parametrize("kwargs, message", [
    (dict(query="  "), "query is empty"),
    (dict(query="q", task="poem"), "unknown task"),
    (dict(query="q", top_k=0), "top_k"),
    (dict(query="q", top_k=101), "top_k"),
    (dict(query="q", top_k=3, top_n=4), "top_n"),
    (dict(query="q", task="generate_json"), "needs a schema"),
    (dict(query="q", task="rank_candidates"), "needs caller-supplied documents"),
])
def test_bad_requests(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        rag.validate_rag_request(rag.RagRequest(**kwargs))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
    ('{"type": "nonsense"}', "not a valid JSON Schema"),
])
def test_bad_schemas(text, message):
    with pytest.raises(InvalidInput, match=message):
        rag.parse_schema(text)


@pytest.mark.parametrize("docs, message", [
    (["ok", " "], r"documents\[1\] is empty"),
    (['{"id": "a"}'], "string 'text'"),
    (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], "duplicate ids"),
    (["x" * (rag.MAX_DOCUMENT_CHARS + 1)], "characters; the limit"),
    (["{broken"], r"documents\[0\].*is not valid JSON"),
])
def test_bad_documents(docs, message):
    with pytest.raises(InvalidInput, match=message):
        rag.parse_caller_documents(docs)


def test_max_tokens_is_capped_by_the_task_policy():
    engines, _ = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    with pytest.raises(InvalidInput, match="max_tokens must be in"):
        rag.run(rag.RagRequest(query="q", max_tokens=POLICY.task("answer").max_tokens + 1), engines, POLICY)


def test_contexts_are_trimmed_to_the_prompt_budget_lowest_ranked_first():
    long_hits = [("word " * 1500, 0.9), ("word " * 1500, 0.8), ("word " * 1500, 0.7)]
    engines, calls = fake_engines(long_hits, [0.9, 0.8, 0.7], json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    result = rag.run(rag.RagRequest(query="q", top_k=3, top_n=3), engines, POLICY)
    assert [c.doc_id for c in result.contexts] == ["d0", "d1"]           # 2 x 1500 words fit in 4,096


def test_a_query_over_the_prompt_budget_is_flagged():
    engines, _ = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    with pytest.raises(BudgetError) as err:
        rag.run(rag.RagRequest(query="word " * 5000), engines, POLICY)
    assert err.value.flag == "token_budget_overrun"


def test_the_engine_prompt_limit_trims_further():
    hits = [("word " * 300, 0.9), ("word " * 300, 0.8), ("word " * 300, 0.7)]
    engines, _ = fake_engines(hits, [0.9, 0.8, 0.7], json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    engines.prompt_limit = lambda max_tokens: 700
    result = rag.run(rag.RagRequest(query="q", top_k=3, top_n=3), engines, POLICY)
    assert [c.doc_id for c in result.contexts] == ["d0", "d1"]


@pytest.mark.parametrize("words, counted", [(50, False), (1500, True)])
def test_contexts_are_counted_one_by_one_only_when_they_might_not_fit(words, counted):
    """Contexts short enough to fit at one token per byte are kept without counting each; longer ones are
    counted and trimmed; either way the kept prefix is the one exact counts give."""
    hits = [("word " * words, 0.9), ("word " * words, 0.8), ("word " * words, 0.7)]
    engines, _ = fake_engines(hits, [0.9, 0.8, 0.7], json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    seen = []

    def count_texts(texts):
        seen.append(list(texts))
        return [engines.count_tokens("", t) for t in texts]
    engines.count_texts = count_texts
    result = rag.run(rag.RagRequest(query="q", top_k=3, top_n=3), engines, POLICY)
    assert bool(seen) == counted
    exact = POLICY.trim_contexts([engines.count_tokens("", f"[ctx-{i}] {t}\n\n") for i, (t, _) in enumerate(hits)],
                                 engines.count_tokens(*rag.build_prompt("answer", "q", [])),
                                 POLICY.task("answer").max_tokens)
    assert len(result.contexts) == exact == (3 if words == 50 else 2)


PRICES = {"price_per_1k_input_usd": 0.01, "price_per_1k_output_usd": 0.03}


def test_cost_is_computed_from_manifest_prices():
    engines, _ = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    result = rag.run(rag.RagRequest(query="q"), engines, POLICY, prices=PRICES)
    assert result.usage["cost_usd"] == pytest.approx(42 / 1000 * 0.01 + 7 / 1000 * 0.03)


def test_worst_case_cost_over_the_limit_alerts_or_rejects_per_policy():
    import dataclasses

    engines, _ = fake_engines(HITS, [0.5] * 4, json.dumps({"answer": "a", "citations": ["ctx-1"]}))
    pricey = {"price_per_1k_input_usd": 1.0, "price_per_1k_output_usd": 1.0}
    alerts = []
    rag.run(rag.RagRequest(query="q"), engines, POLICY, prices=pricey, on_alert=lambda e, f: alerts.append((e, f)))
    assert alerts and alerts[0][0] == "cost_budget_exceeded" and alerts[0][1]["worst_case_cost_usd"] > 0.10
    strict = RuntimePolicy(POLICY.tasks, POLICY.default_task,
                           dataclasses.replace(POLICY.thresholds, cost_breach_action="reject"))
    with pytest.raises(BudgetError) as err:
        rag.run(rag.RagRequest(query="q"), engines, strict, prices=pricey)
    assert err.value.flag == "cost_budget_exceeded"


def test_an_answer_with_a_lone_surrogate_escape_stays_sendable():
    """xgrammar's unbounded JSON string allows "\\ud800"; json.loads makes it a lone surrogate that UTF-8 cannot
    encode, so the answer is sent ASCII-escaped (same JSON value) instead of failing the response."""
    import json as _json

    from ragstack.pipeline.rag import RagResult
    answer = _json.loads('{"answer": "x\\ud800", "citations": []}')
    out = RagResult(answer=answer, contexts=[], usage={}).outputs()["answer"]
    out.encode("utf-8")
    assert _json.loads(out) == answer


# ------------------------------------------------------------------------------------------ engine protocols
def test_the_fakes_and_the_orchestrators_engines_take_the_protocols_arguments():
    from types import SimpleNamespace

    from ragstack.tokenization.generation import GeneratorTokenizer
    from ragstack.triton.orchestrator import OrchestratorModel

    rag.check_engines(fake_engines(HITS, [1.0], "{}")[0])
    tok = SimpleNamespace(count_prompt=GeneratorTokenizer.count_prompt.__get__(object()),
                          prompt_limit=GeneratorTokenizer.prompt_limit.__get__(object()),
                          count_texts=GeneratorTokenizer.count_texts.__get__(object()))
    request = SimpleNamespace(parameters=lambda: "{}", trace=lambda: None, is_cancelled=lambda: False)
    model = SimpleNamespace(pb=None, gen_tok=tok, embed_tok=SimpleNamespace(), rerank_tok=SimpleNamespace())
    engines = OrchestratorModel._engines(model, request)  # type: ignore[arg-type]
    rag.check_engines(engines)


def test_an_engine_that_cannot_take_its_protocols_arguments_is_named():
    engines, _ = fake_engines(HITS, [1.0], "{}")

    def generate(system, user, schema, policy, max_tokens, on_delta, timer):     # no guide
        return {}
    with pytest.raises(TypeError, match="engine generate does not take Generate's arguments"):
        rag.check_engines(dataclasses.replace(engines, generate=generate))
    with pytest.raises(TypeError, match="engine search is not callable"):
        rag.check_engines(dataclasses.replace(engines, search=None))
    with pytest.raises(TypeError, match="engine rerank does not take"):
        rag.check_engines(dataclasses.replace(engines, rerank=lambda query, texts: []))


class _Tokenizers:
    """Stands in for EmbedTokenizer, RerankTokenizer and GeneratorTokenizer: one id per word."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, kind):
        self.seen.append(("embed", kind))
        return [[1] * len(texts[0].split())], [[1] * len(texts[0].split())], [len(texts[0].split())]

    def encode_pairs(self, query, texts):
        self.seen.append(("rerank", len(texts)))
        return [[i] for i in range(len(texts))], [[1]] * len(texts)

    def count_prompt(self, system, user):
        return len((system + user).split())

    def prompt_limit(self, max_tokens):
        return 10_000

    def count_texts(self, texts):
        return [len(t.split()) for t in texts]


def test_token_engines_tokenize_once_per_stage_and_give_the_generator_the_answer_schema_as_its_guide():
    tok = _Tokenizers()
    got = {}

    def generate(system, user, guide_type, guide, policy, max_tokens, on_delta, timer):
        got["guide"] = (guide_type, json.loads(guide))
        return {"text": json.dumps({"answer": "b", "citations": ["ctx-1"]}), "finish_reason": "stop",
                "num_input_tokens": 3, "num_output_tokens": 2}
    hits = [{"text": t, "doc_id": f"d{i}", "chunk_id": f"d{i}#0", "score": s} for i, (t, s) in enumerate(HITS)]
    engines = rag.token_engines(tok, tok, tok, embed=lambda ids, mask: [[0.5] * len(ids[0])],
                                search=lambda collection, vector, top_k, query=None, search=None: hits[:top_k],
                                rerank=lambda ids, mask: [0.1, 0.9, 0.5][:len(ids)], generate=generate)
    result = rag.run(rag.RagRequest(query="two words", top_k=3, top_n=1), engines, POLICY)
    assert tok.seen == [("embed", "query"), ("rerank", 3)]
    assert [c.text for c in result.contexts] == ["beta"] and result.usage["query_tokens"] == 2
    assert got["guide"][0] == "json_schema" and got["guide"][1]["properties"]["citations"]["items"]["enum"] == ["ctx-1"]
    assert result.usage["timings_ms"]["tokenize"] >= 0.0
