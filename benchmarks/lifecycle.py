#!/usr/bin/env python3
"""What a request sees when its engine is cold, pre-warmed, or resident (model lifecycle, spec 001).

One run: this process starts one tritonserver (model_manager and the three reference engines) and drives the
RAG phases the way spec 001's sequential mode runs them, over the manager's lease protocol (the same ops a BLS
model uses, over HTTP): embed a batch of queries and search the corpus (CPU), rerank each query's candidates,
then generate. For each target engine X (rerank: phase 2; generate: phase 3) it measures the latency of one
request to X, from asking the manager for X to X's response:

* **cold**: X not loaded (co-resident mode, no pre-warm): the request waits for the whole load;
* **pre-warmed**: sequential mode; X not loaded when the previous phase starts: acquiring the previous phase's
  engine makes the manager start loading X, the previous phase runs (its batch on its engine, plus the CPU
  work: tokenisation and the search), then the request to X is made;
* **resident**: X loaded;
* **pre-warmed, cold start**: sequential mode, neither X nor the previous phase's engine loaded when the batch
  arrives (a batch pipeline whose last batch ended on another engine): acquiring the previous engine demands its
  load and pre-warms X. Measured twice, with the manager's ``parallel_loads`` at 2 (both loads run at once) and
  at 1 (X's load waits for the previous engine's): the ratio of the two is measured side by side in each run.

``hidden = (cold - prewarmed) / (cold - resident)``: the share of X's load time the request no longer sees
(target >= 0.8). The previous phase's duration with and without a concurrent load is reported too: on this
2-core CPU machine the load (a Python stub importing torch) competes with the phase for the CPU.

Then a whole batch (embed + search, rerank, one answer) from nothing loaded: its wall time in co-resident mode
(each phase waits for its own load), in sequential mode with parallel_loads 2 and 1, and with every engine
resident: the share of the three loads the batch does not wait for.

Writes results/lifecycle.json. Progress goes to stderr.

  .venv/bin/python benchmarks/lifecycle.py [--models demo|tiny] [--batches N ...] [--candidates 16] [--reps 2]
                                           [--pipeline-batches N ...]

The pre-warmed latency is measured after previous phases over batches of several sizes: the overlap a pre-warm
gets is the previous phase's duration, so the hidden share grows with it and reaches ~100 % once the phase
lasts as long as the load (and the warm-up the manager runs after it).
"""
from __future__ import annotations

import argparse
import json
import queue
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import admin_key  # noqa: E402
from common import RESULTS, ROOT, corpus_paragraphs, eval_questions, machine_info, now_iso, progress, \
    wait_idle, write_json  # noqa: E402

from ragstack.lifecycle.client import ManagerClient  # noqa: E402
from ragstack.server import TritonProcess  # noqa: E402

EMBED_CHUNK, RERANK_CHUNK = 32, 16
TARGET_HIDDEN = 0.8
# The previous phase of generate is the rerank of every query's candidates (long); of rerank, the embedding of
# the queries and the search (short): a batch of 64 queries still embeds in about a second.
DEFAULT_BATCHES = {"generate": [2, 8, 24], "rerank": [8, 64, 256, 1024]}
COLD_START_PARALLEL = (2, 1)


