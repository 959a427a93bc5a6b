"""The RAG endpoint end to end on a real tritonserver (tiny models): ingest → rag over HTTP, gRPC, /generate."""
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import CORPUS, ingest
from tests.integration.helpers import (admin_headers, generate_json, infer, is_invalid_arg, make_input, stream, strings,
                                       wire_headers)

pytestmark = pytest.mark.integration
QUESTION = "How long is a primary on-call shift?"


def rag_inputs(query=QUESTION, documents=None, **kw):
    arrays = {"query": strings([query]).reshape(1, 1), "collection": strings([kw.pop("collection", "corpus")]).reshape(1, 1)}
    for name, value in kw.items():
        arrays[name] = (strings([value]) if isinstance(value, str) else np.array([value], np.int32)).reshape(1, 1)
    if documents is not None:
        arrays["documents"] = strings(documents).reshape(1, -1)
    return arrays


HEADERS = {}


@pytest.fixture(scope="module", autouse=True)
def _identity(identity):
    HEADERS.update(identity)


def ask(client_pair, model="rag", headers=None, **kw):
    out = infer(client_pair, model, rag_inputs(**kw), ["answer", "contexts", "usage"],
                headers=HEADERS if headers is None else headers)
    return {k: json.loads(v.reshape(-1)[0]) for k, v in out.items()}


def check_answer(result, n_contexts=None):
    ids = [c["id"] for c in result["contexts"]]
    assert ids and (n_contexts is None or len(ids) == n_contexts)
    answer = result["answer"]
    assert isinstance(answer["answer"], str)
    assert set(answer["citations"]) <= set(ids)
    # The answer task abstains below the policy's reranker threshold (calibrated for the demo reranker; the tiny
    # models' random reranker can fall either side): then nothing is generated and nothing is cited.
    assert result["usage"]["finish_reason"] in ("stop", "abstained")
    if result["usage"]["finish_reason"] == "abstained":
        assert answer["not_in_documents"] is True and answer["citations"] == []
    assert set(result["usage"]["timings_ms"]) >= {"tokenize", "embed", "search", "rerank", "generate", "total"}


def test_query_over_http_and_grpc(client, corpus):
    result = ask(client, top_k=6, top_n=3)
    check_answer(result, 3)
    scores = [c["rerank_score"] for c in result["contexts"]]
    assert scores == sorted(scores, reverse=True)
    assert all(c["doc_id"] in {p.stem for p in CORPUS} for c in result["contexts"])


def test_query_over_generate_extension(server, corpus):
    # /generate forwards no headers; its unknown JSON fields become request parameters, identity included.
    status, body = generate_json(server.http_url, "rag", {"query": QUESTION, "collection": "corpus", "top_n": 2,
                                                          **HEADERS})
    assert status == 200, body
    check_answer({k: json.loads(body[k]) for k in ("answer", "contexts", "usage")}, 2)


def test_streaming_over_grpc_yields_the_answer_text(server, corpus):
    parts = stream(server.grpc_url, "rag_stream", rag_inputs(top_n=2), headers=HEADERS)
    final = parts[-1]
    assert "usage" in final and len(parts) > 2
    deltas = "".join(p["answer"].reshape(-1)[0].decode() for p in parts[:-1])
    result = {k: json.loads(final[k].reshape(-1)[0]) for k in ("answer", "contexts", "usage")}
    check_answer(result, 2)
    assert json.loads(deltas, strict=False) == result["answer"]                 # the streamed text is the answer's JSON


def test_streaming_over_generate_stream(server, corpus):
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}/v2/models/rag_stream/generate_stream",
                                 data=json.dumps({"query": QUESTION, "collection": "corpus", **HEADERS}).encode(),
                                 method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    assert len(events) > 2 and "usage" in events[-1]
    assert json.loads("".join(e["answer"] for e in events[:-1]), strict=False) == json.loads(events[-1]["answer"])


def test_caller_documents_bypass_the_index(client):
    docs = ['{"id": "a", "text": "The cafeteria opens at 8."}', '{"id": "b", "text": "Parking is free."}']
    result = ask(client, query="When does the cafeteria open?", documents=docs, top_n=2, collection="no-such")
    check_answer(result, 2)
    assert {c["doc_id"] for c in result["contexts"]} == {"a", "b"}
    assert result["usage"]["timings_ms"]["search"] == 0.0


@pytest.mark.parametrize("task", ["generate_json", "rank_candidates", "judge"])
def test_tasks(client, corpus, task):
    kw = {"task": task, "top_n": 2}
    if task == "generate_json":
        schema = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 999}},
                  "required": ["hours"], "additionalProperties": False}
        kw["schema"] = json.dumps(schema)
    if task == "rank_candidates":
        kw["documents"] = ["Shifts last a week.", "The office has a gym.", "Stipends are paid monthly."]
    result = ask(client, **kw)
    answer, ids = result["answer"], [c["id"] for c in result["contexts"]]
    if task == "generate_json":
        jsonschema.validate(answer, schema)
    elif task == "rank_candidates":
        assert len(ids) == 3 and set(answer["ranking"]) <= set(ids) and answer["ranking"]
    else:
        assert answer["verdict"] in ("supported", "not_supported", "partially_supported")
        assert set(answer["citations"]) <= set(ids)
    assert result["usage"]["task"] == task and len(result["usage"]["schema_id"]) == 16


