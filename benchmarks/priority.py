#!/usr/bin/env python3
"""Urgent queries during a bulk ingest, with and without priorities → results/priority.json + .png (issue 19).

One run, side by side, on the tiny reference models (one private server per configuration, each on its own data
folder and runtime policy):

* (a) ``alone``: `rag` queries at a steady open-loop rate, nothing else running;
* (b) ``no_priorities``: the same queries during a bulk ingest of the corpus repeated to >= --min-chunks chunks,
  with the ingest at the urgent level and no yielding (policy: ingest_priority urgent, background_max_yield_ms 0):
  every request equal, as before issue 19;
* (c0) ``levels_only``: ingest at the background level (Triton priority queues, children at their level) but no
  yielding, to tell the two mechanisms apart;
* (c) ``priorities``: the committed policy: background ingest that also yields to urgent requests in flight.

Each configuration measures its own (a) first, on the same server. Reported: query latency p50/p99 per phase,
the ingest's throughput (chunks/s) and how long it yielded, the engines' request counts by level, and the target
(c)'s p99 within 1.5x of (a)'s. With about 30 queries per phase a p99 is close to the maximum: read it as that.

Adaptive batching: during (c) the controller (ragstack/governance/adaptive.py) runs in dry run on the server's own
metrics, and after (c) one setting change is applied for real (an `embed` reload with a config override), to
set what a change costs against what batching buys on this CPU (results/engines.json).

Scaled for a shared 2-core machine: tiny models, one query every --interval seconds (the default leaves the cores
~half idle when alone), the ingest as sequential requests of one corpus copy each.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import pyplot, save_figure  # noqa: E402
from benchmarks.common import (RESULTS, admin_key, display_path, eval_questions, key_headers,  # noqa: E402
                               latency_summary, machine_info, now_iso, progress, tree_cpu_seconds, write_json)
from ragstack.contracts import client as client_io  # noqa: E402
from ragstack.governance.adaptive import LADDERS, Controller, Sample, buckets, config_override, histogram_p95, \
    parse_prometheus, value  # noqa: E402
from ragstack.governance.manifest import read_manifest  # noqa: E402
from ragstack_dev.model_builders import build_tiny, is_built  # noqa: E402
from ragstack_dev.server import ROOT, TritonProcess  # noqa: E402

CORPUS = sorted((ROOT / "data" / "corpus").glob("*.md"))
POLICY = ROOT / "config" / "runtime_policy.json"
CONFIGS = {
    "no_priorities": {"ingest_priority": "urgent", "background_max_yield_ms": 0},
    "levels_only": {"ingest_priority": "background", "background_max_yield_ms": 0},
    "priorities": {},
}


class Client:
    """gRPC (its client is thread-safe; tritonclient.http is gevent-based and must not be shared by threads)."""

    def __init__(self, url: str, headers: dict):
        import tritonclient.grpc as grpcclient

        self.mod = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.headers = {k.lower(): v for k, v in headers.items()}

    def query(self, question: str) -> dict:
        inputs = client_io.infer_inputs(self.mod, "rag", {"query": question, "collection": "corpus", "top_k": 8,
                                                          "top_n": 3})
        result = self.client.infer("rag", inputs, headers=dict(self.headers), client_timeout=600)
        return client_io.output_json(result, "usage")

    def ingest(self, doc_ids, texts, collection: str) -> dict:
        inputs = client_io.infer_inputs(self.mod, "ingest", {"doc_ids": doc_ids, "texts": texts,
                                                             "collection": collection})
        result = self.client.infer("ingest", inputs, client_timeout=1800,
                                   headers={k.lower(): v for k, v in key_headers().items()})   # a writer operation
        return client_io.output_json(result, "report")


def open_loop(client: Client, questions: list, interval: float, stop: callable, max_queries: int,
              max_in_flight: int = 2) -> list:
    """Fire one query every ``interval`` s (each on its own thread) until ``stop()`` or ``max_queries``, with at
    most ``max_in_flight`` outstanding (on an overloaded machine the rate then drops instead of a backlog growing
    without end; seen at load 40 on 2 cores: 440 queries queued behind an 11-minute ingest). Returns
    [(start offset s, latency s or None, usage or error)] of every query fired."""
    out, lock = [], threading.Lock()
    slots = threading.Semaphore(max_in_flight)
    t0 = time.perf_counter()

    def one(i, start):
        try:
            usage = client.query(questions[i % len(questions)])
            lat, info = time.perf_counter() - start, usage
        except Exception as e:  # noqa: BLE001 - a failed query is reported, not fatal
            lat, info = None, str(e)[:300]
        with lock:
            out.append((start - t0, lat, info))
        slots.release()

    with cf.ThreadPoolExecutor(max_workers=32) as pool:
        i = 0
        while i < max_queries and not stop():
            start = t0 + i * interval
            delay = start - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            slots.acquire()
            pool.submit(one, i, time.perf_counter())
            i += 1
    return sorted(out, key=lambda x: x[0])


def summary(runs: list) -> dict:
    ok = [lat for _, lat, _ in runs if lat is not None]
    failed = [info for _, lat, info in runs if lat is None]
    return {"latency_ms": latency_summary(ok), "queries": len(runs), "failed": len(failed), "errors": failed[:3],
            "priority_seen": sorted({u.get("priority") for _, lat, u in runs if lat is not None})}


def scrape(url: str) -> list:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_prometheus(r.read().decode())


def engine_levels(samples: list) -> dict:
    return {f"{lab['model']}/{lab['priority']}": v for n, lab, v in samples if n == "llm_engine_requests"}


def measure(name: str, overrides: dict, models: Path, args, work: Path, headers: dict) -> dict:
    policy = json.loads(POLICY.read_text())
    policy.update(overrides)
    policy_path = work / f"policy-{name}.json"
    policy_path.write_text(json.dumps(policy))
    data = work / name
    data.mkdir()
    server = TritonProcess(models, log_path=ROOT / "build" / "logs" / f"bench-priority-{name}.log",
                           env={"RAG_DATA_PATH": str(data), "RAG_POLICY_FILE": str(policy_path)})
    progress(f"{name}: starting a server ({json.dumps(overrides) or 'committed policy'})")
    server.start(timeout=600)
    try:
        client = Client(server.grpc_url, headers)
        setup = _retry_unavailable(lambda: client.ingest([p.stem for p in CORPUS], [p.read_text() for p in CORPUS],
                                                         "corpus"))
        per_copy = sum(d["chunks"] for d in setup["documents"])
        copies = math.ceil(args.min_chunks / per_copy)
        questions = eval_questions()
        for q in questions[:3]:                                   # warm-up
            client.query(q)

        progress(f"{name}: (a) {args.queries} queries alone, one every {args.interval}s")
        alone = open_loop(client, questions, args.interval, lambda: False, args.queries, args.max_in_flight)

        progress(f"{name}: (b/c) queries during an ingest of {copies} corpus copies ({copies * per_copy} chunks)")
        before = scrape(server.metrics_url)
        done = threading.Event()
        ingest_out = {}
        decisions, samples_seen = [], []

        def bulk():
            t0, reports = time.perf_counter(), []
            try:
                for c in range(copies):
                    reports.append(client.ingest([f"{p.stem}-copy{c}" for p in CORPUS],
                                                 [p.read_text() for p in CORPUS], "bulk"))
                ingest_out.update(ok=True)
            except Exception as e:  # noqa: BLE001
                ingest_out.update(ok=False, error=str(e)[:300])
            finally:
                ingest_out["seconds"] = time.perf_counter() - t0
                ingest_out["reports"] = reports
                done.set()

        def adaptive_dry_run():
            ctl = Controller("embed", LADDERS["embed"], p95_target_ms=args.p95_target_ms, cooldown_s=5.0)
            prev = buckets(scrape(server.metrics_url), "llm_stage_latency_us", stage="embed")
            while not done.wait(1.0):
                s = scrape(server.metrics_url)
                now = buckets(s, "llm_stage_latency_us", stage="embed")
                p95 = histogram_p95(prev, now)
                prev = now
                budget, room = value(s, "llm_memory_budget_bytes"), value(s, "llm_memory_headroom_bytes")
                sample = Sample(value(s, "nv_inference_pending_request_count", model="embed") or 0.0,
                                None if p95 is None else p95 / 1000.0,
                                room / budget if budget and room is not None else None)
                samples_seen.append(dataclass_dict(sample))
                event = ctl.observe(sample)
                if event:
                    decisions.append(event)

        ingest_thread = threading.Thread(target=bulk, daemon=True)
        watcher = threading.Thread(target=adaptive_dry_run, daemon=True) if name == "priorities" else None
        cpu0 = tree_cpu_seconds(server.proc.pid)
        ingest_thread.start()
        if watcher:
            watcher.start()
        during = open_loop(client, questions, args.interval, done.is_set, 10_000, args.max_in_flight)
        ingest_thread.join()
        if watcher:
            watcher.join(5)
        cpu_during = tree_cpu_seconds(server.proc.pid) - cpu0
        after = scrape(server.metrics_url)
        reports = ingest_out.get("reports", [])
        chunks = sum(d["chunks"] for r in reports for d in r["documents"])
        lv0, lv1 = engine_levels(before), engine_levels(after)
        result = {
            "policy_overrides": overrides,
            "alone": summary(alone),
            "during_ingest": summary(during),
            "ingest": {"ok": ingest_out.get("ok"), "error": ingest_out.get("error"), "requests": len(reports),
                       "chunks": chunks, "seconds": round(ingest_out["seconds"], 2),
                       "chunks_per_s": round(chunks / ingest_out["seconds"], 1) if ingest_out["seconds"] else None,
                       "priority": sorted({r.get("priority") for r in reports}),
                       "yielded_s": round(sum(r.get("yielded_s", 0) for r in reports), 2),
                       "embed_calls": sum(r.get("embed_calls", 0) for r in reports)},
            "server_cpu_s_during_ingest": round(cpu_during, 1),
            "engine_requests_by_level_during_ingest": {k: v - lv0.get(k, 0) for k, v in lv1.items()
                                                       if v - lv0.get(k, 0)},
        }
        a, d = result["alone"]["latency_ms"], result["during_ingest"]["latency_ms"]
        if a and d:
            result["p99_during_over_alone"] = round(d["p99"] / a["p99"], 3)
            result["p50_during_over_alone"] = round(d["p50"] / a["p50"], 3)
        if name == "priorities":
            result["adaptive_dry_run"] = {"samples": len(samples_seen), "decisions": decisions,
                                          "last_samples": samples_seen[-5:]}
            result["adaptive_reload"] = reload_cost(server, args)
        return result
    finally:
        server.stop()


def _retry_unavailable(fn, attempts: int = 20, wait_s: float = 3.0):
    """The first request right after readiness can meet the lifecycle manager before its gRPC channel to the
    server is up (seen: 503 "engine 'embed' cannot be loaded ... Connection refused"): retry that, only that."""
    from tritonclient.utils import InferenceServerException

    for attempt in range(attempts):
        try:
            return fn()
        except InferenceServerException as e:
            if attempt == attempts - 1 or "UNAVAILABLE" not in str(e.status()):
                raise
            progress(f"setup request unavailable ({str(e)[:120]}); retrying")
            time.sleep(wait_s)


def dataclass_dict(sample) -> dict:
    return {"queue_depth": sample.queue_depth, "p95_ms": sample.p95_ms,
            "headroom": None if sample.headroom is None else round(sample.headroom, 3)}


def reload_cost(server: TritonProcess, args) -> dict:
    """What one adaptive change costs: `embed` reloaded with the next rung's batching (wall time, server CPU)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        admin = {"triton-grpc-protocol-admin-key": admin_key()}          # Triton's restricted gRPC protocols
        cfg = client.get_model_config("embed", as_json=True, headers=admin)["config"]
        cpu0, t0 = tree_cpu_seconds(server.proc.pid), time.perf_counter()
        client.load_model("embed", config=json.dumps(config_override(cfg, LADDERS["embed"][1])), headers=admin)
        wall = time.perf_counter() - t0
        cpu = tree_cpu_seconds(server.proc.pid) - cpu0
        new = client.get_model_config("embed", as_json=True, headers=admin)["config"]["dynamic_batching"]
        return {"wall_s": round(wall, 2), "server_cpu_s": round(cpu, 2),
                "preferred_batch_size_after": new.get("preferred_batch_size"),
                "priority_levels_kept": new.get("priority_levels")}
    except Exception as e:  # noqa: BLE001 - reported, the other figures stand
        return {"error": str(e)[:300]}
    finally:
        client.close()


