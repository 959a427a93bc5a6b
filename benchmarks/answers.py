#!/usr/bin/env python3
"""Grounded answers on the demo models: fact-in-answer, gold citation and abstention per task mode.

IN-PROCESS pipeline (not the served path): ragstack.pipeline.rag.run with in-process engines wired as
ragstack/triton/orchestrator.py wires its BLS calls (EmbedTokenizer + EmbeddingEngine, FlatFileStore over data/corpus
chunked as the `ingest` model chunks it, RerankTokenizer + RerankEngine, InflightBatchingEngine with the task's
guide and penalties), torch threads 2, a few requests at a time so the in-flight batcher batches them.

Modes, side by side on data/answer_eval.json in one run (MODES below; --modes picks some):
* answer_today: the `answer` task as on main before issue 18 (no citation required, neutral penalties, no
  abstention);
* answer: the `answer` task under config/runtime_policy.json (>= 1 citation, its penalties, abstention);
* quote: the `quote` task exactly as config/runtime_policy.json configures it, top_n 5 (as tools/demo.sh asks);
* quote_lines: the first `quote` task (issue 18's first cut): spans are the chunk's lines/sentences, scored
  bare, 4 candidates, up to 2 quotes, the generator writes them;
* gen_cC_qQ, index_cC_qQ, rerank_qQ (+ _top5): the `quote` task with structure-aware spans (list items
  whole, table rows scored with their header, sentences across wrapped lines, spans labelled with their
  heading), C candidates offered, at most Q quotes, chosen by the generator writing them (gen), by the
  generator naming their number (index) or by the reranker alone, no generation (rerank); _top5: top_n 5
  contexts instead of the run's --top-n; _span: abstain when the best *span* scores below 0.7188 (abstain_on
  "span"; 0.7188 is where --calibrate put the span-score threshold on this same labelled set, so these modes'
  abstention figures are fitted, not held out);
* hybrid_*: the `quote` task as rerank_q2_top5_span, its contexts found by hybrid search (BM25 over the chunk
  texts fused with the dense ranking by reciprocal rank, ragstack/index/lexical.py) instead of the dense search
  alone; _kKnN: top_k K candidates, top_n N kept; _lw2: the lexical list weighs twice the dense one in RRF;
  _weighted: fused by a weighted sum of min-max-normalised scores (cosine + BM25) instead of RRF. Every mode not named hybrid searches densely (as
  before hybrid search existed), except answer and quote, which search as the policy says.

Metrics over the answerable questions: fact_in_answer (every gold fact string in the answer, whole words,
case-insensitive; an abstention is a miss), gold_citation (a cited context comes from the gold document and
contains every gold fact), citations_supported (rag's lexical support check); over all questions:
abstention_correct (abstained exactly when the corpus does not answer). Retrieval: gold context among the
reranked top_n contexts (the same for every mode with the same top_n: generation does not touch retrieval).
Quote modes also record, per question, the rank of the first span that holds every fact among all the spans
of the contexts as the mode scores them (fact_span_rank; fact_among_candidates: that rank is within the
candidates offered), which separates "the span was not offered" from "the chooser picked another one".

Calibration (--calibrate; --use-calibrated runs the modes at this run's value instead of the policy's): the reranker's best score per question on the
same labelled set; the threshold is the midpoint between the highest unanswerable and the lowest answerable
best score when they separate, else the score that classifies most questions right. Calibrated and evaluated on
the same small set: the figure is optimistic for unseen questions.

  .venv/bin/python benchmarks/answers.py [--max-tokens 192] [--concurrency 4] [--limit N] [--calibrate]
Writes results/answers.json. ``--eval-set data/answer_eval_heldout.json`` runs the held-out set instead: questions
written after every threshold, weight and mode here was chosen on data/answer_eval.json, so its figures are not
fitted (results/answers-heldout.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_info, now_iso, write_json  # noqa: E402
from in_process import TORCH_THREADS, InProcessPipeline  # noqa: E402

from ragstack.index.lexical import SearchSpec  # noqa: E402

EVAL = ROOT / "data" / "answer_eval.json"
# Mode overrides that are the harness's, not TaskPolicy fields: the span splitter, the request's top_k.
HARNESS_KEYS = ("spans", "top_k")
CONFIGURED_MODES = ("answer", "quote")
# name -> (task, quote-policy overrides, top_n override or None)
MODES = {
    "answer_today": ("answer", None, None),
    "answer": ("answer", None, None),
    "quote": ("quote", None, 5),          # as configured, with top_n 5 as tools/demo.sh asks
    "quote_lines": ("quote", {"quote_select": "generate", "quote_candidates": 4, "max_quotes": 2, "spans": "lines"},
                    None),
    "gen_c4_q2": ("quote", {"quote_select": "generate", "quote_candidates": 4, "max_quotes": 2}, None),
    "gen_c4_q1": ("quote", {"quote_select": "generate", "quote_candidates": 4, "max_quotes": 1}, None),
    "gen_c2_q1": ("quote", {"quote_select": "generate", "quote_candidates": 2, "max_quotes": 1}, None),
    "gen_c8_q1": ("quote", {"quote_select": "generate", "quote_candidates": 8, "max_quotes": 1}, None),
    "index_c4_q1": ("quote", {"quote_select": "index", "quote_candidates": 4, "max_quotes": 1}, None),
    "rerank_q1": ("quote", {"quote_select": "rerank", "max_quotes": 1}, None),
    "rerank_q2": ("quote", {"quote_select": "rerank", "max_quotes": 2}, None),
    "rerank_q1_top5": ("quote", {"quote_select": "rerank", "max_quotes": 1}, 5),
    "gen_c4_q1_top5": ("quote", {"quote_select": "generate", "quote_candidates": 4, "max_quotes": 1}, 5),
    "rerank_q1_top5_span": ("quote", {"quote_select": "rerank", "max_quotes": 1, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188}, 5),
    "rerank_q2_top5_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188}, 5),
    "rerank_q1_span": ("quote", {"quote_select": "rerank", "max_quotes": 1, "abstain_on": "span",
                                 "abstain_below_rerank": 0.7188}, None),
    "rerank_q2_top5": ("quote", {"quote_select": "rerank", "max_quotes": 2}, 5),
    # hybrid search (ragstack/index/lexical.py: BM25 fused with the dense list by RRF, k 60, 50 deep each) under
    # the configured quote settings (rerank_q2_top5_span): top_k 8 -> reranked -> top_n 5, or top_k = top_n 6
    "hybrid_q2_top5_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188, "search": {"mode": "hybrid"}}, 5),
    "hybrid_q2_k6n6_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188, "search": {"mode": "hybrid"}, "top_k": 6}, 6),
    "hybrid_q2_k5n5_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188, "search": {"mode": "hybrid"}, "top_k": 5}, 5),
    "hybrid_q2_k8n8_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                      "abstain_below_rerank": 0.7188, "search": {"mode": "hybrid"}}, 8),
    "hybrid_lw2_q2_top5_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                          "abstain_below_rerank": 0.7188,
                                          "search": {"mode": "hybrid", "lexical_weight": 2.0}}, 5),
    "hybrid_weighted_q2_top5_span": ("quote", {"quote_select": "rerank", "max_quotes": 2, "abstain_on": "span",
                                               "abstain_below_rerank": 0.7188,
                                               "search": {"mode": "hybrid", "fusion": "weighted"}}, 5),
}


def line_units(text: str, heading_path: str = "") -> list:
    """The first quote task's spans (kept here as the baseline): the chunk split at line breaks and sentence
    ends, list/heading markup stripped, each span scored as it is."""
    from ragstack.pipeline import rag

    spans = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        pieces = [sentence] if len(sentence) <= rag.QUOTE_MAX_CHARS else re.split(r"(?<=[;:])\s+", sentence)
        for piece in pieces:
            piece = piece.strip()
            stripped = piece.lstrip("-*#>|0123456789. \t").strip()
            if stripped and not stripped[0].isdigit() and any(c.isalpha() for c in stripped[:1]):
                piece = stripped
            if len(piece) > rag.QUOTE_MAX_CHARS:
                piece = piece[:rag.QUOTE_MAX_CHARS].rsplit(" ", 1)[0]
            if len(piece) >= rag.QUOTE_MIN_CHARS and piece not in spans:
                spans.append(piece)
    return [rag.QuoteUnit(s, s) for s in spans]


def progress(msg: str) -> None:
    print(f"[answers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def has_fact(text: str, fact: str) -> bool:
    norm = lambda s: re.sub(r"[\u2010-\u2015-]", " ", s.lower())   # noqa: E731  "7-day" reads as "7 day"
    return re.search(r"(?<![\w$])" + re.escape(norm(fact)) + r"(?!\w)", norm(text)) is not None


def is_gold(ctx, item: dict) -> bool:
    return ctx.doc_id == item["gold_doc"] and all(has_fact(ctx.text, f) for f in item["facts"])


def mode_policy(policy, mode: str, threshold):
    """(task, runtime policy, top_n override) of a mode: answer_today = main's answer task (neutral penalties, no
    abstention); the others as configured with the mode's quote settings, and the calibrated threshold when
    --use-calibrated says so."""
    task_name, overrides, top_n = MODES[mode]
    base = policy.task(task_name)
    if mode == "answer_today":
        t = dataclasses.replace(base, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                min_tokens=0, len_penalty=0.0, abstain_below_rerank=None, search=SearchSpec())
    else:
        # The configured modes search as the policy says; the others densely (as measured before hybrid
        # search existed) unless they name a search.
        changes = {} if mode in CONFIGURED_MODES else {"search": SearchSpec()}
        changes.update({k: SearchSpec.parse(v) if k == "search" else v
                        for k, v in (overrides or {}).items() if k not in HARNESS_KEYS})
        t = dataclasses.replace(base, **changes)
        if threshold is not None:
            t = dataclasses.replace(t, abstain_below_rerank=threshold)

    class _Policy:
        def __getattr__(self, name):
            return getattr(policy, name)

        def task(self, name=None):
            return t if (name or policy.default_task) == task_name else policy.task(name)
    return task_name, _Policy(), top_n


def today_schema(original):
    """main's answer schema: citations may be empty."""
    def schema(task, context_ids, caller_schema, max_tokens=256, *args):
        out = original(task, context_ids, caller_schema, max_tokens, *args)
        if task == "answer" and caller_schema is None:
            out = json.loads(json.dumps(out))
            out["properties"]["citations"].pop("minItems", None)
        return out
    return schema