class Pipeline:
    """The RAG phases as a client runs them: every engine call inside a lease from the manager."""

    def __init__(self, server: TritonProcess, models: Path, max_tokens: int):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        from ragstack.chat import GeneratorTokenizer
        from ragstack.text import EmbedTokenizer, RerankTokenizer

        self.http = httpclient.InferenceServerClient(server.http_url, network_timeout=600, connection_timeout=600)
        self.grpc_url = server.grpc_url
        self._grpc = grpcclient
        self._httpc = httpclient
        self.mc = ManagerClient(server.http_url, api_key=admin_key())
        self.embed_tok = EmbedTokenizer(models / "embed")
        self.rerank_tok = RerankTokenizer(models / "rerank")
        self.gen_tok = GeneratorTokenizer(models / "generate")
        self.max_tokens = max_tokens
        self.docs = corpus_paragraphs()
        self.doc_vectors = None

    # --------------------------------------------------------------------------------------- engine calls
    def _infer(self, model, ids, mask, output, version):
        inputs = []
        for name, arr in (("input_ids", ids), ("attention_mask", mask)):
            t = self._httpc.InferInput(name, list(arr.shape), "INT32")
            t.set_data_from_numpy(arr.astype(np.int32))
            inputs.append(t)
        kwargs = {"model_version": str(version)} if version > 0 else {}
        return self.http.infer(model, inputs, **kwargs).as_numpy(output)

    def embed(self, texts, input_type):
        with self.mc.lease("embed") as lease:
            ids, mask, _ = self.embed_tok.encode(texts, input_type)
            return np.concatenate([self._infer("embed", ids[s:s + EMBED_CHUNK], mask[s:s + EMBED_CHUNK],
                                               "embedding", lease.version) for s in range(0, len(ids), EMBED_CHUNK)])

    def rerank(self, pairs):
        """pairs: [(query, [docs])] -> [[scores]] (the whole batch under one lease)."""
        with self.mc.lease("rerank") as lease:
            out = []
            for query, docs in pairs:
                ids, mask = self.rerank_tok.encode_pairs(query, docs)
                out.append(np.concatenate([self._infer("rerank", ids[s:s + RERANK_CHUNK], mask[s:s + RERANK_CHUNK],
                                                       "score", lease.version).reshape(-1)
                                           for s in range(0, len(ids), RERANK_CHUNK)]))
            return out

    def generate(self, prompt):
        from ragstack.trtllm_io import generate_inputs

        with self.mc.lease("generate") as lease:
            ids = self.gen_tok.prompt_ids(prompt)
            arrays = generate_inputs(ids, self.max_tokens, self.gen_tok.end_id, self.gen_tok.pad_id,
                                     return_perf_metrics=False)
            inputs = []
            for name, arr in arrays.items():
                dtype = "BYTES" if arr.dtype == object else {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                                                             np.dtype(np.bool_): "BOOL",
                                                             np.dtype(np.uint64): "UINT64"}[arr.dtype]
                t = self._grpc.InferInput(name, list(arr.shape), dtype)
                t.set_data_from_numpy(arr)
                inputs.append(t)
            responses = queue.Queue()
            client = self._grpc.InferenceServerClient(self.grpc_url)
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            try:
                client.async_stream_infer("generate", inputs, model_version=str(lease.version) if lease.version > 0
                                          else "", enable_empty_final_response=True)
                while True:
                    result, error = responses.get(timeout=600)
                    if error is not None:
                        raise error
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        return
            finally:
                client.stop_stream()
                client.close()

    # -------------------------------------------------------------------------------------------- phases
    def index_corpus(self):
        self.doc_vectors = self.embed(self.docs, "document")

    def phase_embed_search(self, queries, candidates):
        q = self.embed(queries, "query")
        top = np.argsort(-(q @ self.doc_vectors.T), axis=1)[:, :candidates]         # CPU: exact search
        return [(query, [self.docs[i] for i in row]) for query, row in zip(queries, top)]

    def phase_rerank(self, pairs):
        return self.rerank(pairs)

    def request(self, model, pairs, queries):
        """One request to ``model``: what the latency is measured on."""
        if model == "rerank":
            self.rerank(pairs[:1])
        elif model == "generate":
            self.generate(f"Answer from the context: {queries[0]}")
        else:
            self.embed(queries[:1], "query")

    # ---------------------------------------------------------------------------------------- lifecycle
    def unload(self, model):
        self.mc.call("unload", model)
        self.mc.wait_state(model, "unloaded", timeout_s=120)

    def ensure(self, model):
        with self.mc.lease(model):
            pass


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def timeline_hidden(transitions: list, model: str, asked: float):
    """The share of the target's load (+ the manager's warm-up) that was over before the request was made,
    from the manager's own transition log: ``(asked - load start) / (ready - load start)``, clamped."""
    loads = [x for x in transitions if x["model"] == model and x["action"] == "load"]
    if not loads:
        return None
    last = loads[-1]
    ready = last["t"]
    start = ready - last["seconds"] - (last.get("warmup_ms") or 0) / 1000.0
    if ready <= start:
        return None
    return round(max(0.0, min(1.0, (asked - start) / (ready - start))), 4)