def test_reingest_does_not_duplicate_and_restart_keeps_the_index(http, corpus):
    before = ask(("http", http), top_k=5, top_n=3)
    report = ingest(("http", http), [CORPUS[0].stem], [CORPUS[0].read_text()])
    assert report["documents"][0]["status"] == "unchanged"
    # Restart the process that owns the store: it reloads from disk.
    http.unload_model("vector_index", headers=admin_headers())
    http.load_model("vector_index", headers=admin_headers())
    after = ask(("http", http), top_k=5, top_n=3)
    assert [c["chunk_id"] for c in after["contexts"]] == [c["chunk_id"] for c in before["contexts"]]
    assert len({c["chunk_id"] for c in after["contexts"]}) == len(after["contexts"]) > 1


def test_delete_removes_a_document(http):
    pair = ("http", http)
    text = "Zebra crossings on the Northwind campus are painted purple every spring."
    ingest(pair, ["zebra"], [text], collection="scratch")
    assert ask(pair, query="What colour are zebra crossings?", collection="scratch", top_k=1, top_n=1)[
        "contexts"][0]["doc_id"] == "zebra"
    ingest(pair, ["other"], ["The library closes at nine."], collection="scratch")
    report = ingest(pair, ["zebra"], collection="scratch", op="delete")
    assert report["documents"][0] == {"doc_id": "zebra", "status": "deleted", "chunks": 1}
    result = ask(pair, query="What colour are zebra crossings?", collection="scratch", top_k=1, top_n=1)
    assert [c["doc_id"] for c in result["contexts"]] == ["other"]


def test_concurrent_queries_all_succeed(server, corpus):
    questions = [f"{q} ({i})" for i, q in enumerate(["What is the hotel limit?", "Who approves a release?",
                                                      "How much GPU quota do I get?", QUESTION] * 2)]
    pair = ("grpc", None)
    import tritonclient.grpc as grpcclient

    def one(q):
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            return ask(("grpc", c), query=q, top_n=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, questions))
    for r in results:
        check_answer(r, 2)
    del pair


BAD = [
    (dict(query="  "), "query is empty"),
    (dict(task="poem"), "unknown task"),
    (dict(collection="nope"), "unknown collection"),
    (dict(schema="{oops", task="generate_json"), "schema is not valid JSON"),
    (dict(schema='{"type": 12}', task="generate_json"), "not a valid JSON Schema"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=500), "top_k"),
    (dict(top_k=3, top_n=5), "top_n"),
    (dict(max_tokens=100000), "max_tokens"),
    (dict(documents=["x" * 30000]), "limit"),
    (dict(task="generate_json"), "needs a schema"),
]


@pytest.mark.parametrize("kw, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_rag_input_is_invalid_arg(client, corpus, kw, message):
    with pytest.raises(InferenceServerException) as err:
        ask(client, **kw)
    assert is_invalid_arg(err.value), err.value
    assert message.lower() in str(err.value).lower() and "Traceback" not in str(err.value)


def test_non_utf8_query_and_unsatisfiable_schema(client, corpus):
    protocol, c = client
    arrays = rag_inputs()
    arrays["query"] = np.array([[b"\xff\xfeq"]], dtype=object)
    with pytest.raises(InferenceServerException) as err:
        c.infer("rag", [make_input(protocol, k, v) for k, v in arrays.items()], headers=wire_headers(protocol, HEADERS))
    assert is_invalid_arg(err.value) and "UTF-8" in str(err.value)
    impossible = {"type": "string", "minLength": 10, "maxLength": 2}
    with pytest.raises(InferenceServerException) as err:
        ask(client, task="generate_json", schema=json.dumps(impossible))
    assert is_invalid_arg(err.value), err.value
    check_answer(ask(client, top_n=1), 1)                            # and the endpoint keeps serving


def test_long_answers_do_not_hold_back_short_ones(server, corpus):
    """A request is answered as soon as it is done (response senders), and while long generations hold
    orchestrator instances, another instance takes the short queries sent after them: they return first."""
    import time

    import tritonclient.grpc as grpcclient

    ESSAY = 1400          # characters: several times a short query's whole pipeline even on a loaded machine
    essay = {"type": "object", "properties": {"essay": {"type": "string", "minLength": ESSAY, "maxLength": ESSAY}},
             "required": ["essay"], "additionalProperties": False}
    digit = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}

    def timed(kw):
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            result = ask(("grpc", c), documents=["Shifts last a week."], task="generate_json", **kw)
            return time.perf_counter(), result
    with ThreadPoolExecutor(6) as pool:
        longs = [pool.submit(timed, dict(query=f"Write about shifts ({i})", schema=json.dumps(essay),
                                         max_tokens=1900)) for i in range(2)]
        time.sleep(0.15)
        shorts = [pool.submit(timed, dict(query=f"How many weeks ({i})?", schema=json.dumps(digit), max_tokens=16))
                  for i in range(3)]
        long_results, short_results = [f.result() for f in longs], [f.result() for f in shorts]
    assert all(len(r["answer"]["essay"]) == ESSAY for _, r in long_results)    # the whole string, decoded
    assert all(0 <= r["answer"]["n"] <= 9 for _, r in short_results)
    last_short, first_long = max(done for done, _ in short_results), min(done for done, _ in long_results)
    assert last_short < first_long, f"the last short answer came {last_short - first_long:.2f} s after the first long one"


