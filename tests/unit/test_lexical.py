"""Hybrid search (ragstack/index/lexical.py): BM25 and the fusions against hand computations, the flat store's
lexical index through upserts, deletes, compaction and reloads, lexical and hybrid search on both stores (the
pgvector one on a real Postgres, with the migration of a table made before lexical search), and the policy's
``search`` field."""
import json
import math

import numpy as np
import pytest

from ragstack.contracts.errors import InvalidInput
from ragstack.index import FlatFileStore
from ragstack.index.lexical import Bm25Index, SearchSpec, fuse, minmax, rrf, tokenize, weighted
from ragstack.governance.policy import PolicyError, RuntimePolicy
from tests.unit import test_index
from tests.unit.test_index import DIM, ROOT, chunks, vecs

# test_index's fixtures: each store test runs on the flat store and on pgvector (a real Postgres)
pg_server, reopen, store = test_index.pg_server, test_index.reopen, test_index.store

ROOT_POLICY = json.loads((ROOT / "config" / "runtime_policy.json").read_text())


# ---- BM25 and fusion, by hand

def test_tokenize_drops_stop_words_case_and_plural_s():
    assert tokenize("How fast do I respond to SEV1 alerts? The Wi-Fi's") == ["fast", "respond", "sev1", "alert",
                                                                            "wi", "fi"]
    assert tokenize("class process status") == ["class", "process", "status"]     # "ss"/"us" endings stay


def test_bm25_scores_match_a_hand_computation():
    index = Bm25Index()
    index.add(0, "apple banana apple")       # 3 terms
    index.add(1, "banana cherry")            # 2 terms
    index.add(2, "cherry date egg fig")      # 4 terms; N = 3, average length 3
    idf_apple = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    idf_cherry = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    expected = {
        0: idf_apple * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3 / 3)),
        1: idf_cherry * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / 3)),
        2: idf_cherry * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 4 / 3)),
    }
    scores = index.scores("apple cherry apple")             # a repeated query term counts once
    assert scores == pytest.approx(expected, rel=1e-12)
    assert scores[0] == pytest.approx(1.34864, abs=1e-5) and scores[2] == pytest.approx(0.41360, abs=1e-5)
    assert index.scores("cherry", rows=[2]) == pytest.approx({2: expected[2]})
    assert index.scores("nothing matches") == {}


def test_bm25_remove_restores_the_statistics():
    index = Bm25Index()
    index.add(0, "apple banana")
    before = index.scores("apple banana")
    index.add(1, "banana banana kiwi")
    assert index.scores("apple banana") != before            # N, df(banana) and the average length changed
    index.remove(1, "banana banana kiwi")
    assert index.scores("apple banana") == before and "kiwi" not in index.postings
    index.add(0, "kiwi")                                    # re-adding a row replaces it
    assert set(index.scores("apple kiwi")) == {0} and "apple" not in index.postings
    index.remove(0)                                         # without the text: every posting is checked
    assert len(index) == 0 and index.postings == {} and index.total_length == 0


def test_rrf_and_weighted_fusion_by_hand():
    fused = rrf([["a", "b", "c"], ["c", "a"]], k=60)
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61})
    assert rrf([["a"], ["b"]], k=1, weights=[1.0, 3.0]) == pytest.approx({"a": 0.5, "b": 1.5})
    assert minmax({"x": 2.0, "y": 4.0, "z": 3.0}) == {"x": 0.0, "y": 1.0, "z": 0.5}
    assert weighted([{"x": 0.9, "y": 0.5}, {"y": 10.0, "z": 2.0}], [1.0, 0.5]) == pytest.approx(
        {"x": 1.0, "y": 0.5, "z": 0.0})
    spec = SearchSpec(mode="hybrid", rrf_k=60)
    # dense ranks a > b > c, lexical ranks c > a: a (1/61 + 1/62) before c (1/63 + 1/61) before b (1/62)
    top = fuse({"a": 0.9, "b": 0.8, "c": 0.1}, {"c": 5.0, "a": 1.0}, spec, 3)
    assert [i for i, _ in top] == ["a", "c", "b"]
    assert fuse({"a": 0.9, "b": 0.8, "c": 0.1}, {"c": 5.0, "a": 1.0}, spec, 2)[1][1] == pytest.approx(1 / 63 + 1 / 61)
    # equal fused scores: the key decides
    assert [i for i, _ in fuse({"b": 1.0}, {"a": 1.0}, spec, 2, key=lambda i: i)] == ["a", "b"]


def test_search_spec_checks_its_fields():
    assert SearchSpec.parse(None) == SearchSpec() and SearchSpec().mode == "dense"
    assert SearchSpec.parse("hybrid").mode == "hybrid"
    assert SearchSpec.parse({"mode": "hybrid", "depth": 20, "lexical_weight": 2}).lexical_weight == 2.0
    for bad in ({"mode": "bm25"}, {"fusion": "max"}, {"depth": 0}, {"rrf_k": True}, {"lexical_weight": -1},
                {"mode": "hybrid", "colour": 1}, 3):
        with pytest.raises(InvalidInput):
            SearchSpec.parse(bad)


def test_policy_search_field():
    policy = RuntimePolicy.from_dict(ROOT_POLICY)
    assert policy.task("generate_json").search == SearchSpec()      # not given: dense
    data = json.loads(json.dumps(ROOT_POLICY))
    data["tasks"]["answer"]["search"] = {"mode": "hybrid", "depth": 30}
    assert RuntimePolicy.from_dict(data).task("answer").search == SearchSpec(mode="hybrid", depth=30)
    data["tasks"]["answer"]["search"] = {"mode": "sparse"}
    with pytest.raises(PolicyError, match="tasks.answer.search"):
        RuntimePolicy.from_dict(data)


