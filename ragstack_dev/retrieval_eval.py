"""Retrieval quality: recall@k and MRR over a labelled question -> passage set, and an in-process ranking of that
set with the embed (and optionally rerank) engines.

The labelled set is ``data/retrieval_eval.json``::

    {"passages":  [{"id": "p01", "text": "..."}, ...],
     "questions": [{"id": "q01", "question": "...", "answer_id": "p01", "distractor_ids": ["p02"]}, ...]}

Every question is answered by exactly one passage; ``distractor_ids`` name passages that read almost the same but
state a different fact (the network team's rotation when the storage team's is asked for), which is where a
retriever that matches words rather than meaning goes wrong.

The metric functions are pure Python over ranked id lists, so they serve any ranking: this module's in-process
one, or the ids a running Triton deployment returned. :func:`rank_in_process` runs the same tokenizers and
engines the Triton models run (:mod:`ragstack.tokenization.retrieval`, :mod:`ragstack.engines`), without a server.

    .venv/bin/python -m ragstack_dev.retrieval_eval --embed build/models/demo/embed --rerank build/models/demo/rerank
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

DEFAULT_EVAL = Path(__file__).resolve().parents[1] / "data" / "retrieval_eval.json"

Gold = Union[str, Iterable[str]]


# --- metrics ---------------------------------------------------------------------------------------------------

def _gold_set(gold: Gold) -> set[str]:
    """One relevant id (a string) or several (any iterable of strings), as a non-empty set."""
    ids = {gold} if isinstance(gold, str) else set(gold)
    if not ids:
        raise ValueError("a query has no gold id")
    return ids


def _check_queries(ranked_ids_per_query: Sequence[Sequence[str]], gold_ids: Sequence[Gold]) -> None:
    if len(ranked_ids_per_query) != len(gold_ids):
        raise ValueError(f"{len(ranked_ids_per_query)} rankings but {len(gold_ids)} gold entries")
    if not ranked_ids_per_query:
        raise ValueError("no queries to evaluate")


def recall_at_k(ranked_ids_per_query: Sequence[Sequence[str]], gold_ids: Sequence[Gold], k: int) -> float:
    """Mean over queries of the fraction of a query's gold ids found in its first ``k`` ranked ids.

    With one gold id per query (a string) this is the hit rate: the share of queries whose answer is in the top k.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    _check_queries(ranked_ids_per_query, gold_ids)
    total = 0.0
    for ranked, gold in zip(ranked_ids_per_query, gold_ids):
        relevant = _gold_set(gold)
        total += len(relevant.intersection(ranked[:k])) / len(relevant)
    return total / len(gold_ids)


def reciprocal_rank(ranked_ids: Sequence[str], gold: Gold) -> float:
    """1 / (1-based position of the first gold id in ``ranked_ids``), or 0.0 if none is there."""
    relevant = _gold_set(gold)
    for position, doc_id in enumerate(ranked_ids, start=1):
        if doc_id in relevant:
            return 1.0 / position
    return 0.0


def mrr(ranked_ids_per_query: Sequence[Sequence[str]], gold_ids: Sequence[Gold]) -> float:
    """Mean reciprocal rank over queries."""
    _check_queries(ranked_ids_per_query, gold_ids)
    return sum(reciprocal_rank(r, g) for r, g in zip(ranked_ids_per_query, gold_ids)) / len(gold_ids)


def evaluate(ranked: Sequence[Sequence[str]], gold: Sequence[Gold]) -> dict:
    """``{"recall@1", "recall@5", "mrr", "n"}`` for rankings ``ranked`` against ``gold`` (one entry per query)."""
    return {"recall@1": recall_at_k(ranked, gold, 1), "recall@5": recall_at_k(ranked, gold, 5),
            "mrr": mrr(ranked, gold), "n": len(gold)}


# --- the labelled set ------------------------------------------------------------------------------------------

