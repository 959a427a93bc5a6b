#!/usr/bin/env python3
"""Soak: does the stack hold under sustained mixed load (issue 11)?

Starts one tritonserver on the reference profile (``--models tiny|demo``, its own RAG_DATA_PATH) or attaches to a
running one (``--attach --http-url ... --grpc-url ... [--server-pid ... --server-log ... --metrics-url ...]``),
ingests data/corpus into collection ``corpus``, then runs ``--clients`` client threads for ``--duration`` seconds,
mixing (see ragstack_dev/soak.py):

* ``rag`` over HTTP and gRPC, all four tasks, with the engine-identity headers; ``rag_stream`` over gRPC streaming;
  ``/v2/models/rag/generate``; ``/v2/models/rag_stream/generate_stream`` (SSE);
* ``ingest`` upserts and deletes of small documents in collection ``soak_scratch`` (at the end every acknowledged,
  not-deleted document must be in the index, every acknowledged delete must have stayed deleted);
* cancellations: short gRPC deadlines, gRPC stream cancels, SSE disconnects mid-generation;
* ~15 % bad requests (expected: client errors).

Every request has a client timeout (``--timeout``, 120 s); one that runs over counts as hung. Every
``--sample`` seconds it records the RSS of tritonserver and of every Python stub under it, stub deaths (a stub PID
gone while the server runs, without an unload of its model in the server log), "not healthy"/crash lines in the
server log, and heals (``llm_model_heals_total`` on the metrics port).

Writes ``--out`` (results/soak.json) and a plot next to it (results/soak.png). Exits 1 when a criterion fails:
0 stub deaths, 0 server errors (5xx/INTERNAL/UNAVAILABLE), 0 hung, 0 transport errors, server alive, no
acknowledged document lost, RSS growth after warm-up (last sample vs the one at ``--warmup`` of the run) < 5 %.

  .venv/bin/python benchmarks/soak.py --models tiny --clients 16 --duration 1800               # the issue's run
  .venv/bin/python benchmarks/soak.py --models demo --clients 16 --duration 600 --out results/soak-demo.json
  .venv/bin/python benchmarks/soak.py --models tiny --clients 6 --duration 180 --out /tmp/soak.json  # a short try
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import admin_key, identity_headers, ingest_corpus, operator_headers, pyplot, save_figure  # noqa: E402
from common import RESULTS, ROOT, display_path, machine_info, now_iso, progress, write_json  # noqa: E402

from ragstack_dev.server import TritonProcess  # noqa: E402
from ragstack_dev.soak import SoakConfig, run_soak  # noqa: E402

MODEL_SETS = {"tiny": ROOT / "build" / "models" / "tiny", "demo": ROOT / "build" / "models" / "demo"}


def find_server_pid(http_port: str):
    """The tritonserver process listening on ``http_port`` (attach mode without --server-pid)."""
    try:
        import psutil
    except ImportError:
        return None
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if cmd and cmd[0].endswith("tritonserver") and f"--http-port={http_port}" in cmd:
            return p.pid
    return None


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    samples = result["rss"]["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    if samples:
        t = [s["t"] for s in samples]
        groups = sorted({g for s in samples for g in s["groups"]})
        cmap = plt.get_cmap("tab20")
        for i, g in enumerate(groups):
            ax1.plot(t, [s["groups"].get(g, 0) / 2**20 for s in samples], label=g, lw=1, color=cmap(i % 20))
        ax1.plot(t, [s["total"] / 2**20 for s in samples], label="total", color="black", lw=2)
        g = result["rss"]["growth"]
        if "warmup_t_s" in g:
            ax1.axvline(g["warmup_t_s"], color="grey", ls="--", lw=1)
            ax1.set_title(f"RSS per process group (growth after warm-up {g['growth']:+.1%})")
    for d in result["stub_deaths"]:
        ax1.axvline(d["t"], color="red", lw=1.5)
        ax2.axvline(d["t"], color="red", lw=1.5)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7, ncol=3, loc="upper left")
    tl = result["timeline"]
    xs = [b["t"] for b in tl["buckets"]]
    bottom = [0.0] * len(xs)
    colours = {"ok": "tab:green", "client_error": "tab:blue", "cancelled": "tab:grey", "server_error": "tab:red",
               "hung": "tab:purple", "transport": "tab:orange", "frontend_500": "tab:brown"}
    for o, c in colours.items():
        ys = [b.get(o, 0) / tl["bucket_s"] for b in tl["buckets"]]
        if any(ys):
            ax2.bar(xs, ys, width=tl["bucket_s"], bottom=bottom, align="edge", color=c, label=o)
            bottom = [a + b for a, b in zip(bottom, ys)]
    ax2.set_ylabel("requests/s (by outcome, by completion time)")
    ax2.set_xlabel("seconds since the load started (red lines: stub deaths)")
    ax2.legend(fontsize=8, loc="upper left")
    verdict = "PASS" if result["pass"] else "FAIL"
    fig.suptitle(f"soak {result.get('models', '')}: {result['config']['clients']} clients, "
                 f"{result['wall_s']:.0f} s, {result['requests']} requests: {verdict}")
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", choices=sorted(MODEL_SETS), default="tiny", help="model set to serve")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout (over: hung)")
    ap.add_argument("--bad-fraction", type=float, default=0.15)
    ap.add_argument("--cancel-fraction", type=float, default=0.08)
    ap.add_argument("--ingest-fraction", type=float, default=0.10)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--progress", type=float, default=20.0, help="seconds between progress lines")
    ap.add_argument("--warmup", type=float, default=0.2, help="RSS growth is measured from this fraction of the run")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens on good rag requests (default: policy)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict-frontend", action="store_true",
                    help="count Triton's own HTTP 500 on an unparseable JSON body as a server error")
    ap.add_argument("--load-models", default="*", help="LOAD_MODELS for the server this starts")
    ap.add_argument("--attach", action="store_true", help="use a running server instead of starting one")
    ap.add_argument("--http-url", default="127.0.0.1:8000")
    ap.add_argument("--grpc-url", default="127.0.0.1:8001")
    ap.add_argument("--metrics-url", default=None, help="e.g. http://127.0.0.1:8002/metrics")
    ap.add_argument("--server-pid", type=int, default=None, help="attach: tritonserver's PID (default: found)")
    ap.add_argument("--server-log", type=Path, default=None, help="attach: the server's log file")
    ap.add_argument("--skip-ingest", action="store_true", help="attach: collection 'corpus' is already there")
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json", help="results JSON (plot: same stem .png)")
    args = ap.parse_args()

    models = MODEL_SETS[args.models]
    result = {"benchmark": "soak", "date": now_iso(), "machine": machine_info(), "models": args.models,
              "issue": "11: 0 stub deaths, 0 5xx, 0 hung, RSS growth < 5 % after warm-up"}
    server = None
    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    try:
        if args.attach:
            http_url, grpc_url, metrics_url = args.http_url, args.grpc_url, args.metrics_url
            server_pid = args.server_pid or find_server_pid(http_url.rsplit(":", 1)[1])
            server_log = args.server_log
            result["server"] = {"attached": True, "pid": server_pid}
        else:
            log_path = ROOT / "build" / "logs" / f"soak-{args.models}.log"
            progress(f"starting tritonserver on {display_path(models)} (RAG_DATA_PATH={tmp.name}, "
                     f"log {display_path(log_path)})")
            server = TritonProcess(models, load_models=args.load_models, log_path=log_path,
                                   env={"RAG_DATA_PATH": tmp.name})
            t0 = time.perf_counter()
            server.start(timeout=600)
            progress(f"server ready in {time.perf_counter() - t0:.0f} s (pid {server.proc.pid})")
            http_url, grpc_url, metrics_url = server.http_url, server.grpc_url, server.metrics_url
            server_pid, server_log = server.proc.pid, log_path
            result["server"] = {"attached": False, "pid": server_pid, "log": display_path(log_path),
                                "ready_s": round(time.perf_counter() - t0, 1)}
        if not args.skip_ingest:
            progress("ingesting data/corpus into collection 'corpus'")
            result["ingest"] = ingest_corpus(http_url, "corpus")
            progress(f"ingested {result['ingest']['documents']} documents, {result['ingest']['chunks']} chunks "
                     f"in {result['ingest']['seconds']} s")
        cfg = SoakConfig(http_url=http_url, grpc_url=grpc_url, identity=identity_headers(models),
                         api_key=admin_key(), operator_headers=operator_headers(args.attach),
                         metrics_url=metrics_url, server_pid=server_pid, server_log=server_log,
                         clients=args.clients, duration_s=args.duration, timeout_s=args.timeout,
                         bad_fraction=args.bad_fraction, cancel_fraction=args.cancel_fraction,
                         ingest_fraction=args.ingest_fraction, sample_s=args.sample, progress_s=args.progress,
                         warmup_fraction=args.warmup, max_tokens=args.max_tokens, seed=args.seed,
                         strict_frontend=args.strict_frontend)
        progress(f"soak: {cfg.clients} clients for {cfg.duration_s:.0f} s (timeout {cfg.timeout_s:.0f} s per request)")
        result.update(run_soak(cfg, progress))
    finally:
        if server is not None:
            if server.proc.poll() is not None:
                result["server_exit_code"] = server.proc.returncode
            server.stop()
        tmp.cleanup()
    if "criteria" not in result:
        return 2
    write_json(args.out, result)
    try:
        plot(result, args.out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - the JSON is what counts
        progress(f"no plot: {type(e).__name__}: {e}")
    for name, c in result["criteria"].items():
        progress(f"{name}: {c['value']} (target {c['target']}) {'PASS' if c['pass'] else 'FAIL'}")
    for kind, k in result["by_kind"].items():
        lat = k["latency_all"]
        progress(f"  {kind:28s} {k['outcomes']}  p50 {lat.get('p50_ms')} ms  p99 {lat.get('p99_ms')} ms")
    if result["stub_deaths"]:
        progress(f"first stub death at {result['first_stub_death_s']} s: {result['stub_deaths'][0]}")
    progress(f"soak {'PASS' if result['pass'] else 'FAIL'}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