# ---- the stores

TEXTS = {"a": ["the storage rotation lasts seven days", "escalate to the duty manager"],
         "b": ["visitors get guest wifi for a day", "kitchen restocked each morning"],
         "c": ["zebra crossing near the office"]}


def fill(store):
    for n, (doc, texts) in enumerate(TEXTS.items()):
        store.upsert("docs", doc, chunks(*texts), vecs(len(texts), n + 1), {}, f"h-{doc}")


def test_lexical_and_hybrid_search_on_both_stores(store):
    fill(store)
    far = -vecs(1, 3)[0]                    # the dense direction away from doc c's only chunk: c ranks last
    dense = store.search("docs", far, 5)
    assert dense[-1]["chunk_id"] == "c#0"
    lexical = store.search("docs", far, 5, query_text="Where is the zebra crossing?", search="lexical")
    assert [h["chunk_id"] for h in lexical] == ["c#0"] and lexical[0]["lexical_score"] > 0
    assert lexical[0]["score"] == pytest.approx(dense[-1]["score"], abs=1e-5)      # score stays the cosine
    hybrid = store.search("docs", far, 2, query_text="zebra", search={"mode": "hybrid", "rrf_k": 60})
    assert "c#0" in [h["chunk_id"] for h in hybrid]          # the lexical list lifts it into the top 2
    assert all("fused_score" in h for h in hybrid)
    assert [h["fused_score"] for h in hybrid] == sorted((h["fused_score"] for h in hybrid), reverse=True)
    with pytest.raises(InvalidInput, match="query text"):
        store.search("docs", far, 2, search="hybrid")
    # filtered by documents, and kept current through replace and delete
    assert store.search("docs", far, 5, doc_ids=["a"], query_text="zebra", search="lexical") == []
    store.upsert("docs", "c", chunks("no stripes here"), vecs(1, 3), {}, "h-c2")
    assert store.search("docs", far, 5, query_text="zebra", search="lexical") == []
    assert [h["chunk_id"] for h in store.search("docs", far, 5, query_text="stripes", search="lexical")] == ["c#0"]
    store.delete("docs", "c")
    assert store.search("docs", far, 5, query_text="stripes", search="lexical") == []
    assert [h["chunk_id"] for h in store.search("docs", far, 5, query_text="wifi visitors", search="lexical")][0] == \
        "b#0"


def test_flat_lexical_index_stays_equal_to_a_rebuild(tmp_path):
    """Through appends to the log, replacements, deletes, compactions and reloads, the incremental BM25 gives
    exactly the scores of an index built from scratch over the live chunks."""
    def check(store, live):
        fresh = Bm25Index()
        for i, text in enumerate(live.values()):
            fresh.add(i, text)
        for query in ("storage days", "guest wifi", "zebra stripes office", "apple"):
            hits = store.search("docs", np.ones(DIM), 50, query_text=query, search="lexical")
            got = {h["chunk_id"]: h["lexical_score"] for h in hits}
            ids = list(live)
            want = {ids[i]: s for i, s in fresh.scores(query).items()}
            assert got == pytest.approx(want, rel=1e-9), query

    for ratio in (1.0, 0.0):                  # log appends; a snapshot on every mutation
        folder = tmp_path / f"r{ratio}"
        store = FlatFileStore(folder, compact_ratio=ratio)
        fill(store)
        store.search("docs", np.ones(DIM), 1, query_text="x", search="lexical")      # builds the index now
        live = {f"{d}#{i}": t for d, ts in TEXTS.items() for i, t in enumerate(ts)}
        check(store, live)
        store.upsert("docs", "a", chunks("apple storage orchard"), vecs(1, 9), {}, "h-a2")
        live = {k: v for k, v in live.items() if not k.startswith("a#")} | {"a#0": "apple storage orchard"}
        check(store, live)
        store.delete("docs", "b")
        live = {k: v for k, v in live.items() if not k.startswith("b#")}
        check(store, live)
        store.upsert("docs", "d", chunks("zebra stripes", "more zebra"), vecs(2, 4), {}, "h-d")
        live |= {"d#0": "zebra stripes", "d#1": "more zebra"}
        check(store, live)
        store.compact("docs")
        check(store, live)
        check(FlatFileStore(folder), live)    # a reload (snapshot + log) builds the same index


def test_pgvector_migrates_a_table_made_before_lexical_search(pg_server):
    import uuid

    import psycopg

    from ragstack.index.pgvector import TSV_COLUMN, PgVectorStore
    schema = "t_" + uuid.uuid4().hex[:12]
    pg = PgVectorStore(pg_server.dsn, schema)
    try:
        fill(pg)
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            tbl = conn.execute(f'SELECT tbl FROM "{schema}".collections WHERE name = %s', ["docs"]).fetchone()[0]
            conn.execute(f'ALTER TABLE "{schema}"."{tbl}" DROP COLUMN {TSV_COLUMN}')    # as an old table
        pg.close()
        pg = PgVectorStore(pg_server.dsn, schema)                                     # opening migrates it
        hits = pg.search("docs", np.ones(DIM), 3, query_text="zebra office", search="lexical")
        assert [h["chunk_id"] for h in hits] == ["c#0"]
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            indexes = [r[0] for r in conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s",
                                                  [schema])]
        assert any("gin" in d and TSV_COLUMN in d for d in indexes)
    finally:
        pg.close()
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