QUOTE_DOCS = [
    "## Rotations\n\n- **Storage team:** the rotation lasts 7 days. Handover happens every Monday at 10:00 local\n"
    "  time, so that it never meets the release.\n- **Network team:** the rotation lasts 14 days.",
    "| Severity | Acknowledge within |\n|----------|--------------------|\n| SEV1 | 5 minutes |\n"
    "| SEV2 | 15 minutes |\n\nA SEV1 also needs an incident channel within 10 minutes. Nobody fixes a \"SEV1\" alone.",
    "Stipends are paid pro rata for partial weeks; they appear on the next regular payroll. The primary gets $250\n"
    "per week of rotation.",
]


@pytest.fixture(scope="module")
def quote_server(tiny_models, tmp_path_factory):
    """A server whose quote task never abstains and lets the generator write its quotes: the tiny reranker's
    scores sit below the configured threshold, so on the session server every quote request abstains."""
    from tests.integration.conftest import private_server
    from ragstack_dev.server import ROOT

    policy = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    policy["tasks"]["quote"].update(abstain_below_rerank=None, quote_select="generate", quote_candidates=4,
                                    max_quotes=2)
    path = tmp_path_factory.mktemp("quote-policy") / "runtime_policy.json"
    path.write_text(json.dumps(policy))
    with private_server(tiny_models, tmp_path_factory, "integration-quote", RAG_POLICY_FILE=str(path)) as proc:
        yield proc


@pytest.mark.parametrize("query", ["How long is the storage rotation?", "How fast must a SEV1 be acknowledged?",
                                   "What is the stipend?"])
def test_served_quotes_are_verbatim_substrings_of_the_cited_context(quote_server, query):
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(quote_server.http_url, network_timeout=300) as c:
        result = ask(("http", c), query=query, task="quote", documents=QUOTE_DOCS, top_n=3, collection="no-such")
    texts = {ctx["id"]: ctx["text"] for ctx in result["contexts"]}
    answer = result["answer"]
    assert result["usage"]["finish_reason"] == "stop" and not result["usage"]["abstained"]
    assert 1 <= len(answer["quotes"]) <= 2 and answer["citations"]
    for quote in answer["quotes"]:
        assert quote["text"] and quote["text"] in texts[quote["context"]]
    assert answer["citations"] == list(dict.fromkeys(q["context"] for q in answer["quotes"]))


# Eight short documents, each the only one holding its rare word: a lexical match finds each at once, while the
# tiny models' random embeddings rank them by chance.
LEXICAL_DOCS = {f"lex-{i}": f"Section {i}. The {word} is described in this section of the handbook."
                for i, word in enumerate(["zeppelin", "quokka", "marimba", "obsidian", "tundra", "kelp", "sonnet",
                                          "lantern"])}


def test_the_policy_hybrid_search_is_what_rag_uses(http, identity):
    """The task the runtime policy gives a hybrid search retrieves through it: asked with top_k 1, the single
    context is always the document holding the question's only content word (RRF gives it w/61 from the lexical
    list, w >= 1 its weight, on top of its dense share; any other document has at most the dense list's 1/61),
    and usage names the mode.
    A dense search on the tiny models' random embeddings would get all eight right with odds of 8**-8."""
    from ragstack.governance.policy import RuntimePolicy
    from ragstack_dev.server import ROOT

    policy = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json")
    hybrid = [t for t in policy.task_names if policy.task(t).search.mode == "hybrid"]
    assert hybrid, "the configured policy gives no task a hybrid search"
    task = hybrid[0]
    report = ingest(("http", http), list(LEXICAL_DOCS), list(LEXICAL_DOCS.values()), collection="lexical")
    assert {d["status"] for d in report["documents"]} <= {"created", "unchanged"}
    for doc_id, text in LEXICAL_DOCS.items():
        word = text.split()[3]
        result = ask(("http", http), query=f"Where is the {word}?", task=task, top_k=1, top_n=1,
                     collection="lexical")
        assert result["usage"]["search"] == "hybrid"
        assert [c["doc_id"] for c in result["contexts"]] == [doc_id], word