def queries_for(n: int) -> list:
    """The labelled questions, repeated until there are at least ``n`` of them."""
    questions = eval_questions()
    return questions * -(-n // len(questions))


def clamped_median(values: list):
    """The median of the hidden fractions of a batch's runs, clamped to [0, 1] (None when there are none)."""
    return round(max(0.0, min(1.0, statistics.median(values))), 4) if values else None


def start_cold_sequential(p: Pipeline, models, parallel_loads: int) -> None:
    """``models`` unloaded, then sequential mode for a batch pipeline with ``parallel_loads`` loads at once."""
    p.mc.call("configure", payload={"parallel_loads": parallel_loads})
    p.mc.call("set_mode", payload={"mode": "co_resident"})
    for model in models:
        p.unload(model)
    p.mc.call("set_mode", payload={"mode": "sequential", "cyclic": False})


def measure_target(p: Pipeline, target: str, batches, candidates: int, reps: int) -> dict:
    """Latency of one request to ``target``: per batch size of the previous phase, cold, pre-warmed and resident
    measured back to back in each run (the machine is shared: a run's three see about the same background)."""
    previous = {"rerank": "embed", "generate": "rerank"}[target]
    queries_all = queries_for(max(max(batches), 4))
    small = queries_all[:4]
    small_pairs = p.phase_embed_search(small, candidates)
    p.mc.call("set_mode", payload={"mode": "co_resident"})
    p.ensure(previous)
    p.ensure(target)
    resident = [timed(p.request, target, small_pairs, small) for _ in range(5)]
    med_res = statistics.median(resident)
    progress(f"{target} resident {med_res * 1000:.0f} ms")
    by_batch = {}
    for n in batches:
        queries = queries_all[:n]
        pairs = p.phase_embed_search(queries, candidates)

        def previous_phase():
            if previous == "embed":
                p.phase_embed_search(queries, candidates)
            else:
                p.phase_rerank(pairs)

        p.mc.call("set_mode", payload={"mode": "co_resident"})
        p.ensure(previous)
        p.ensure(target)
        alone = [timed(previous_phase) for _ in range(max(1, reps - 1))]
        runs = []
        for rep in range(reps):
            wait_idle(0.35, 30)
            # cold: co-resident mode, nothing pre-warms the target
            p.mc.call("set_mode", payload={"mode": "co_resident"})
            p.ensure(previous)
            p.unload(target)
            cold = timed(p.request, target, small_pairs, small)
            cold_model = p.mc.model(target)
            # pre-warmed: sequential; acquiring the previous phase's engine starts the target's load
            p.ensure(previous)
            p.unload(target)
            p.mc.call("set_mode", payload={"mode": "sequential", "cyclic": False})   # a batch pipeline
            phase = timed(previous_phase)
            asked = p.mc.status()["clock_s"]                  # the manager's clock when the request is made
            pre = timed(p.request, target, small_pairs, small)
            pre_model = p.mc.model(target)
            covered = timeline_hidden(p.mc.status()["transitions"], target, asked)
            res = timed(p.request, target, small_pairs, small)   # resident, under the same background load
            hidden = (cold - pre) / (cold - res) if cold > res else None
            cold_start = {}
            for parallel in COLD_START_PARALLEL:
                # pre-warmed from a cold start: the previous engine unloaded too, its load demanded by the phase
                start_cold_sequential(p, (previous, target), parallel)
                cs_phase = timed(previous_phase)
                cs_asked = p.mc.status()["clock_s"]
                cs_pre = timed(p.request, target, small_pairs, small)
                cs_model = p.mc.model(target)
                cs_hidden = (cold - cs_pre) / (cold - res) if cold > res else None
                cold_start[f"parallel_loads_{parallel}"] = {
                    "prewarmed_s": round(cs_pre, 4), "previous_phase_s": round(cs_phase, 3),
                    "previous_load_s": round(p.mc.model(previous)["load_seconds"], 3),
                    "prewarm_load_s": round(cs_model["load_seconds"], 3),
                    "hidden_fraction": None if cs_hidden is None else round(cs_hidden, 4),
                    "hidden_fraction_timeline": timeline_hidden(p.mc.status()["transitions"], target, cs_asked)}
            p.mc.call("configure", payload={"parallel_loads": COLD_START_PARALLEL[0]})
            runs.append({"cold_s": round(cold, 4), "prewarmed_s": round(pre, 4), "resident_s": round(res, 4),
                         "previous_phase_s": round(phase, 3),
                         "cold_load_s": round(cold_model["load_seconds"], 3),
                         "cold_warmup_ms": cold_model["warmup_ms"],
                         "prewarm_load_s": round(pre_model["load_seconds"], 3),
                         "prewarm_warmup_ms": pre_model["warmup_ms"],
                         "hidden_fraction": None if hidden is None else round(hidden, 4),
                         "hidden_fraction_timeline": covered, "cold_start": cold_start})
            progress(f"{target}, {n}-query {previous} phase of {phase:.2f} s: cold {cold:.2f} s (load "
                     f"{cold_model['load_seconds']:.2f} s), pre-warmed {pre:.2f} s (load "
                     f"{pre_model['load_seconds']:.2f} s): hidden {hidden if hidden is None else round(hidden, 3)}; "
                     "cold start: " + ", ".join(f"{k} {v['prewarmed_s']:.2f} s (hidden {v['hidden_fraction']})"
                                                for k, v in cold_start.items()))
        med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
        covered = [r["hidden_fraction_timeline"] for r in runs if r["hidden_fraction_timeline"] is not None]
        hidden = clamped_median([r["hidden_fraction"] for r in runs if r["hidden_fraction"] is not None])
        cold_start = {}
        for key in (f"parallel_loads_{n}" for n in COLD_START_PARALLEL):
            cs = [r["cold_start"][key] for r in runs]
            cs_hidden = [c["hidden_fraction"] for c in cs if c["hidden_fraction"] is not None]
            cs_timeline = [c["hidden_fraction_timeline"] for c in cs if c["hidden_fraction_timeline"] is not None]
            cold_start[key] = {
                "prewarmed_latency_s": round(statistics.median(c["prewarmed_s"] for c in cs), 4),
                "previous_phase_s": round(statistics.median(c["previous_phase_s"] for c in cs), 3),
                "hidden_fraction": clamped_median(cs_hidden),
                "hidden_fraction_timeline": round(statistics.median(cs_timeline), 4) if cs_timeline else None}
        par, ser = (cold_start[f"parallel_loads_{n}"]["prewarmed_latency_s"] for n in COLD_START_PARALLEL)
        cold_start["serial_over_parallel_latency"] = round(ser / par, 3) if par > 0 else None
        by_batch[str(n)] = {
            "queries": n, "previous_phase_work": (f"{n * candidates} (query, document) pairs" if previous == "rerank"
                                                  else f"{n} queries embedded + exact search"),
            "cold_latency_s": round(med("cold_s"), 4), "prewarmed_latency_s": round(med("prewarmed_s"), 4),
            "resident_latency_s": round(med("resident_s"), 4),
            "previous_phase_s": {"alone": [round(x, 3) for x in alone],
                                 "with_prewarm": round(med("previous_phase_s"), 3)},
            "load_s": round(med("cold_load_s"), 3),
            "hidden_fraction": hidden,
            "hidden_fraction_timeline": round(statistics.median(covered), 4) if covered else None,
            "cold_start": cold_start,
            "runs": runs,
        }
        progress(f"{target}, {n}-query batch: hidden {by_batch[str(n)]['hidden_fraction']}; cold start: hidden "
                 + ", ".join(f"{k} {v['hidden_fraction']}" for k, v in cold_start.items() if isinstance(v, dict)))
    p.mc.call("set_mode", payload={"mode": "co_resident"})
    return {
        "previous_phase": previous,
        "request": {"rerank": f"one query x {candidates} candidates",
                    "generate": f"one prompt, {p.max_tokens} new tokens"}[target],
        "resident_latency_s": {"median": round(med_res, 4), "runs": [round(x, 4) for x in resident]},
        "by_batch": by_batch,
    }


PIPELINE_CASES = ("resident", "cold", "sequential_parallel_loads_2", "sequential_parallel_loads_1")


def measure_pipeline(p: Pipeline, batches, candidates: int, reps: int) -> dict:
    """A whole batch through the three phases (embed + search n queries, rerank their candidates, answer one
    prompt), its wall time from the batch's arrival, in four cases measured back to back in each run:
    every engine resident; every engine unloaded in co-resident mode (each phase waits for its own load); and
    every engine unloaded in sequential mode (each phase pre-warms the next) with parallel_loads 2 and 1.
    ``hidden`` = (cold - sequential) / (cold - resident): the share of the three loads the batch does not wait for."""
    queries_all = queries_for(max(batches))
    by_batch = {}
    for n in batches:
        queries = queries_all[:n]
        pairs = p.phase_embed_search(queries, candidates)
        runs = []
        for _ in range(reps):
            wait_idle(0.35, 30)
            run = {}
            for case in PIPELINE_CASES:
                engines = ("embed", "rerank", "generate")
                if case.startswith("sequential"):
                    start_cold_sequential(p, engines, int(case.rsplit("_", 1)[1]))
                else:
                    p.mc.call("set_mode", payload={"mode": "co_resident"})
                    for model in engines:
                        if case == "resident":
                            p.ensure(model)
                        else:
                            p.unload(model)
                stages = {"embed_search_s": timed(p.phase_embed_search, queries, candidates),
                          "rerank_s": timed(p.phase_rerank, pairs),
                          "generate_s": timed(p.generate, f"Answer from the context: {queries[0]}")}
                run[case] = {k: round(v, 3) for k, v in stages.items()}
                run[case]["total_s"] = round(sum(stages.values()), 3)
            p.mc.call("configure", payload={"parallel_loads": COLD_START_PARALLEL[0]})
            for case in PIPELINE_CASES[2:]:
                cold, res, seq = (run[c]["total_s"] for c in ("cold", "resident", case))
                run[case]["hidden_fraction"] = round((cold - seq) / (cold - res), 4) if cold > res else None
            runs.append(run)
            progress(f"pipeline, {n} queries: " + ", ".join(f"{c} {run[c]['total_s']:.1f} s" for c in PIPELINE_CASES)
                     + "; hidden " + ", ".join(f"{c[-1]} loads at once {run[c]['hidden_fraction']}"
                                               for c in PIPELINE_CASES[2:]))
        med = {c: {k: round(statistics.median(r[c][k] for r in runs), 3) for k in runs[0][c]
                   if k != "hidden_fraction"} for c in PIPELINE_CASES}
        for c in PIPELINE_CASES[2:]:
            med[c]["hidden_fraction"] = clamped_median([r[c]["hidden_fraction"] for r in runs
                                                        if r[c]["hidden_fraction"] is not None])
        by_batch[str(n)] = {"queries": n, "pairs_reranked": n * candidates, "median": med,
                            "parallel_over_serial_speedup": round(med[PIPELINE_CASES[3]]["total_s"]
                                                                  / med[PIPELINE_CASES[2]]["total_s"], 3),
                            "runs": runs}
    p.mc.call("set_mode", payload={"mode": "co_resident"})
    return {"cases": list(PIPELINE_CASES), "by_batch": by_batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=("demo", "tiny"), default="demo")
    ap.add_argument("--batches", type=int, nargs="+",
                    help="queries in the batch the previous phase works on, one pre-warmed measurement each "
                         f"(default per target: {DEFAULT_BATCHES})")
    ap.add_argument("--candidates", type=int, default=16, help="search results reranked per query")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["rerank", "generate"])
    ap.add_argument("--pipeline-batches", type=int, nargs="*", default=[8, 64],
                    help="queries per batch of the whole-pipeline measurement (none: skip it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "lifecycle.json")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # so that the server is stopped on the way out
    models = ROOT / "build" / "models" / args.models
    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    server = TritonProcess(models, load_models="model_manager embed rerank generate",
                           log_path=ROOT / "build" / "logs" / "bench-lifecycle.log",
                           env={"RAG_DATA_PATH": str(work), "RAGSTACK_EVENT_LOG": str(work / "events.jsonl"),
                                "RAG_DIRECT_MODELS": "*"})   # it measures the engines directly
    progress(f"starting tritonserver on the {args.models} models")
    server.start()
    started = now_iso()
    try:
        p = Pipeline(server, models, args.max_tokens)
        p.mc.wait(lambda s: all(m["state"] == "ready" for m in s["models"].values()), timeout_s=300)
        p.mc.call("configure", payload={"budget_bytes": 64 << 30, "cooldown_s": 0})
        p.index_corpus()
        results = {t: measure_target(p, t, args.batches or DEFAULT_BATCHES[t], args.candidates, args.reps)
                   for t in args.targets}
        pipeline = (measure_pipeline(p, args.pipeline_batches, args.candidates, args.reps)
                    if args.pipeline_batches else None)
        status = p.mc.status()
    finally:
        server.stop()
    summary = {"target": TARGET_HIDDEN, "hidden_fraction": {}, "previous_phase_s": {}, "load_s": {},
               "smallest_batch_meeting_target": {}}
    for t, r in results.items():
        batches = r["by_batch"]
        summary["hidden_fraction"][t] = {n: b["hidden_fraction"] for n, b in batches.items()}
        summary.setdefault("hidden_fraction_timeline", {})[t] = {n: b["hidden_fraction_timeline"]
                                                                  for n, b in batches.items()}
        summary["previous_phase_s"][t] = {n: b["previous_phase_s"]["with_prewarm"] for n, b in batches.items()}
        for key in (f"parallel_loads_{n}" for n in COLD_START_PARALLEL):
            summary.setdefault(f"hidden_fraction_cold_start_{key}", {})[t] = {
                n: b["cold_start"][key]["hidden_fraction"] for n, b in batches.items()}
        summary["load_s"][t] = {n: b["load_s"] for n, b in batches.items()}
        met = [int(n) for n, b in batches.items() if b["hidden_fraction"] is not None
               and b["hidden_fraction"] >= TARGET_HIDDEN]
        summary["smallest_batch_meeting_target"][t] = min(met) if met else None
        key = f"parallel_loads_{COLD_START_PARALLEL[0]}"
        met = [int(n) for n, b in batches.items() if b["cold_start"][key]["hidden_fraction"] is not None
               and b["cold_start"][key]["hidden_fraction"] >= TARGET_HIDDEN]
        summary.setdefault(f"smallest_batch_meeting_target_cold_start_{key}", {})[t] = min(met) if met else None
    out = {
        "benchmark": "lifecycle",
        "started": started,
        "machine": machine_info(),
        "models": args.models,
        "model_set": str(models.relative_to(ROOT)),
        "setup": {"batches": {t: args.batches or DEFAULT_BATCHES[t] for t in args.targets},
                  "pipeline_batches": args.pipeline_batches,
                  "candidates_per_query": args.candidates, "reps": args.reps,
                  "generate_max_tokens": args.max_tokens, "corpus_paragraphs": len(p.docs),
                  "protocol": "manager lease ops over HTTP; embed/rerank over HTTP, generate over a gRPC stream"},
        "definitions": {
            "cold": "co_resident mode, the engine unloaded: the request waits for its load",
            "prewarmed": "sequential mode, the engine unloaded when the previous phase's engine is acquired; "
                         "the previous phase (its batch + CPU tokenisation/search) runs, then the request",
            "resident": "the engine loaded",
            "hidden_fraction": "median over runs of (cold - prewarmed) / (cold - resident), each run measuring "
                               "the three back to back (the machine is shared), clamped to [0, 1]",
            "hidden_fraction_timeline": "from the manager's transition log: the share of the load + warm-up that "
                                        "was over when the request was made (median over runs); insensitive to "
                                        "the background load of the shared machine",
            "cold_start": "sequential mode, the previous phase's engine unloaded too: the phase demands its load, "
                          "which pre-warms the target; with parallel_loads 2 the two loads run together, with 1 "
                          "the target's load waits; hidden_fraction as above, against the same run's cold and "
                          "resident latencies",
        },
        "targets": results,
        "pipeline": pipeline,
        "footprints_bytes": {m: v["footprint_bytes"] for m, v in status["models"].items()},
        "summary": summary,
    }
    if pipeline is not None:
        summary["pipeline_hidden_fraction"] = {c: {n: b["median"][c]["hidden_fraction"]
                                                   for n, b in pipeline["by_batch"].items()}
                                               for c in PIPELINE_CASES[2:]}
        summary["pipeline_total_s"] = {c: {n: b["median"][c]["total_s"] for n, b in pipeline["by_batch"].items()}
                                       for c in PIPELINE_CASES}
    write_json(args.out, out)
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
