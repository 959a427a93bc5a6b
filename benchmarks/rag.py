#!/usr/bin/env python3
"""The `rag` endpoint: where its time goes, and its throughput against the same models called in-process.

For the demo model set (and, for the overhead only, the tiny one) this process starts one tritonserver with its
own RAG_DATA_PATH, ingests data/corpus through the `ingest` model and then measures:

* overhead, sequential queries (one at a time, gRPC): the client's end-to-end latency of `rag` against
  - the orchestrator's own per-stage timings (`usage.timings_ms`, measured around the BLS calls):
    overhead = e2e - (embed + search + rerank + generate), and inside the orchestrator total - the same stages;
  - Triton's statistics (compute_input + compute_infer + compute_output) of embed, rerank, vector_index and
    generate before/after the run. `generate` is decoupled: its execute() only enqueues, so its compute time
    does not cover the generation; the "engine compute" view is given raw (as Triton reports it) and with the
    generate stage's time in place of generate's compute.
  Target: under 10% of e2e on the demo set; a few ms absolute per request on the tiny set.
* throughput: `rag` at concurrency 8 against an in-process loop over the same models (EmbedTokenizer +
  EmbeddingEngine, numpy search over the same chunk vectors, RerankTokenizer + RerankEngine,
  InflightBatchingEngine with ragstack.pipeline.rag's prompt and schema: rag.run with in-process engines), one request
  at a time, interleaved round by round on the same questions. Target >= 1.5x.
* optionally (--perf-analyzer) perf_analyzer against `rag` with benchmarks/perf_data/rag.json.

Writes results/rag.json. Progress goes to stderr.

  .venv/bin/python benchmarks/rag.py [--seq-queries 12] [--round-queries 16] [--perf-analyzer] [--quick]

The machine is shared: throughput rounds (Triton c8 and in-process side by side) repeat until enough of them
were "clean" (other processes under 10% of the CPU in both segments); the headline ratio comes from those.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import identity_headers, ingest_corpus  # noqa: E402
from in_process import TORCH_THREADS, InProcessPipeline  # noqa: E402
from common import (PERF_DATA, RESULTS, ROOT, ClosedLoop, Segment, clean_pairs, display_path,  # noqa: E402
                    eval_questions, latency_summary, machine_info, model_stats, now_iso, paired_ratio, progress,
                    run_perf_analyzer, stats_delta, target, wait_idle, write_input_data, write_json)

from ragstack.contracts import client as client_io  # noqa: E402
from ragstack_dev.server import TritonProcess  # noqa: E402

CONCURRENCY = 8
LOAD_MODELS = "rag ingest embed rerank generate vector_index"
ENGINE_MODELS = ("embed", "rerank", "vector_index", "generate")
STAT_MODELS = ENGINE_MODELS + ("rag_orchestrator", "rag")
STAGES = ("tokenize", "embed", "search", "rerank", "generate")
WORK_STAGES = ("embed", "search", "rerank", "generate")
IDLE = {"max_fraction": 0.3, "max_wait": 120.0}
# Throughput rounds repeat until CLEAN_ROUNDS clean pairs (other processes under MAX_OTHER of the CPU in both
# segments), or --rounds rounds, or BUDGET_S seconds (set by main).
CLEAN_ROUNDS, MAX_OTHER, BUDGET_S = 2, 0.10, 1500.0


# ---------------------------------------------------------------------------------------------- client
def rag_inputs(mod, query: str, top_k: int, top_n: int, max_tokens=None) -> list:
    return client_io.infer_inputs(mod, "rag", {"query": query, "top_k": top_k, "top_n": top_n,
                                               "max_tokens": max_tokens or None})


def parse_result(result) -> dict:
    return {name: client_io.output_json(result, name) for name in ("answer", "contexts", "usage")}


# ------------------------------------------------------------------------------------ sequential overhead
def orchestrator_instances() -> int:
    """rag_orchestrator's instance count (its deployment, which generates its config)."""
    from ragstack.contracts import model_config
    from ragstack.contracts import tensors as contracts

    return next(d.instances for d in model_config.BLS if d.contract is contracts.RAG_ORCHESTRATOR)


