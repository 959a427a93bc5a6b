#!/usr/bin/env python3
"""Retrieval quality on the labelled set (data/retrieval_eval.json) with the demo models → results/retrieval.json.

Two measurements of the same thing, side by side:
* in-process: the embed and rerank engines called directly (ragstack_dev.retrieval_eval.rank_in_process), for the
  dense search and for the hybrid one (BM25 over the passages fused with the embedding order: the configured
  quote task's search, or --hybrid; plain equal-weight RRF beside it when that differs);
* the endpoint: the passages ingested through `ingest`, each question asked of `rag` on a real tritonserver;
  the embedding order is the contexts sorted by retrieval score, the final order is what `rag` returns
  (reranked). The endpoint's final order must not be worse than the embedding order.

  .venv/bin/python benchmarks/retrieval.py [--models build/models/demo] [--skip-endpoint]
"""
import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import identity_headers  # noqa: E402
from ragstack.contracts import client as client_io  # noqa: E402
from ragstack_dev.server import access_keys  # noqa: E402
from ragstack.index.lexical import SearchSpec  # noqa: E402
from ragstack.governance.policy import RuntimePolicy  # noqa: E402
from ragstack_dev.retrieval_eval import evaluate, load_eval, misses, rank_in_process  # noqa: E402
from ragstack_dev.server import TritonProcess, progress  # noqa: E402

TOP_K = 8
MODELS = "embed rerank generate vector_index ingest rag_orchestrator rag"


def endpoint_rankings(eval_set: dict, models: Path, task: str = "answer") -> tuple:
    import tritonclient.http as httpclient

    headers = identity_headers(models)
    with tempfile.TemporaryDirectory() as data, \
            TritonProcess(models, load_models=MODELS, env={"RAG_DATA_PATH": data}) as server:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=600, connection_timeout=600)

        def infer(model, values, hdrs=None):
            return client.infer(model, client_io.infer_inputs(httpclient, model, values),
                                headers={"x-api-key": access_keys().admin_key, **(hdrs or {})})

        passages = eval_set["passages"]
        progress(f"ingesting {len(passages)} passages")
        infer("ingest", {"doc_ids": [p["id"] for p in passages], "texts": [p["text"] for p in passages],
                         "collection": "eval"})
        embedding, final, modes = [], [], set()
        for i, q in enumerate(eval_set["questions"], 1):
            values = {"query": q["question"], "collection": "eval", "top_k": TOP_K, "top_n": TOP_K, "max_tokens": 96,
                      "task": task}
            response = infer("rag", values, headers)
            contexts = client_io.output_json(response, "contexts")
            modes.add(client_io.output_json(response, "usage").get("search"))
            final.append([c["doc_id"] for c in contexts])
            embedding.append([c["doc_id"] for c in sorted(contexts, key=lambda c: -c["score"])])
            progress(f"question {i}/{len(eval_set['questions'])}: gold rank "
                     f"{final[-1].index(q['answer_id']) + 1 if q['answer_id'] in final[-1] else '>' + str(TOP_K)}")
        return embedding, final, sorted(map(str, modes))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "build" / "models" / "demo")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "retrieval.json")
    ap.add_argument("--skip-endpoint", action="store_true")
    ap.add_argument("--task", default="answer", help="the rag task asked at the endpoint (its policy's search: "
                    "quote searches hybrid)")
    ap.add_argument("--hybrid", help="the in-process hybrid search (JSON SearchSpec) [the configured quote task's; "
                    "plain RRF is measured beside it when it differs]")
    args = ap.parse_args()
    eval_set = load_eval()
    gold = [q["answer_id"] for q in eval_set["questions"]]
    t0 = time.time()
    progress("in-process ranking")
    # the configured quote task's search, and plain RRF (equal weights) when that differs
    configured = RuntimePolicy.load(ROOT / "config" / "runtime_policy.json").task("quote").search
    searches = {"hybrid": SearchSpec.parse(json.loads(args.hybrid)) if args.hybrid else configured}
    if searches["hybrid"] != SearchSpec(mode="hybrid"):
        searches["hybrid_rrf"] = SearchSpec(mode="hybrid")
    ranked = rank_in_process(eval_set, args.models / "embed", args.models / "rerank", top_k=TOP_K,
                             searches=searches)
    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": str(args.models.relative_to(ROOT) if args.models.is_relative_to(ROOT) else args.models),
        "questions": len(gold), "passages": len(eval_set["passages"]), "top_k": TOP_K,
        "in_process": {"embedding": evaluate(ranked["embedding"], gold),
                       "reranked": evaluate(ranked["reranked"], gold),
                       "misses_at_1": misses(ranked["reranked"], eval_set),
                       },
    }
    for name, spec in searches.items():
        # hybrid search (ragstack/index/lexical.py: BM25 over the passages fused with the embedding order),
        # before and after the reranker re-sorts its first TOP_K
        report["in_process"].update({f"{name}_search": spec.as_dict(), name: evaluate(ranked[name], gold),
                                     f"{name}_reranked": evaluate(ranked[f"{name}_reranked"], gold),
                                     f"{name}_misses_at_1": misses(ranked[f"{name}_reranked"], eval_set)})
    if not args.skip_endpoint:
        embedding, final, modes = endpoint_rankings(eval_set, args.models, args.task)
        report["endpoint"] = {"task": args.task, "search": modes, "embedding": evaluate(embedding, gold),
                              "final": evaluate(final, gold)}
        e, f = report["endpoint"]["embedding"], report["endpoint"]["final"]
        report["endpoint"]["final_not_worse"] = f["mrr"] >= e["mrr"] and f["recall@5"] >= e["recall@5"]
    report["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k in ("in_process", "endpoint")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