def best_scores(pipe: InProcessPipeline, items: list, top_k: int, top_n: int) -> tuple:
    """Per question: the reranker's best context score (what abstention uses) and, for comparison, the best
    quote-span score among the top_n contexts' spans."""
    from ragstack.pipeline import rag

    eng = pipe.engines()
    best, span_best = [], []
    for item in items:
        vec, _ = eng.embed_query(item["question"], None)
        hits = eng.search("default", vec, top_k)
        scores = eng.rerank(item["question"], [h.text for h in hits], None)
        best.append(float(max(scores)) if len(scores) else 0.0)
        top = [h for _, h in sorted(zip(scores, hits), key=lambda p: -float(p[0]))][:top_n]
        spans = rag.quote_candidates(item["question"], top, eng, rag.Timer(), limit=1)
        span_best.append(spans[0].rerank_score if spans else 0.0)
    return best, span_best


def _threshold(items: list, scores: list) -> tuple:
    pos = [s for it, s in zip(items, scores) if it["answerable"]]
    neg = [s for it, s in zip(items, scores) if not it["answerable"]]
    if neg and pos and max(neg) < min(pos):
        return (max(neg) + min(pos)) / 2, "midpoint between the highest unanswerable and lowest answerable"

    def acc(t):
        return sum((s >= t) == it["answerable"] for it, s in zip(items, scores))
    return (max(sorted(set(scores)), key=lambda t: (acc(t), -t)),
            "the best score that classifies most questions right (classes overlap)")