def floor_repository(tmp: Path) -> Path:
    """A model repository with `floor`: `rag`'s ensemble and orchestrator configs (same contract, batching and
    instances) over benchmarks/floor_model/model.py, a Python-backend model that does no work."""
    repo = tmp / "floor-repository"
    (repo / "floor" / "1").mkdir(parents=True, exist_ok=True)          # an ensemble needs a version folder too
    (repo / "floor_orchestrator" / "1").mkdir(parents=True, exist_ok=True)
    ensemble = (ROOT / "bls_models" / "rag" / "config.pbtxt").read_text()
    (repo / "floor" / "config.pbtxt").write_text(
        ensemble.replace('name: "rag"', 'name: "floor"', 1)
        .replace('model_name: "rag_orchestrator"', 'model_name: "floor_orchestrator"'))
    orchestrator = (ROOT / "bls_models" / "rag_orchestrator" / "config.pbtxt").read_text()
    (repo / "floor_orchestrator" / "config.pbtxt").write_text(
        orchestrator.replace('name: "rag_orchestrator"', 'name: "floor_orchestrator"', 1))
    shutil.copy(Path(__file__).resolve().parent / "floor_model" / "model.py",
                repo / "floor_orchestrator" / "1" / "model.py")
    return repo


def sequential_overhead(server: TritonProcess, headers: dict, questions: list, top_k: int, top_n: int,
                        max_tokens, floor: bool = False) -> dict:
    """One query at a time; with ``floor``, each is also sent to `floor` (floor_repository), the two in
    alternating order, timed the same way (inputs built, call, outputs parsed)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    rows, failures = [], []
    before = model_stats(http, STAT_MODELS)

    def call(model, q):
        t0 = time.perf_counter()
        out = parse_result(grpc.infer(model, rag_inputs(grpcclient, q, top_k, top_n, max_tokens),
                                      headers=dict(headers), client_timeout=600))
        return out, (time.perf_counter() - t0) * 1000.0

    for i, q in enumerate(questions):
        floor_ms = None
        try:
            if floor and i % 2:
                floor_ms = call("floor", q)[1]
            out, e2e = call("rag", q)
            if floor and not i % 2:
                floor_ms = call("floor", q)[1]
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            failures.append({"query": q, "error": str(e)[:500]})
            progress(f"  query {i + 1}/{len(questions)} FAILED: {str(e)[:200]}")
            continue
        usage = out["usage"]
        rows.append({"e2e_ms": e2e, **{f"{k}_ms": float(v) for k, v in usage["timings_ms"].items()},
                     "tokens_in": usage["tokens_in"], "tokens_out": usage["tokens_out"],
                     "finish_reason": usage["finish_reason"],
                     **({"floor_e2e_ms": floor_ms} if floor_ms is not None else {})})
        progress(f"  query {i + 1}/{len(questions)}: e2e {e2e:.0f} ms, stages {usage['timings_ms']}, "
                 f"{usage['tokens_out']} tokens out")
    delta = stats_delta(before, model_stats(http, STAT_MODELS))
    if not rows:
        return {"error": "every query failed", "failures": failures}

    def total(key):
        return sum(r[key] for r in rows)

    n = len(rows)
    e2e, orch = total("e2e_ms"), total("total_ms")
    stages = {s: total(f"{s}_ms") for s in STAGES}
    work = sum(stages[s] for s in WORK_STAGES)
    compute_ms = {m: (delta[m]["compute_input_ns"] + delta[m]["compute_infer_ns"] + delta[m]["compute_output_ns"]) / 1e6
                  for m in STAT_MODELS}
    queue_ms = {m: delta[m]["queue_ns"] / 1e6 for m in STAT_MODELS}
    engine_raw = sum(compute_ms[m] for m in ENGINE_MODELS)
    engine_fixed = sum(compute_ms[m] for m in ("embed", "rerank", "vector_index")) + stages["generate"]
    per_request = {"e2e": e2e / n, "orchestrator_total": orch / n, **{s: stages[s] / n for s in STAGES},
                   "overhead_e2e_minus_stages": (e2e - work) / n,
                   "overhead_inside_orchestrator": (orch - work) / n,
                   "outside_orchestrator": (e2e - orch) / n}
    return {
        "queries": n, "failures": failures,
        "e2e_latency_ms": latency_summary([r["e2e_ms"] / 1000 for r in rows]),
        "tokens_out_mean": round(statistics.mean(r["tokens_out"] for r in rows), 1),
        "tokens_in_mean": round(statistics.mean(r["tokens_in"] for r in rows), 1),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in {r["finish_reason"] for r in rows}},
        "mean_per_request_ms": {k: round(v, 3) for k, v in per_request.items()},
        "usage_view": {
            "definition": "overhead = e2e - (embed + search + rerank + generate), the stages timed by the "
                          "orchestrator around its BLS calls (tokenization, prompt building, schema, JSON check, "
                          "ensemble, gRPC and client time all count as overhead)",
            "overhead_fraction_of_e2e": round((e2e - work) / e2e, 4),
            "overhead_ms_per_request": round((e2e - work) / n, 3),
            "inside_orchestrator_ms_per_request": round((orch - work) / n, 3),
            "of_which_tokenize_ms_per_request": round(stages["tokenize"] / n, 3),
            "outside_orchestrator_ms_per_request": round((e2e - orch) / n, 3),
            **({"triton_floor_ms_per_request": round(total("floor_e2e_ms") / n, 3),
                "overhead_above_floor_ms_per_request": round((e2e - work - total("floor_e2e_ms")) / n, 3),
                "floor_definition": "the same call to `floor`: rag's ensemble and orchestrator configs over a "
                                    "Python-backend model that does no work (benchmarks/floor_model), sent "
                                    "alternately before and after each rag call: what Triton, gRPC and the "
                                    "client cost a request that the stack cannot remove"}
               if all("floor_e2e_ms" in r for r in rows) else {}),
        },
        "triton_statistics_view": {
            "compute_ms_per_request": {m: round(v / n, 3) for m, v in compute_ms.items()},
            "queue_ms_per_request": {m: round(v / n, 3) for m, v in queue_ms.items()},
            "executions": {m: delta[m]["execution_count"] for m in STAT_MODELS},
            "inferences": {m: delta[m]["inference_count"] for m in STAT_MODELS},
            "raw_overhead_fraction": round((e2e - engine_raw) / e2e, 4),
            "raw_note": "generate is decoupled: its compute covers only execute(), which enqueues the request "
                        "and returns; the generation itself is not in any Triton compute counter",
            "overhead_fraction_with_generate_stage": round((e2e - engine_fixed) / e2e, 4),
            "overhead_ms_per_request_with_generate_stage": round((e2e - engine_fixed) / n, 3),
            "fixed_note": "engine compute = Triton compute of embed + rerank + vector_index, plus the "
                          "orchestrator's generate stage (BLS stream time) for generate",
        },
        "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }


# ------------------------------------------------------------------------------------------- in-process
def overhead_breakdown(local: InProcessPipeline, questions: list, top_k: int, top_n: int, max_tokens) -> dict:
    """Where the orchestration overhead goes, measured in-process on the same pipeline code: the orchestrator's
    own stage timings plus wall time of the pipeline steps that run outside every stage (answer schema, the
    JSON/schema check of the answer, the schema id)."""
    from ragstack.governance import policy as policy_mod
    from ragstack.pipeline import rag

    spent: dict = {}

    def wrap(module, name):
        original = getattr(module, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0
        setattr(module, name, timed)
        return module, name, original

    patched = [wrap(rag, "check_answer"), wrap(rag, "answer_schema"), wrap(policy_mod, "schema_id")]
    totals = {k: 0.0 for k in ("total", "tokenize", "stages")}
    cache = local.rerank_tok.documents if local.rerank_tok.split else None
    try:
        local.ask(questions[0], top_k, top_n, max_tokens)
        spent.clear()
        before = (cache.hits, cache.misses) if cache else None
        for q in questions:
            t = local.ask(q, top_k, top_n, max_tokens)["usage"]["timings_ms"]
            totals["total"] += t["total"]
            totals["tokenize"] += t["tokenize"]
            totals["stages"] += sum(t[k] for k in WORK_STAGES)
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
    n = len(questions)
    overhead = (totals["total"] - totals["stages"]) / n
    parts = {"tokenize (embed/rerank tokenization, chat template, counting context tokens)": totals["tokenize"] / n,
             "check_answer (json.loads + jsonschema.validate of the answer)": spent.get("check_answer", 0.0) / n,
             "answer_schema": spent.get("answer_schema", 0.0) / n, "schema_id": spent.get("schema_id", 0.0) / n}
    parts["rest (validation, policy, sorting, prompt assembly, usage)"] = overhead - sum(parts.values())
    out = {"queries": n, "where": "in-process, rag.run with in-process engines (no Triton)",
           "overhead_ms_per_request": round(overhead, 3),
           "parts_ms_per_request": {k: round(v, 3) for k, v in parts.items()}}
    if cache:
        out["rerank_document_cache"] = {"hits": cache.hits - before[0], "misses": cache.misses - before[1],
                                        "note": "documents whose reranker token ids were kept from an earlier "
                                                "query of the run (RerankTokenizer's TokenCache)"}
    return out


# ------------------------------------------------------------------------------------------- throughput
def throughput(server: TritonProcess, headers: dict, local: InProcessPipeline, questions: list, rounds: int,
               per_round: int, top_k: int, top_n: int, max_tokens) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    answers = {"triton": {}, "in_process": {}}

    def submit_for(qs):
        def submit(i, done):
            q = qs[i]

            def callback(result, error):
                if error is not None:
                    done(False, error)
                    return
                out = parse_result(result)
                answers["triton"][q] = out["answer"]
                done(True, out["usage"])
            client.async_infer("rag", rag_inputs(grpcclient, q, top_k, top_n, max_tokens), callback=callback,
                               headers=dict(headers), client_timeout=900)
        return submit

    per = {"triton_c8": [], "in_process_sequential": []}
    idle = []
    started, rnd = time.time(), 0
    while True:
        qs = [questions[(rnd * per_round + k) % len(questions)] for k in range(per_round)]
        idle.append(wait_idle(**IDLE))
        order = ("triton_c8", "in_process_sequential") if rnd % 2 == 0 else ("in_process_sequential", "triton_c8")
        for name in order:
            with Segment(server.proc.pid) as seg:
                if name == "triton_c8":
                    r = ClosedLoop(submit_for(qs), CONCURRENCY).run(count=len(qs))
                    usages, errors, elapsed = r["values"], r["errors"], r["elapsed_s"]
                    lat = r["latency_ms"]
                else:
                    usages, errors, lats = [], [], []
                    t0 = time.perf_counter()
                    for q in qs:
                        tq = time.perf_counter()
                        try:
                            out = local.ask(q, top_k, top_n, max_tokens)
                            usages.append(out["usage"])
                            answers["in_process"][q] = out["answer"]
                        except Exception as e:  # noqa: BLE001
                            errors.append(str(e)[:300])
                        lats.append(time.perf_counter() - tq)
                    elapsed = time.perf_counter() - t0
                    lat = latency_summary(lats)
            tokens = sum(u["tokens_out"] for u in usages)
            rec = {"requests": len(qs), "ok": len(usages), "errors": errors[:3], "elapsed_s": round(elapsed, 2),
                   "requests_per_s": round(len(usages) / elapsed, 4), "output_tokens": tokens,
                   "output_tokens_per_s": round(tokens / elapsed, 2), "latency_ms": lat, **seg.as_dict()}
            per[name].append(rec)
            progress(f"rag throughput round {rnd + 1} {name}: {rec['requests_per_s']:.3f} req/s "
                     f"({len(usages)}/{len(qs)} ok, {tokens} tokens in {rec['elapsed_s']} s; machine busy "
                     f"{rec['machine_busy_fraction']:.0%}, other processes {rec['cpu_s_other_processes']} cpu-s)")
        rnd += 1
        clean = clean_pairs(per, "triton_c8", "in_process_sequential", MAX_OTHER)
        if clean >= CLEAN_ROUNDS or rnd >= rounds or time.time() - started > BUDGET_S:
            break
        progress(f"rag throughput: {clean} clean round(s) so far")
    same = [q for q in answers["triton"] if q in answers["in_process"]]
    matches = sum(answers["triton"][q] == answers["in_process"][q] for q in same)

    def total(name):
        recs = per[name]
        return round(sum(r["ok"] for r in recs) / sum(r["elapsed_s"] for r in recs), 4)
    return {
        "settings": {"concurrency": CONCURRENCY, "rounds": rnd, "queries_per_round": per_round,
                     "stop_rule": f"rounds repeat until {CLEAN_ROUNDS} clean pair(s) (other processes under "
                                  f"{MAX_OTHER:.0%} of the CPU in both segments), at most {rounds} rounds or "
                                  f"{BUDGET_S:.0f} s",
                     "top_k": top_k, "top_n": top_n, "max_tokens": max_tokens or "task policy default",
                     "in_process": "rag.run with in-process engines (EmbedTokenizer+EmbeddingEngine, FlatFileStore "
                                   "search over a copy of the server's index, RerankTokenizer+RerankEngine, "
                                   "InflightBatchingEngine), one request at a time, torch threads 2"},
        "requests_per_s_all_rounds": {name: total(name) for name in per},
        "ratio": paired_ratio(per, "triton_c8", "in_process_sequential", "ok", MAX_OTHER),
        "output_tokens_ratio": paired_ratio(per, "triton_c8", "in_process_sequential", "output_tokens", MAX_OTHER),
        "per_round": per, "idle_before_round": idle,
        "identical_answers": {"compared": len(same), "identical": matches,
                              "note": "greedy decoding: the in-process answers should equal the server's"},
    }


# ----------------------------------------------------------------------------------------- perf_analyzer
def write_perf_data(path: Path, questions: list, top_k: int, top_n: int, max_tokens: int) -> None:
    """perf_analyzer input data for `rag`: one entry per question; shapes exclude the batch dimension
    (rag batches, max_batch_size 8, dims [1]); perf_analyzer adds it (-b, default 1)."""
    data = [{"query": {"content": [q], "shape": [1]}, "top_k": {"content": [top_k], "shape": [1]},
             "top_n": {"content": [top_n], "shape": [1]}, "max_tokens": {"content": [max_tokens], "shape": [1]}}
            for q in questions]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_input_data(path, data)


def perf_analyzer_args(protocol: str, url: str, headers: Optional[dict] = None) -> list:
    """perf_analyzer against rag at concurrency 2, in count windows (a rag request takes seconds: a window of 6
    requests instead of a fixed interval); -s 100 because the shared machine rarely holds still for a stricter
    stability check. HTTP headers go with -H; perf_analyzer 2.51 ignores -H for gRPC."""
    args = ["-m", "rag", "-i", protocol, "-u", url, "--input-data", str((PERF_DATA / "rag.json").relative_to(ROOT)),
            "--concurrency-range", "2", "--measurement-mode", "count_windows", "--measurement-request-count", "6",
            "-s", "100", "--max-trials", "4"]
    for key, value in (headers or {}).items():
        args += ["-H", f"{key}:{value}"]
    return args


def policy_without_identity(path: Path) -> Path:
    """A copy of the runtime policy with require_engine_identity off (perf_analyzer cannot send gRPC headers)."""
    from ragstack.triton import adapter as ta

    policy = json.loads(Path(ta.DEFAULT_POLICY_FILE).read_text())
    policy["require_engine_identity"] = False
    path.write_text(json.dumps(policy, indent=2))
    return path


def perf_analyzer_checks(server: TritonProcess, models: Path, headers: dict, data_dir: Path, tmp: Path) -> dict:
    out = {}
    progress("[demo] perf_analyzer over gRPC against the server as configured (identity headers required)")
    out["grpc_identity_required"] = run_perf_analyzer(perf_analyzer_args("grpc", server.grpc_url), timeout=900)
    progress(f"  -> {out['grpc_identity_required'].get('summary') or out['grpc_identity_required'].get('tail', '')[-300:]}")
    wait_idle(**IDLE)
    progress("[demo] perf_analyzer over HTTP with the identity headers (-H)")
    out["http_with_headers"] = run_perf_analyzer(perf_analyzer_args("http", server.http_url, headers), timeout=900)
    progress(f"  -> {out['http_with_headers'].get('summary') or out['http_with_headers'].get('tail', '')[-300:]}")
    # gRPC: a second server on the same models and a copy of the same index, with identity checking off.
    copy = tmp / "demo-pa"
    shutil.copytree(data_dir, copy)
    policy = policy_without_identity(tmp / "runtime_policy_no_identity.json")
    log_path = ROOT / "build" / "logs" / "bench-rag-perf-analyzer.log"
    progress(f"[demo] perf_analyzer over gRPC against a server with RAG_POLICY_FILE={policy} "
             f"(require_engine_identity false), log {display_path(log_path)}")
    second = TritonProcess(models, load_models=LOAD_MODELS, log_path=log_path,
                           env={"RAG_DATA_PATH": str(copy), "RAG_POLICY_FILE": str(policy)})
    try:
        second.start()
        wait_idle(**IDLE)
        out["grpc_identity_off"] = run_perf_analyzer(perf_analyzer_args("grpc", second.grpc_url), timeout=900)
        out["grpc_identity_off"]["server_env"] = "RAG_POLICY_FILE=<copy of config/runtime_policy.json with " \
                                                 "require_engine_identity false>"
        progress(f"  -> {out['grpc_identity_off'].get('summary') or out['grpc_identity_off'].get('tail', '')[-300:]}")
    except Exception as e:  # noqa: BLE001
        out["grpc_identity_off"] = {"error": f"{type(e).__name__}: {e}"[:2000], "server_log_tail": second.log_tail(30)}
    finally:
        second.stop()
    return out


# ------------------------------------------------------------------------------------------------ main
def run_profile(name: str, models: Path, args, questions: list, do_throughput: bool, tmp: Path) -> dict:
    out = {"models": display_path(models)}
    data_dir = tmp / name
    log_path = ROOT / "build" / "logs" / f"bench-rag-{name}.log"
    out["server_log"] = display_path(log_path)
    headers = identity_headers(models)
    progress(f"[{name}] starting tritonserver (RAG_DATA_PATH={data_dir}, log {display_path(log_path)})")
    floor = name == "tiny"
    server = TritonProcess(models, load_models=LOAD_MODELS + (" floor floor_orchestrator" if floor else ""),
                           log_path=log_path, env={"RAG_DATA_PATH": str(data_dir)},
                           extra_args=(f"--model-repository={floor_repository(tmp)}",) if floor else ())
    try:
        server.start()
    except Exception as e:  # noqa: BLE001
        out["error"] = f"server did not start: {e}"[:4000]
        return out
    local = None
    try:
        progress(f"[{name}] ingesting data/corpus through `ingest`")
        out["ingest"] = ingest_corpus(server.http_url)
        progress(f"[{name}] ingested {out['ingest']['documents']} documents, {out['ingest']['chunks']} chunks "
                 f"in {out['ingest']['seconds']} s")
        # One warm-up query per orchestrator instance (a stub's first request opens its loopback connection
        # and fills its caches: one-time costs, not the per-request overhead measured here).
        instances = orchestrator_instances()
        progress(f"[{name}] warm-up: {instances} queries (one per rag_orchestrator instance)")
        warm = sequential_overhead(server, headers, questions[:1] * instances, args.top_k, args.top_n,
                                   args.max_tokens, floor=floor)
        if warm.get("error"):
            raise RuntimeError(f"the warm-up query failed: {warm['failures'][0]['error']}")
        wait_idle(**IDLE)
        n = args.seq_queries if name == "demo" else args.tiny_queries
        progress(f"[{name}] sequential overhead run: {n} queries")
        out["sequential"] = sequential_overhead(server, headers, questions[:n], args.top_k, args.top_n,
                                                args.max_tokens, floor=floor)
        index_copy = tmp / f"{name}-index-copy"
        shutil.copytree(data_dir / "index", index_copy)
        if do_throughput:
            progress(f"[{name}] loading the in-process pipeline")
            local = InProcessPipeline(models, index_copy)
            local.ask(questions[0], args.top_k, args.top_n, args.max_tokens)   # warm-up (grammar compile)
            out["throughput"] = throughput(server, headers, local, questions, args.rounds, args.round_queries,
                                           args.top_k, args.top_n, args.max_tokens)
            local.close()
            local = None
        else:
            # server idle from here on: the in-process breakdown of the overhead
            progress(f"[{name}] in-process breakdown of the orchestration overhead")
            local = InProcessPipeline(models, index_copy)
            out["overhead_breakdown_in_process"] = overhead_breakdown(local, questions[:n], args.top_k, args.top_n,
                                                                      args.max_tokens)
            progress(f"[{name}] {out['overhead_breakdown_in_process']}")
            local.close()
            local = None
        if args.perf_analyzer and name == "demo":
            write_perf_data(PERF_DATA / "rag.json", questions, args.top_k, args.top_n, args.pa_max_tokens)
            out["perf_analyzer"] = perf_analyzer_checks(server, models, headers, data_dir, tmp)
    except Exception as e:  # noqa: BLE001 - report precisely, with the server's log
        out["error"] = f"{type(e).__name__}: {e}"[:4000]
        out["server_log_tail"] = server.log_tail(40)
        progress(f"[{name}] FAILED: {out['error'][:500]}")
    finally:
        if local is not None:
            local.close()
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=ROOT / "build" / "models" / "demo")
    ap.add_argument("--tiny", type=Path, default=ROOT / "build" / "models" / "tiny")
    ap.add_argument("--seq-queries", type=int, default=12, help="sequential queries, demo set")
    ap.add_argument("--tiny-queries", type=int, default=24, help="sequential queries, tiny set")
    ap.add_argument("--rounds", type=int, default=4, help="most throughput rounds (Triton c8 and in-process)")
    ap.add_argument("--clean-rounds", type=int, default=2, help="stop once this many rounds were clean")
    ap.add_argument("--max-other", type=float, default=0.10)
    ap.add_argument("--budget", type=float, default=1500.0, help="most seconds for the throughput rounds")
    ap.add_argument("--round-queries", type=int, default=16, help="questions per throughput round")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--top-n", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=None, help="default: the task policy's (256)")
    ap.add_argument("--perf-analyzer", action="store_true", help="also run perf_analyzer against rag")
    ap.add_argument("--pa-max-tokens", type=int, default=512, help="max_tokens in benchmarks/perf_data/rag.json")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--idle-fraction", type=float, default=0.3)
    ap.add_argument("--idle-wait", type=float, default=120.0)
    ap.add_argument("--start-wait", type=float, default=600.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: few queries, one short round")
    ap.add_argument("--out", type=Path, default=RESULTS / "rag.json")
    args = ap.parse_args()
    if args.quick:
        args.seq_queries, args.tiny_queries, args.rounds, args.round_queries, args.clean_rounds = 3, 3, 1, 8, 1
    IDLE.update(max_fraction=args.idle_fraction, max_wait=args.idle_wait)
    global CLEAN_ROUNDS, MAX_OTHER, BUDGET_S
    CLEAN_ROUNDS, MAX_OTHER, BUDGET_S = args.clean_rounds, args.max_other, args.budget

    questions = eval_questions()
    quiet = wait_idle(args.idle_fraction, args.start_wait)
    started = time.time()
    result = {"benchmark": "rag", "date": now_iso(), "machine": machine_info(TORCH_THREADS),
              "start_condition": quiet, "questions": f"data/retrieval_eval.json ({len(questions)} questions)",
              "request": {"task": "answer", "top_k": args.top_k, "top_n": args.top_n,
                          "max_tokens": args.max_tokens or "task policy default (config/runtime_policy.json)"}}
    with tempfile.TemporaryDirectory(prefix="ragbench-") as tmp:
        if not args.skip_demo:
            result["demo"] = run_profile("demo", args.demo, args, questions, True, Path(tmp))
        if not args.skip_tiny:
            result["tiny"] = run_profile("tiny", args.tiny, args, questions, False, Path(tmp))

    targets = {}
    demo_seq = result.get("demo", {}).get("sequential", {})
    if "usage_view" in demo_seq:
        targets["demo_overhead_fraction_usage_view"] = {
            **target(demo_seq["usage_view"]["overhead_fraction_of_e2e"], 0.10, "<"),
            "ms_per_request": demo_seq["usage_view"]["overhead_ms_per_request"]}
        targets["demo_overhead_fraction_triton_stats_view"] = {
            **target(demo_seq["triton_statistics_view"]["overhead_fraction_with_generate_stage"], 0.10, "<"),
            "ms_per_request": demo_seq["triton_statistics_view"]["overhead_ms_per_request_with_generate_stage"]}
    tiny_seq = result.get("tiny", {}).get("sequential", {})
    if "usage_view" in tiny_seq:
        targets["tiny_overhead_ms_per_request"] = {
            **target(tiny_seq["usage_view"]["overhead_ms_per_request"], 5.0, "<"),
            "target_note": "'a few ms' taken as under 5 ms",
            "fraction_of_e2e": tiny_seq["usage_view"]["overhead_fraction_of_e2e"],
            **{k: tiny_seq["usage_view"][k] for k in ("triton_floor_ms_per_request",
                                                      "overhead_above_floor_ms_per_request")
               if k in tiny_seq["usage_view"]}}
    tp = result.get("demo", {}).get("throughput")
    if tp:
        r = tp["ratio"]
        targets["rag_c8_vs_in_process_sequential"] = {
            **target(r["value"], 1.5), "basis": r["basis"], "all_rounds_ratio": r["all_rounds"]["ratio_of_totals"],
            "output_tokens_per_s_ratio": tp["output_tokens_ratio"]["value"]}
    result["targets"] = targets
    result["all_pass"] = bool(targets) and all(t["pass"] for t in targets.values())
    result["wall_s"] = round(time.time() - started, 1)
    write_json(args.out, result)
    for name, t in targets.items():
        progress(f"{name}: {t['value']} (target {t['target']}) {'PASS' if t['pass'] else 'FAIL'}")
    for prof in ("demo", "tiny"):
        if result.get(prof, {}).get("error"):
            progress(f"{prof}: ERROR {result[prof]['error'][:300]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
