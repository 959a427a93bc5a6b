#!/usr/bin/env python3
"""A batch of N queries through `rag` under four lifecycle configurations (issue 12).

What a user of the stack sees: the batch is N `rag` requests sent at once (gRPC, asynchronous; at most --window
outstanding, as `rag`'s queue policy refuses more than 64 waiting urgent requests) to one
tritonserver (the reference engines, `rag`, `ingest`, `vector_index`, `model_manager`). Every engine call of the
pipeline runs under a lease from `model_manager`, so the manager loads, pre-warms and retires the engines the
requests ask for. Measured for each batch size N (default 8, 64, 256), one case after the other:

* **resident**: co-resident mode, every engine loaded before the batch (no load at all: the baseline);
* **co_resident_cold**: co-resident mode under a budget that holds the three engines, none loaded when the
  batch arrives: each engine loads at its first request and stays;
* **sequential_two**: sequential mode under a budget that holds two engines (the phase in use and the
  next one, pre-warmed), none loaded when the batch arrives;
* **sequential_one**: sequential mode under a budget that holds one engine at a time, none loaded when the batch
  arrives: each phase switch retires an engine and loads the next (no pre-warm possible).

For each: the batch's wall time (first request sent to last answer), the requests served and failed, the loads
the manager made during the batch (from its transition log: how many, why — demand or pre-warm — and their
seconds, load plus warm-up), the evictions, and the share of the load time the batch did not wait for:

    hidden = 1 - (wall - wall_resident) / load_seconds        (clamped to [0, 1]; the raw value is kept too)

`wall - wall_resident` is what the loads (and the phase switching) cost the batch; `load_seconds` is what they
took. The runtime policy is the project's with abstention off, so that every request runs the three phases
(the tiny models' random reranker would make some answers abstain without generating).

Writes results/lifecycle.json and results/lifecycle.png. Progress goes to stderr.

  .venv/bin/python benchmarks/lifecycle.py [--models tiny|demo] [--batches 8 64 256] [--max-tokens 16]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import admin_key, pyplot, save_figure  # noqa: E402
from common import RESULTS, ROOT, eval_questions, machine_info, now_iso, progress, wait_idle, write_json  # noqa: E402

from ragstack.lifecycle.client import ManagerClient  # noqa: E402
from ragstack.contracts import client as client_io  # noqa: E402
from ragstack.governance.manifest import read_manifest  # noqa: E402
from ragstack_dev.server import TritonProcess  # noqa: E402

ENGINES = ("embed", "rerank", "generate")
CASES = ("resident", "co_resident_cold", "sequential_two", "sequential_one")


def policy_without_abstention(work: Path) -> Path:
    policy = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    for task in policy["tasks"].values():
        task.pop("abstain_below_rerank", None)
    path = work / "policy.json"
    path.write_text(json.dumps(policy, indent=2))
    return path


def queries_for(n: int) -> list:
    """The labelled questions, numbered and repeated until there are ``n`` of them."""
    questions = eval_questions()
    return [f"{questions[i % len(questions)]} ({i})" for i in range(n)]


class Rag:
    """N `rag` requests at once over one gRPC client; every answer (or error) is recorded."""

    def __init__(self, url: str, headers: dict, max_tokens: int):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.max_tokens = max_tokens

    def _inputs(self, query: str):
        return client_io.infer_inputs(self.grpc, "rag", {"query": query, "top_k": 4, "top_n": 2,
                                                         "max_tokens": self.max_tokens, "collection": "corpus"})

    def batch(self, queries: list, timeout_s: float, window: int) -> dict:
        """Send ``queries`` with at most ``window`` outstanding (the rest follow as answers come back)."""
        done = threading.Event()
        lock = threading.Lock()
        slots = threading.Semaphore(window)
        results = []
        t0 = time.perf_counter()

        def callback(result, error):
            slots.release()
            with lock:
                results.append((time.perf_counter() - t0, error))
                if len(results) == len(queries):
                    done.set()
        for q in queries:
            if not slots.acquire(timeout=timeout_s):
                raise TimeoutError(f"no answer came back within {timeout_s}s with {window} outstanding")
            self.client.async_infer("rag", self._inputs(q), callback, headers=dict(self.headers),
                                    client_timeout=timeout_s)
        if not done.wait(timeout_s + 30):
            raise TimeoutError(f"{len(queries) - len(results)} of {len(queries)} requests unanswered")
        errors = {}
        for _, e in results:
            if e is not None:
                key = f"{e.status()}: {str(e.message())[:120]}"
                errors[key] = errors.get(key, 0) + 1
        return {"wall_s": round(max(t for t, _ in results), 3), "ok": sum(e is None for _, e in results),
                "failed": sum(e is not None for _, e in results), "errors": errors,
                "latency_p50_s": round(float(np.median([t for t, _ in results])), 3)}

    def close(self):
        self.client.close()


def footprints(mc) -> dict:
    return {m: mc.model(m)["footprint_bytes"] for m in ENGINES}


def budget_for(fp: dict, engines: int, buffer: float = 0.15) -> int:
    """A budget whose high-watermark holds ``engines`` of the engines (the largest ones) and never one more."""
    sizes = sorted(fp.values())
    fits = sum(sizes[-engines:])
    never = sum(sizes[:engines + 1]) if engines < len(sizes) else 10 * fits
    watermark = min(int(fits * 1.25), int(never * 0.95))
    if watermark <= fits:
        raise RuntimeError(f"the engines' footprints {fp} leave no budget for exactly {engines} of them")
    return int(watermark / (1 - buffer)) + 1


def prepare(mc, case: str, fp: dict) -> None:
    """Mode and budget of ``case``; every engine loaded (resident) or unloaded (the others)."""
    mc.call("set_mode", payload={"mode": "co_resident"})
    mc.call("configure", payload={"budget_bytes": 64 << 30, "safety_buffer": 0.15, "cooldown_s": 0})
    if case == "resident":
        for m in ENGINES:
            mc.call("prewarm", m)
        mc.wait(lambda s: all(s["models"][m]["state"] == "ready" for m in ENGINES), timeout_s=300)
        return
    for m in ENGINES:
        mc.call("unload", m)
    mc.wait(lambda s: all(s["models"][m]["state"] == "unloaded" for m in ENGINES), timeout_s=300)
    if case.startswith("sequential"):
        engines = 1 if case == "sequential_one" else 2
        mc.call("configure", payload={"budget_bytes": budget_for(fp, engines), "safety_buffer": 0.15})
        mc.call("set_mode", payload={"mode": "sequential", "cyclic": True})


def lifecycle_during(transitions: list, t0: float, t1: float) -> dict:
    loads = [x for x in transitions if t0 <= x["t"] <= t1 + 0.5 and x["action"] == "load"]
    load_s = sum(x.get("seconds", 0.0) + (x.get("warmup_ms") or 0.0) / 1000.0 for x in loads)
    return {"loads": len(loads), "loads_by_reason": {r: sum(x["detail"] == r for x in loads)
                                                     for r in sorted({x["detail"] for x in loads})},
            "load_order": [x["model"] for x in loads],
            "load_s": round(load_s, 3),
            "evictions": sum(t0 <= x["t"] <= t1 + 0.5 and x["action"] == "evict" for x in transitions),
            "unloads": sum(t0 <= x["t"] <= t1 + 0.5 and x["action"] == "unload" for x in transitions)}


def measure(rag: Rag, mc, fp: dict, n: int, timeout_s: float, window: int) -> dict:
    queries = queries_for(n)
    by_case = {}
    for case in CASES:
        run_idle = wait_idle(0.35, 10)
        prepare(mc, case, fp)
        t0 = mc.status()["clock_s"]
        run = rag.batch(queries, timeout_s, window)
        t1 = mc.status()["clock_s"]
        # the log holds the last 100 transitions: enough for a batch's (about 2 per load) at these sizes
        run.update(lifecycle_during(mc.status()["transitions"], t0, t1))
        run["others_busy_before"] = run_idle["other_busy_fraction"]
        by_case[case] = run
        progress(f"N={n} {case}: {run['wall_s']:.1f} s, {run['ok']}/{n} served, {run['loads']} loads "
                 f"({run['load_s']:.1f} s), {run['evictions']} evictions"
                 + (f"; errors {run['errors']}" if run["errors"] else ""))
    base = by_case["resident"]["wall_s"]
    for case in CASES[1:]:
        run = by_case[case]
        if run["load_s"] > 0:
            raw = 1.0 - (run["wall_s"] - base) / run["load_s"]
            run["hidden_raw"] = round(raw, 4)
            run["hidden"] = round(min(1.0, max(0.0, raw)), 4)
        else:
            run["hidden_raw"] = run["hidden"] = None
        run["over_resident"] = round(run["wall_s"] / base, 3)
    return by_case


def plot(out: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = list(out["by_batch"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(CASES)
    for i, case in enumerate(CASES):
        walls = [out["by_batch"][n][case]["wall_s"] for n in batches]
        xs = [j + i * width for j in range(len(batches))]
        bars = ax1.bar(xs, walls, width, label=case)
        for x, n, bar in zip(xs, batches, bars):
            ax1.annotate(f"{out['by_batch'][n][case]['loads']}", (x, bar.get_height()), ha="center",
                         va="bottom", fontsize=7)
    ax1.set_xticks([j + width * (len(CASES) - 1) / 2 for j in range(len(batches))], [f"N={n}" for n in batches])
    ax1.set_ylabel("batch wall time (s)")
    ax1.set_title("N rag requests at once (number above a bar: loads)")
    ax1.legend(fontsize=8)
    for case in CASES[1:]:
        ax2.plot(batches, [out["by_batch"][n][case]["hidden"] for n in batches], marker="o", label=case)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("queries in the batch")
    ax2.set_ylabel("share of load time hidden")
    ax2.set_title("1 - (wall - wall_resident) / load seconds")
    ax2.legend(fontsize=8)
    fig.suptitle(f"lifecycle through rag ({out['models']} models, {out['machine']['nproc']} cores)")
    save_figure(fig, path)


def report(args, started: str, machine: dict, fp: dict, loads_s: dict, by_batch: dict) -> dict:
    out = {
        "benchmark": "lifecycle",
        "started": started,
        "machine": machine,
        "models": args.models,
        "setup": {"batches": args.batches, "generate_max_tokens": args.max_tokens, "top_k": 4, "top_n": 2,
                  "protocol": f"N rag requests over one gRPC client (async_infer), at most {args.window} outstanding: all at once up to N = {args.window}, then one more as each answer comes back",
                  "rag_orchestrator": "3 instances x max batch 8: at most 24 requests in the pipeline at once",
                  "abstention": "off (every request runs embed, rerank and generate)",
                  "budgets": {"sequential_one": budget_for(fp, 1), "sequential_two": budget_for(fp, 2),
                              "co_resident": 64 << 30, "safety_buffer": 0.15},
                  "footprints_bytes": fp, "latest_load_seconds": loads_s},
        "definitions": {
            "resident": "co_resident, every engine loaded before the batch",
            "co_resident_cold": "co_resident, budget for all three, none loaded: each loads at its first request",
            "sequential_two": "sequential (cyclic), budget for two engines (the phase and the pre-warmed next), "
                              "none loaded at the start",
            "sequential_one": "sequential (cyclic), budget for one engine at a time, none loaded at the start",
            "wall_s": "first request sent to last answer",
            "loads / load_s": "the manager's loads during the batch and their seconds (load + warm-up)",
            "hidden": "1 - (wall_s - wall_s of resident) / load_s, clamped to [0, 1] (hidden_raw unclamped)",
        },
        "by_batch": by_batch,
        "summary": {case: {n: {k: by_batch[n][case].get(k) for k in ("wall_s", "ok", "failed", "loads", "load_s",
                                                                      "hidden")}
                           for n in by_batch} for case in CASES},
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=("demo", "tiny"), default="tiny")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a batch may take")
    ap.add_argument("--window", type=int, default=64,
                    help="requests outstanding at most (rag queues 64 urgent requests beyond the 24 it runs; more at once are refused UNAVAILABLE by its queue policy)")
    ap.add_argument("--out", type=Path, default=RESULTS / "lifecycle.json")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # so that the server is stopped on the way out
    models = ROOT / "build" / "models" / args.models
    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    server = TritonProcess(models, load_models="model_manager rag ingest vector_index embed rerank generate",
                           log_path=ROOT / "build" / "logs" / "bench-lifecycle.log",
                           env={"RAG_DATA_PATH": str(work / "data"),
                                "RAG_POLICY_FILE": str(policy_without_abstention(work)),
                                "RAG_LEASE_TIMEOUT_S": str(args.timeout)})
    progress(f"starting tritonserver on the {args.models} models")
    server.start()
    started = now_iso()
    machine = machine_info()
    try:
        import tritonclient.http as httpclient

        from tests.integration.conftest import CORPUS, ingest

        mc = ManagerClient(server.http_url, api_key=admin_key())
        mc.wait(lambda s: all(s["models"][m]["state"] == "ready" and s["models"][m]["measured"] for m in ENGINES),
                timeout_s=300)
        with httpclient.InferenceServerClient(server.http_url, network_timeout=600) as h:
            ingest(("http", h), [p.stem for p in CORPUS], [p.read_text() for p in CORPUS])
        fp = footprints(mc)
        rag = Rag(server.grpc_url, read_manifest(models / "generate").headers(), args.max_tokens)
        rag.batch(queries_for(4), args.timeout, args.window)                      # warm the CPU side (tokenizers, index)
        by_batch = {}
        for n in args.batches:
            by_batch[str(n)] = measure(rag, mc, fp, n, args.timeout, args.window)
            # written after each batch size: a run stopped later keeps what it measured
            partial = report(args, started, machine, fp, {}, by_batch)
            write_json(args.out, partial)
            plot(partial, args.out.with_suffix(".png"))
        rag.close()
        mc.call("set_mode", payload={"mode": "co_resident"})
        loads_s = {m: mc.model(m)["load_seconds"] for m in ENGINES}
        mc.close()
    finally:
        server.stop()
    out = report(args, started, machine, fp, loads_s, by_batch)
    write_json(args.out, out)
    plot(out, args.out.with_suffix(".png"))
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