def batching_gain() -> dict:
    """What batching itself buys on this CPU, from results/engines.json (in-process, batch 16 vs 1)."""
    try:
        e = json.loads((RESULTS / "engines.json").read_text())["embed"]["texts_per_s_all_rounds"]
        return {"source": "results/engines.json embed.texts_per_s_all_rounds",
                "in_process_batch16_per_s": e["in_process_batched"], "in_process_batch1_per_s": e["in_process_batch1"],
                "ratio": round(e["in_process_batched"] / e["in_process_batch1"], 2),
                "clean_rounds_ratio_in_results_readme": 1.14}
    except (OSError, KeyError, ValueError):
        return {}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(result["configs"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1.3]})
    labels, p50, p99 = [], [], []
    for n in names:
        for phase in ("alone", "during_ingest"):
            lat = result["configs"][n][phase]["latency_ms"]
            labels.append(f"{n}\n{'alone' if phase == 'alone' else 'during ingest'}")
            p50.append(lat.get("p50", 0))
            p99.append(lat.get("p99", 0))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("rag latency (ms)")
    ax.set_title("rag query latency, alone vs during a bulk ingest")
    ax.legend()
    ax2.bar(names, [result["configs"][n]["ingest"]["chunks_per_s"] or 0 for n in names], color="gray")
    ax2.set_ylabel("ingest chunks/s")
    ax2.set_title("ingest throughput")
    ax2.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=1.5, help="seconds between queries (open loop)")
    ap.add_argument("--queries", type=int, default=30, help="queries in each 'alone' phase")
    ap.add_argument("--min-chunks", type=int, default=2000, help="the bulk ingest's size")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--max-in-flight", type=int, default=2, help="outstanding queries at most")
    ap.add_argument("--p95-target-ms", type=float, default=100.0, help="the adaptive dry run's embed target")
    ap.add_argument("--out", type=Path, default=RESULTS / "priority.json")
    args = ap.parse_args()

    models = ROOT / "build" / "models" / "tiny"
    if not is_built(models):
        build_tiny(models)
    headers = read_manifest(models / "generate").headers()
    t0 = time.time()
    result = {"benchmark": "priority", "date": now_iso(), "machine": machine_info(),
              "method": __doc__.split("\n\n")[1:4],
              "settings": {"models": "build/models/tiny", "interval_s": args.interval, "queries_alone": args.queries,
                           "min_chunks": args.min_chunks, "max_in_flight": args.max_in_flight,
                           "load_avg_at_start": list(__import__("os").getloadavg()), "request": {"task": "answer", "top_k": 8, "top_n": 3}},
              "configs": {}}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-priority-") as tmp:
        for name in [c for c in args.configs.split(",") if c]:
            result["configs"][name] = measure(name, CONFIGS[name], models, args, Path(tmp), headers)
            write_json(args.out, result)                             # partial results survive a crash
    cfg = result["configs"]
    if "priorities" in cfg:
        c = cfg["priorities"]
        ratio = c.get("p99_during_over_alone")
        result["target_p99_within_1_5x"] = {"value": ratio, "target": "<= 1.5",
                                            "pass": bool(ratio is not None and ratio <= 1.5),
                                            "ingest_finished": bool(c["ingest"]["ok"])}
        result["adaptive"] = {"batching_gain": batching_gain(), "reload": c.get("adaptive_reload"),
                              "dry_run_decisions": len(c.get("adaptive_dry_run", {}).get("decisions", []))}
    result["wall_s"] = round(time.time() - t0, 1)
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    progress(f"wrote {display_path(args.out)}")
    for name, c in cfg.items():
        progress(f"{name}: alone p50/p99 {c['alone']['latency_ms'].get('p50')}/{c['alone']['latency_ms'].get('p99')} "
                 f"ms; during p50/p99 {c['during_ingest']['latency_ms'].get('p50')}/"
                 f"{c['during_ingest']['latency_ms'].get('p99')} ms; ingest {c['ingest']['chunks']} chunks "
                 f"{c['ingest']['chunks_per_s']}/s, yielded {c['ingest']['yielded_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