def calibrate(items: list, scores: list) -> dict:
    """The threshold on the whole set, its accuracy there (optimistic: fitted on the same questions), and a
    leave-one-out estimate (each question classified by the threshold fitted on the others)."""
    pos = [s for it, s in zip(items, scores) if it["answerable"]]
    neg = [s for it, s in zip(items, scores) if not it["answerable"]]
    thr, how = _threshold(items, scores)
    correct = sum((s >= thr) == it["answerable"] for it, s in zip(items, scores))
    loo = 0
    for i, (it, s) in enumerate(zip(items, scores)):
        t, _ = _threshold(items[:i] + items[i + 1:], scores[:i] + scores[i + 1:])
        loo += (s >= t) == it["answerable"]
    return {"threshold": round(thr, 4), "method": how, "accuracy_on_set": round(correct / len(items), 3),
            "accuracy_leave_one_out": round(loo / len(items), 3),
            "answerable_min": round(min(pos), 4) if pos else None,
            "unanswerable_max": round(max(neg), 4) if neg else None,
            "per_question": {it["id"]: round(s, 4) for it, s in zip(items, scores)}}


def run_mode(pipe: InProcessPipeline, items: list, mode: str, threshold, args) -> dict:
    from ragstack.pipeline import rag

    task, policy, top_n = mode_policy(pipe.policy, mode, threshold)
    top_n = top_n or args.top_n
    top_k = (MODES[mode][1] or {}).get("top_k") or args.top_k
    task_policy = policy.task(task)
    engines = pipe.engines()

    def one(item):
        t0 = time.perf_counter()
        try:
            req = rag.validate_rag_request(rag.RagRequest(query=item["question"], task=task, top_k=top_k,
                                                      top_n=top_n, max_tokens=args.max_tokens))
            res = rag.run(req, engines, policy)
        except Exception as e:   # noqa: BLE001  an error is a result here (counted, shown)
            return {"id": item["id"], "error": f"{type(e).__name__}: {e}"[:300],
                    "seconds": round(time.perf_counter() - t0, 2)}
        ans = res.answer
        abstained = bool(res.usage.get("abstained"))
        cited = [c for c in res.contexts if c.id in (ans.get("citations") or [])]
        rec = {"id": item["id"], "answer": ans.get("answer"), "citations": ans.get("citations"),
               "abstained": abstained, "tokens_out": res.usage["tokens_out"],
               "finish_reason": res.usage["finish_reason"],
               "citations_supported": res.usage.get("citations_supported"),
               "best_rerank_score": res.usage.get("best_rerank_score"),
               "gold_in_contexts": item["answerable"] and any(is_gold(c, item) for c in res.contexts),
               "seconds": round(time.perf_counter() - t0, 2)}
        if item["answerable"]:
            rec["fact_in_answer"] = (not abstained) and all(has_fact(ans.get("answer") or "", f) for f in item["facts"])
            rec["gold_cited"] = any(is_gold(c, item) for c in cited)
            if task == "quote" and res.contexts:
                # where the fact's span ranks among all spans of the contexts, scored as the mode scores them
                spans = rag.quote_candidates(item["question"], [dataclasses.replace(c) for c in res.contexts],
                                             engines, rag.Timer(), limit=10_000)
                rank = next((n for n, c in enumerate(spans, 1) if all(has_fact(c.text, f) for f in item["facts"])),
                            None)
                rec["fact_span_rank"], rec["spans"] = rank, len(spans)
        return rec

    original_schema, original_units = rag.answer_schema, rag.quote_units
    if mode == "answer_today":
        rag.answer_schema = today_schema(original_schema)
    if (MODES[mode][1] or {}).get("spans") == "lines":
        rag.quote_units = line_units
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            records = list(pool.map(one, items))
        wall = time.perf_counter() - t0
    finally:
        rag.answer_schema, rag.quote_units = original_schema, original_units
    by_id = {it["id"]: it for it in items}
    answerable = [r for r in records if by_id[r["id"]]["answerable"]]
    ok = [r for r in records if "error" not in r]
    answered = [r for r in ok if not r["abstained"]]

    def rate(rs, key):
        return round(sum(bool(r.get(key)) for r in rs) / len(rs), 3) if rs else None
    out = {
        "task": task, "top_k": top_k, "top_n": top_n, "search": task_policy.search.as_dict(),
        "questions": len(records), "errors": len(records) - len(ok),
        "wall_s": round(wall, 1),
        "fact_in_answer": rate(answerable, "fact_in_answer"),
        "gold_citation": rate(answerable, "gold_cited"),
        "gold_citation_when_retrieved": rate([r for r in answerable if r.get("gold_in_contexts")], "gold_cited"),
        "citations_supported": rate([r for r in answerable if not r.get("abstained")], "citations_supported"),
        "abstention_correct": round(sum(("error" not in r) and r["abstained"] == (not by_id[r["id"]]["answerable"])
                                        for r in records) / len(records), 3),
        "false_abstentions": sum(bool(r.get("abstained")) for r in answerable),
        "retrieval_gold_in_top_n": rate(answerable, "gold_in_contexts"),
        "mean_tokens_out": round(float(np.mean([r["tokens_out"] for r in ok])), 1) if ok else None,
        "mean_answer_chars": round(float(np.mean([len(r["answer"] or "") for r in answered])), 1) if answered else None,
    }
    if task == "quote":
        tp = task_policy
        out["quote_policy"] = {"quote_select": tp.quote_select, "quote_candidates": tp.quote_candidates,
                               "max_quotes": tp.max_quotes, "abstain_on": tp.abstain_on,
                               "abstain_below_rerank": tp.abstain_below_rerank,
                               "spans": (MODES[mode][1] or {}).get("spans", "structured")}
        ranked = [r for r in answerable if "fact_span_rank" in r]
        offered = tp.max_quotes if tp.quote_select == "rerank" else tp.quote_candidates
        out["fact_among_candidates"] = (round(sum((r["fact_span_rank"] or 10**9) <= offered for r in ranked)
                                              / len(ranked), 3) if ranked else None)
        out["fact_span_is_top1"] = (round(sum(r["fact_span_rank"] == 1 for r in ranked) / len(ranked), 3)
                                    if ranked else None)
    out["records"] = records
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "models" / "demo")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--top-n", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="first N answerable + all unanswerable (0: all)")
    ap.add_argument("--calibrate", action="store_true", help="only calibrate the abstention threshold (every run "
                    "records the calibration in its results)")
    ap.add_argument("--use-calibrated", action="store_true",
                    help="run the grounded modes at this run's calibrated threshold instead of the policy's")
    ap.add_argument("--no-calibration", action="store_true", help="do not record the calibration after the modes")
    ap.add_argument("--eval-set", type=Path, default=EVAL,
                    help="labelled questions (data/answer_eval_heldout.json: the held-out set, never used to tune)")
    ap.add_argument("--out", type=Path, default=RESULTS / "answers.json")
    args = ap.parse_args()

    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    eval_set = args.eval_set.resolve()
    items = json.loads(eval_set.read_text())["questions"]
    if args.limit:
        items = [i for i in items if i["answerable"]][:args.limit] + [i for i in items if not i["answerable"]]
    t_start = time.perf_counter()
    cal, modes = None, {}

    def write(pipe, threshold, complete):
        """The results so far (after each mode: a run stopped early keeps the modes it finished)."""
        best = max((m for m in modes if m != "answer_today"), default=None,
                   key=lambda m: (modes[m]["fact_in_answer"] or 0) + (modes[m]["gold_citation"] or 0))
        out = {
            "benchmark": "answers", "when": now_iso(), "complete": complete, "machine": machine_info(TORCH_THREADS),
            "path": "in-process pipeline (ragstack.pipeline.rag.run with in-process engines), not the served Triton path",
            "models": str(args.models.relative_to(ROOT)) if args.models.is_relative_to(ROOT) else str(args.models),
            "eval_set": str(eval_set.relative_to(ROOT)) if eval_set.is_relative_to(ROOT) else str(eval_set),
            "max_tokens": args.max_tokens, "top_k": args.top_k,
            "top_n": args.top_n, "concurrency": args.concurrency, "modes_asked": args.modes.split(","),
            "calibration": cal, "threshold_used": threshold if threshold is not None else {
                m: None if m == "answer_today" else pipe.policy.task(MODES[m][0]).abstain_below_rerank for m in modes},
            "modes": modes, "best_mode": best,
            "targets": None if best is None else {
                "fact_in_answer_best": {"value": modes[best]["fact_in_answer"], "goal": 0.7,
                                        "met": (modes[best]["fact_in_answer"] or 0) >= 0.7},
                "gold_citation_best": {"value": modes[best]["gold_citation"], "goal": 0.9,
                                       "met": (modes[best]["gold_citation"] or 0) >= 0.9}},
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        write_json(args.out, out)
        return out

    with tempfile.TemporaryDirectory(prefix="answers-index-") as index_dir:
        pipe = InProcessPipeline(args.models, Path(index_dir))
        try:
            progress(f"ingesting data/corpus: {pipe.ingest_corpus()}")
            threshold = None
            if args.calibrate or args.use_calibrated:
                cal = run_calibration(pipe, items, args)
                if args.calibrate:
                    print(json.dumps(cal, indent=1))
                    return
                threshold = cal["threshold"]
            for mode in args.modes.split(","):
                progress(f"mode {mode}: {len(items)} questions")
                modes[mode] = run_mode(pipe, items, mode, threshold, args)
                summary = {k: v for k, v in modes[mode].items() if k != "records"}
                progress(f"mode {mode}: {json.dumps(summary)}")
                write(pipe, threshold, complete=False)
            if cal is None and not args.no_calibration:
                # Cheap next to generation: every run records where the threshold falls on this set (the modes
                # above ran at the policy's threshold).
                cal = run_calibration(pipe, items, args)
            out = write(pipe, threshold, complete=True)
        finally:
            pipe.generator.shutdown(10)
    progress(f"wrote {args.out} in {out['wall_s']} s; best mode {out['best_mode']}")


def run_calibration(pipe: InProcessPipeline, items: list, args) -> dict:
    context_best, span_best = best_scores(pipe, items, args.top_k, args.top_n)
    cal = calibrate(items, context_best)
    cal["best_span_score_for_comparison"] = calibrate(items, span_best)
    progress(f"calibration: {json.dumps({k: v for k, v in cal.items() if k != 'per_question'})}")
    return cal


if __name__ == "__main__":
    main()
