"""The labelled answer sets of benchmarks/answers.py: each answerable question's gold facts are in its gold document
(as the benchmark matches them), ids are unique, and the held-out set asks nothing the tuning set asks."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETS = {name: json.loads((ROOT / "data" / f"{name}.json").read_text())["questions"]
        for name in ("answer_eval", "answer_eval_heldout")}


def _has_fact():
    """The benchmark's own matcher (benchmarks/answers.py puts benchmarks/ on sys.path itself)."""
    spec = importlib.util.spec_from_file_location("bench_answers", ROOT / "benchmarks" / "answers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.has_fact


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_gold_fact_is_in_its_gold_document(name):
    has_fact = _has_fact()
    for q in SETS[name]:
        assert isinstance(q["answerable"], bool), q
        if not q["answerable"]:
            assert q["facts"] == [] and "gold_doc" not in q, q
            continue
        text = (ROOT / "data" / "corpus" / f"{q['gold_doc']}.md").read_text()
        missing = [f for f in q["facts"] if not has_fact(text, f)]
        assert q["facts"] and not missing, (q["id"], missing)


def test_ids_are_unique_and_the_held_out_set_is_new():
    ids = [q["id"] for qs in SETS.values() for q in qs]
    assert len(ids) == len(set(ids))
    tuning = {q["question"].lower() for q in SETS["answer_eval"]}
    tuning_facts = {(q.get("gold_doc"), tuple(q["facts"])) for q in SETS["answer_eval"] if q["answerable"]}
    for q in SETS["answer_eval_heldout"]:
        assert q["question"].lower() not in tuning
        assert not q["answerable"] or (q["gold_doc"], tuple(q["facts"])) not in tuning_facts, q["id"]
