"""ragstack.index: the flat-file vector store (replace-by-doc upserts, exact search, durable atomic commits)."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ragstack.errors import InvalidInput
from ragstack.index import FlatFileStore, VectorStore
from ragstack.index import flatfile

DIM = 8


def vecs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def chunks(*texts, **metadata):
    return [{"text": t, "metadata": dict(metadata), "start": i} for i, t in enumerate(texts)]


@pytest.fixture
def store(tmp_path):
    return FlatFileStore(tmp_path / "store")


@pytest.fixture
def filled(store):
    store.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    store.upsert("docs", "b", chunks("b0", "b1"), vecs(2, 2), {"title": "B"}, "hash-b")
    return store


def state(store, collection="docs"):
    """Everything observable about a collection, for before/after comparisons."""
    stats = store.stats(collection)
    query = np.ones(DIM, np.float32)
    docs = {d: store.get(collection, d) for d in ("a", "b", "c")}
    return stats, docs, store.search(collection, query, 100)


def test_is_a_vector_store(store):
    assert isinstance(store, VectorStore)


def test_upsert_and_search(filled):
    q = vecs(3, 1)[1]
    hits = filled.search("docs", q, 3)
    assert [h["chunk_id"] for h in hits][0] == "a#1"
    assert hits[0] == {"chunk_id": "a#1", "doc_id": "a", "text": "a1", "metadata": {"lang": "en"}, "start": 1,
                       "score": pytest.approx(1.0, abs=1e-6)}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and len(hits) == 3
    all_vecs = np.concatenate([vecs(3, 1), vecs(2, 2)])
    cosines = all_vecs @ q / np.linalg.norm(all_vecs, axis=1) / np.linalg.norm(q)
    full = filled.search("docs", q * 7.5, 10)                        # the query's scale does not matter
    assert sorted(h["score"] for h in full) == pytest.approx(sorted(cosines.tolist()), abs=1e-5)
    assert filled.stats("docs") == {"collection": "docs", "dim": DIM, "docs": 2, "chunks": 5}
    assert filled.collections() == ["docs"]


def test_search_filtered_by_doc_ids(filled):
    hits = filled.search("docs", np.ones(DIM), 10, doc_ids=["b", "missing"])
    assert sorted(h["chunk_id"] for h in hits) == ["b#0", "b#1"]
    assert filled.search("docs", np.ones(DIM), 10, doc_ids=[]) == []
    with pytest.raises(InvalidInput, match="doc_ids"):
        filled.search("docs", np.ones(DIM), 10, doc_ids="b")


def test_reingesting_the_same_document_is_a_no_op(filled, tmp_path):
    before = state(filled)
    meta_before = (tmp_path / "store" / "docs" / "meta.json").read_text()
    summary = filled.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    assert summary == {"collection": "docs", "doc_id": "a", "status": "unchanged", "chunks": 3, "removed_chunks": 0}
    assert state(filled) == before
    assert (tmp_path / "store" / "docs" / "meta.json").read_text() == meta_before


def test_changed_document_replaces_all_its_chunks(filled):
    summary = filled.upsert("docs", "a", chunks("new0"), vecs(1, 9), {"title": "A2"}, "hash-a2")
    assert summary == {"collection": "docs", "doc_id": "a", "status": "replaced", "chunks": 1, "removed_chunks": 3}
    assert filled.stats("docs")["chunks"] == 3
    doc = filled.get("docs", "a")
    assert doc["content_hash"] == "hash-a2" and doc["metadata"] == {"title": "A2"}
    assert [c["text"] for c in doc["chunks"]] == ["new0"]
    assert {h["chunk_id"] for h in filled.search("docs", np.ones(DIM), 10)} == {"a#0", "b#0", "b#1"}


def test_get(filled):
    doc = filled.get("docs", "b")
    assert doc == {"doc_id": "b", "content_hash": "hash-b", "metadata": {"title": "B"},
                   "chunks": [{"chunk_id": "b#0", "doc_id": "b", "text": "b0", "metadata": {}, "start": 0},
                              {"chunk_id": "b#1", "doc_id": "b", "text": "b1", "metadata": {}, "start": 1}]}
    assert filled.get("docs", "nope") is None


def test_results_are_copies(filled):
    filled.search("docs", np.ones(DIM), 10)[0]["metadata"]["x"] = 1
    filled.get("docs", "a")["chunks"][0]["metadata"]["x"] = 1
    assert all("x" not in h["metadata"] for h in filled.search("docs", np.ones(DIM), 10))


def test_caller_objects_are_not_kept(store):
    meta = {"tags": ["x"]}
    cs = chunks("t0")
    store.upsert("c", "d", cs, vecs(1), meta, "h")
    meta["tags"].append("y")
    cs[0]["metadata"]["z"] = 1
    assert store.get("c", "d")["metadata"] == {"tags": ["x"]}
    assert store.get("c", "d")["chunks"][0]["metadata"] == {}


def test_delete(filled):
    assert filled.delete("docs", "a") == 3
    assert filled.delete("docs", "a") == 0
    assert filled.get("docs", "a") is None
    assert {h["doc_id"] for h in filled.search("docs", np.ones(DIM), 10)} == {"b"}
    assert filled.delete("docs", "b") == 2
    assert filled.search("docs", np.ones(DIM), 10) == []
    assert filled.stats("docs") == {"collection": "docs", "dim": DIM, "docs": 0, "chunks": 0}


def test_create_collection(store):
    assert store.create_collection("empty", 4) == {"collection": "empty", "dim": 4, "docs": 0, "chunks": 0}
    assert store.create_collection("empty", 4)["dim"] == 4                    # idempotent
    with pytest.raises(InvalidInput, match="dim 4"):
        store.create_collection("empty", 5)
    assert store.search("empty", np.ones(4), 3) == []
    with pytest.raises(InvalidInput, match="shape"):
        store.upsert("empty", "d", chunks("x"), vecs(1), None, "h")           # DIM != 4


def test_restart_keeps_everything(filled, tmp_path):
    filled.create_collection("other", 3)
    filled.upsert("docs", "a", chunks("new0", "new1"), vecs(2, 5), {"title": "A2"}, "hash-a2")
    filled.delete("docs", "b")
    filled.upsert("docs", "c", chunks("c0"), vecs(1, 6), None, "hash-c")
    reopened = FlatFileStore(tmp_path / "store")
    assert reopened.collections() == ["docs", "other"]
    assert state(reopened) == state(filled)
    assert reopened.upsert("docs", "c", chunks("c0"), vecs(1, 6), None, "hash-c")["status"] == "unchanged"
    assert sorted(os.listdir(tmp_path / "store" / "docs")) == ["chunks.5.jsonl", "meta.json", "vectors.5.npy"]


@pytest.mark.parametrize("name", ["", "a/b", "..x/", "x" * 65, "sp ace", "é", None, 3])
def test_bad_collection_names(store, name):
    with pytest.raises(InvalidInput, match="collection name"):
        store.upsert(name, "d", chunks("x"), vecs(1), None, "h")
    with pytest.raises(InvalidInput, match="collection name"):
        store.create_collection(name, 4)


def test_unknown_collection_names_the_known_ones(filled):
    filled.create_collection("other.v2", 3)
    for call in (lambda: filled.search("nope", np.ones(DIM), 1), lambda: filled.stats("nope"),
                 lambda: filled.get("nope", "a"), lambda: filled.delete("nope", "a")):
        with pytest.raises(InvalidInput, match=r"unknown collection 'nope'; known: docs, other.v2"):
            call()


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True, "3", None])
def test_bad_top_k(filled, top_k):
    with pytest.raises(InvalidInput, match="top_k"):
        filled.search("docs", np.ones(DIM), top_k)


@pytest.mark.parametrize("query", [np.ones(DIM + 1), np.ones((2, DIM)), np.zeros(DIM), [np.nan] * DIM, [[[1.0]]]])
def test_bad_query_vector(filled, query):
    with pytest.raises(InvalidInput, match="query_vector"):
        filled.search("docs", query, 3)


@pytest.mark.parametrize("args,match", [
    (("d", chunks("x"), vecs(1)[:, :4], None, "h"), "shape"),                 # dim mismatch with the collection
    (("d", chunks("x", "y"), vecs(1), None, "h"), "1 vectors for 2 chunks"),
    (("d", chunks("x"), np.zeros((1, DIM)), None, "h"), "zero vector"),
    (("d", chunks("x"), np.full((1, DIM), np.inf), None, "h"), "infinite"),
    (("d", [], vecs(0), None, "h"), "non-empty list"),
    (("d", [{"metadata": {}}], vecs(1), None, "h"), "text"),
    (("d", [{"text": "x", "metadata": []}], vecs(1), None, "h"), "metadata must be a dict"),
    (("d", [{"text": "x", "metadata": {"o": object()}}], vecs(1), None, "h"), "JSON"),
    (("d", chunks("x"), vecs(1), {"f": float("nan")}, "h"), "JSON"),
    (("d", chunks("x"), vecs(1), "meta", "h"), "doc_metadata"),
    (("", chunks("x"), vecs(1), None, "h"), "doc_id"),
    (("d", chunks("x"), vecs(1), None, ""), "content_hash"),
])
def test_bad_upserts_change_nothing(filled, tmp_path, args, match):
    before = state(filled)
    with pytest.raises(InvalidInput, match=match):
        filled.upsert("docs", *args)
    assert state(filled) == before == state(FlatFileStore(tmp_path / "store"))


def test_ties_are_broken_by_chunk_id(store, tmp_path):
    same = np.ones((1, DIM), np.float32)
    for doc_id in ("m", "c", "x", "a"):
        store.upsert("t", doc_id, chunks(doc_id), same * (1 + len(doc_id)), None, doc_id)
    expected = ["a#0", "c#0", "m#0", "x#0"]
    for top_k in (1, 2, 3, 4, 10):
        assert [h["chunk_id"] for h in store.search("t", np.ones(DIM), top_k)] == expected[:top_k]
    assert [h["chunk_id"] for h in FlatFileStore(tmp_path / "store").search("t", np.ones(DIM), 3)] == expected[:3]


# Crash safety. A crash is simulated by an exception at one step of a commit; everything a real crash could
# leave behind on top of that (temporaries, data files of an uncommitted generation) is planted by hand.

class Crash(Exception):
    pass


def crash_at(monkeypatch, step):
    """Make the commit fail at ``step``: the replace of one file, the folder fsync, or the cleanup."""
    if step in ("vectors", "chunks", "meta"):
        real = os.replace

        def replace(src, dst):
            if os.path.basename(dst).startswith(step):
                raise Crash(step)
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        target = {"fsync_dir": "fsync_dir", "cleanup": "_remove_strays"}[step]

        def fail(*args):
            raise Crash(step)
        monkeypatch.setattr(flatfile, target, fail)


@pytest.mark.parametrize("step,survives", [("vectors", False), ("chunks", False), ("meta", False),
                                           ("fsync_dir", True), ("cleanup", True)])
def test_a_crash_anywhere_leaves_the_old_or_the_new_state(filled, tmp_path, monkeypatch, step, survives):
    before = state(filled)
    with monkeypatch.context() as m:
        crash_at(m, step)
        with pytest.raises(Crash):
            filled.upsert("docs", "a", chunks("new0"), vecs(1, 9), None, "hash-a2")
    assert state(filled) == before                              # not acknowledged: the live store is unchanged
    on_disk = state(FlatFileStore(tmp_path / "store"))
    if survives:                                                # committed (meta.json replaced) before the crash
        assert on_disk[1]["a"]["chunks"][0]["text"] == "new0" and on_disk[0]["chunks"] == 3
    else:
        assert on_disk == before
    # Another write crashing halfway must not touch the committed files: generation numbers are never reused.
    with monkeypatch.context() as m:
        crash_at(m, "chunks")
        with pytest.raises(Crash):
            filled.upsert("docs", "c", chunks("c0"), vecs(1, 3), None, "hash-c")
    assert state(FlatFileStore(tmp_path / "store")) == on_disk
    # The live store goes on, and a reload agrees with it.
    filled.upsert("docs", "c", chunks("c0"), vecs(1, 3), None, "hash-c")
    assert state(FlatFileStore(tmp_path / "store")) == state(filled)


def test_stray_files_of_an_interrupted_write_are_ignored_and_removed(filled, tmp_path):
    folder = tmp_path / "store" / "docs"
    before = state(filled)
    generation = json.loads((folder / "meta.json").read_text())["generation"]
    (folder / ".tmp-abc123").write_bytes(b"half a vectors file")
    (folder / f"vectors.{generation + 1}.npy").write_bytes(b"\x93NUMPY garbage")     # uncommitted generation
    (folder / f"chunks.{generation + 1}.jsonl").write_text('{"truncated": ')
    (folder / "notes.txt").write_text("not ours: left alone")
    reopened = FlatFileStore(tmp_path / "store")
    assert state(reopened) == before
    assert sorted(os.listdir(folder)) == ["chunks.2.jsonl", "meta.json", "notes.txt", "vectors.2.npy"]


def test_interrupted_collection_creation_is_ignored(tmp_path):
    folder = tmp_path / "store" / "new"
    folder.mkdir(parents=True)
    (folder / "vectors.1.npy").write_bytes(b"partial")         # crashed before its first meta.json
    store = FlatFileStore(tmp_path / "store")
    assert store.collections() == []
    store.upsert("new", "d", chunks("x"), vecs(1), None, "h")
    assert FlatFileStore(tmp_path / "store").stats("new")["chunks"] == 1


def test_damage_from_outside_is_reported_not_served(filled, tmp_path):
    folder = tmp_path / "store" / "docs"
    meta = json.loads((folder / "meta.json").read_text())
    np.save(folder / f"vectors.{meta['generation']}.npy", np.zeros((2, DIM), np.float32))
    with pytest.raises(RuntimeError, match="inconsistent"):
        FlatFileStore(tmp_path / "store")


def test_concurrent_writers_and_readers(store, tmp_path):
    store.create_collection("c", DIM)
    errors = []

    def writer(w):
        try:
            for i in range(6):
                store.upsert("c", f"w{w}-{i % 3}", chunks("x", "y"), vecs(2, w * 10 + i), None, f"h{i}")
        except Exception as exc:                                # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        try:
            for _ in range(30):
                hits = store.search("c", np.ones(DIM), 5)
                assert len({h["chunk_id"] for h in hits}) == len(hits)
        except Exception as exc:                                # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.stats("c") == {"collection": "c", "dim": DIM, "docs": 9, "chunks": 18}
    assert state(FlatFileStore(tmp_path / "store"), "c") == state(store, "c")


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path):
    """A real crash: a writer process is SIGKILLed at an arbitrary point of its commits."""
    root = Path(__file__).resolve().parents[2]
    script = (f"import numpy as np\nfrom ragstack.index import FlatFileStore\n"
              f"s = FlatFileStore({str(tmp_path / 'store')!r})\n"
              f"for i in range(100000):\n"
              f"    s.upsert('c', f'd{{i % 7}}', [{{'text': f't{{i}}'}}] * 3, np.ones((3, 4)) + i, None, str(i))\n"
              f"    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    acknowledged = -1
    try:
        while acknowledged < 20:
            line = proc.stdout.readline()
            assert line, "the writer died on its own"
            acknowledged = int(line)
    finally:
        proc.kill()
        proc.wait()
    store = FlatFileStore(tmp_path / "store")
    latest = {}
    for i in range(acknowledged + 1):
        latest[f"d{i % 7}"] = str(i)
    for doc_id, content_hash in latest.items():                  # the last acknowledged version, or a later one
        assert int(store.get("c", doc_id)["content_hash"]) >= int(content_hash)
    assert store.stats("c") == {"collection": "c", "dim": 4, "docs": 7, "chunks": 21}