def check_eval(eval_set: dict) -> dict:
    """Raise ValueError unless ``eval_set`` is well formed: non-blank texts, unique ids, and every answer and
    distractor id naming a passage (a distractor never being the answer). Returns ``eval_set``."""
    passages, questions = eval_set.get("passages"), eval_set.get("questions")
    if not passages or not questions:
        raise ValueError("an eval set needs non-empty 'passages' and 'questions'")
    passage_ids = [p["id"] for p in passages]
    question_ids = [q["id"] for q in questions]
    for what, ids in (("passage", passage_ids), ("question", question_ids)):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate {what} ids: {duplicates}")
    for item, field in [(p, "text") for p in passages] + [(q, "question") for q in questions]:
        if not isinstance(item.get(field), str) or not item[field].strip():
            raise ValueError(f"{item.get('id')!r} has no {field}")
    known = set(passage_ids)
    for q in questions:
        if q["answer_id"] not in known:
            raise ValueError(f"question {q['id']}: answer_id {q['answer_id']!r} is not a passage")
        distractors = q.get("distractor_ids", [])
        unknown = [d for d in distractors if d not in known]
        if unknown:
            raise ValueError(f"question {q['id']}: distractor ids {unknown} are not passages")
        if q["answer_id"] in distractors:
            raise ValueError(f"question {q['id']}: its answer is also listed as a distractor")
    return eval_set


def load_eval(path: Union[str, Path] = DEFAULT_EVAL) -> dict:
    """The labelled set at ``path`` (JSON), checked with :func:`check_eval`."""
    with open(path, encoding="utf-8") as f:
        return check_eval(json.load(f))


# --- ranking with the engines ----------------------------------------------------------------------------------

def _embed_all(tokenizer, engine, texts: list[str], input_type: str, batch_size: int) -> np.ndarray:
    """``[len(texts), dim]`` embeddings, in batches (each padded only to its own longest text)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask, _ = tokenizer.encode(texts[start:start + batch_size], input_type)
        chunks.append(engine(input_ids, attention_mask))
    return np.concatenate(chunks)


def rank_by_scores(scores: np.ndarray, ids: Sequence[str]) -> list[str]:
    """``ids`` from the highest score to the lowest; equal scores keep their order in ``ids``."""
    return [ids[i] for i in np.argsort(-np.asarray(scores), kind="stable")]


def hybrid_order(question: str, embedding_order: Sequence[str], passage_text: dict, spec) -> list[str]:
    """All passage ids in the order of a hybrid search (:mod:`ragstack.index.lexical`): the embedding order and
    the BM25 order over the passages, each ``spec.depth`` deep, fused by reciprocal rank (``spec.fusion``
    "rrf"; the embedding order stands in for the cosine scores, so "weighted" is not offered here); passages
    in neither list follow in their embedding order."""
    from ragstack.index.lexical import Bm25Index, rank, rrf

    if spec.fusion != "rrf":
        raise ValueError("the in-process hybrid ranking fuses by rrf only")
    ids = list(embedding_order)
    index = Bm25Index()
    for i, pid in enumerate(ids):
        index.add(i, passage_text[pid])
    lexical = [ids[i] for i in rank(index.scores(question), key=lambda i: ids[i], limit=spec.depth)]
    if spec.mode == "lexical":
        head = lexical
    else:
        fused = rrf([ids[:spec.depth], lexical], spec.rrf_k, [1.0, spec.lexical_weight])
        head = rank(fused, key=ids.index)
    seen = set(head)
    return head + [pid for pid in ids if pid not in seen]


def rank_in_process(eval_set: Union[dict, str, Path], embed_dir: Union[str, Path],
                    rerank_dir: Union[str, Path, None] = None, top_k: int = 8,
                    batch_size: int = 32, num_threads: Optional[int] = None, searches=None) -> dict:
    """Rank every passage of ``eval_set`` (a dict, or a path for :func:`load_eval`) for every question.

    Passages are embedded as documents and questions as queries by the engine in ``embed_dir``; passages are
    ranked by cosine similarity (the engine's vectors are L2-normalised, so a dot product). With ``rerank_dir``,
    each question's first ``top_k`` passages are rescored by that rerank engine and reordered, the rest keeping
    their embedding order, as a retrieve-then-rerank pipeline does.

    Returns ``{"question_ids", "gold", "embedding", "reranked"}``: ``embedding`` and ``reranked`` hold one list of
    all passage ids per question, best first (``reranked`` is None without ``rerank_dir``), ready for
    :func:`evaluate` with ``gold``. ``searches`` (``{name: SearchSpec}``) adds, per name, the first-stage order of
    that search (:func:`hybrid_order`) as ``name`` and its reranked order as ``name + "_reranked"``.
    """
    from ragstack.engines.embedding import EmbeddingEngine
    from ragstack.engines.reranking import RerankEngine
    from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer

    if not isinstance(eval_set, dict):
        eval_set = load_eval(eval_set)
    else:
        check_eval(eval_set)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    passage_ids = [p["id"] for p in eval_set["passages"]]
    passage_text = {p["id"]: p["text"] for p in eval_set["passages"]}
    questions = eval_set["questions"]

    tokenizer, engine = EmbedTokenizer(Path(embed_dir)), EmbeddingEngine(Path(embed_dir), num_threads)
    documents = _embed_all(tokenizer, engine, [passage_text[i] for i in passage_ids], "document", batch_size)
    queries = _embed_all(tokenizer, engine, [q["question"] for q in questions], "query", batch_size)
    similarity = queries @ documents.T
    embedding_order = [rank_by_scores(row, passage_ids) for row in similarity]

    reranked = None
    if rerank_dir is not None:
        rerank_tok, reranker = RerankTokenizer(Path(rerank_dir)), RerankEngine(Path(rerank_dir), num_threads)
        reranked = []
        for question, order in zip(questions, embedding_order):
            head = order[:top_k]
            input_ids, attention_mask = rerank_tok.encode_pairs(question["question"], [passage_text[i] for i in head])
            reranked.append(rank_by_scores(reranker(input_ids, attention_mask), head) + order[top_k:])

    out = {"question_ids": [q["id"] for q in questions], "gold": [q["answer_id"] for q in questions],
           "embedding": embedding_order, "reranked": reranked}
    for name, spec in (searches or {}).items():
        first = [hybrid_order(q["question"], order, passage_text, spec)
                 for q, order in zip(questions, embedding_order)]
        out[name] = first
        if rerank_dir is not None:
            out[name + "_reranked"] = []
            for question, order in zip(questions, first):
                head = order[:top_k]
                input_ids, attention_mask = rerank_tok.encode_pairs(question["question"],
                                                                    [passage_text[i] for i in head])
                out[name + "_reranked"].append(rank_by_scores(reranker(input_ids, attention_mask), head)
                                               + order[top_k:])
    return out


def misses(ranked: Sequence[Sequence[str]], eval_set: dict, k: int = 1) -> list[dict]:
    """The questions whose answer is not in the first ``k`` of ``ranked``, with what came first instead."""
    out = []
    for question, order in zip(eval_set["questions"], ranked):
        if question["answer_id"] not in order[:k]:
            out.append({"id": question["id"], "answer_id": question["answer_id"], "top": list(order[:k]),
                        "rank": order.index(question["answer_id"]) + 1 if question["answer_id"] in order else None,
                        "distractor_first": order[0] in question.get("distractor_ids", [])})
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Retrieval quality of an embed (and rerank) engine folder on a "
                                                 "labelled question -> passage set, run in process.")
    parser.add_argument("--eval", default=str(DEFAULT_EVAL), help="labelled set (JSON)")
    parser.add_argument("--embed", required=True, help="embed engine folder")
    parser.add_argument("--rerank", help="rerank engine folder (reorders each question's first --top-k)")
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args(argv)

    eval_set = load_eval(args.eval)
    result = rank_in_process(eval_set, args.embed, args.rerank, top_k=args.top_k)
    report = {"embedding": evaluate(result["embedding"], result["gold"]),
              "embedding_misses@1": misses(result["embedding"], eval_set)}
    if result["reranked"] is not None:
        report["reranked"] = evaluate(result["reranked"], result["gold"])
        report["reranked_misses@1"] = misses(result["reranked"], eval_set)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
