#!/usr/bin/env python3
"""How the HPA rule of deploy/k8s/hpa.yaml answers a burst: a queueing model, simulated second by second
→ results/hpa_burst.json + .png (docs/scale-out.md).

Model (assumptions are parameters, printed into the JSON):
* each replica is an M/M/c queue in front of the TensorRT-LLM in-flight batcher: c batch slots, mean request time
  1/mu; llm_queue_delay_us is the Erlang-C wait (what a request waits for a slot), plus a fluid backlog term when
  arrivals exceed capacity (then the queue grows by the excess every second);
* Prometheus scrapes every 15 s; the adapter serves rate(sum[1m]) / rate(count[1m]) per pod, i.e. the mean wait
  of the requests of the last minute; the HPA controller syncs every 15 s:
  desired = ceil(current * mean_over_pods(metric) / target), 10 % tolerance, clamped by the behavior policies
  (up: max(2 pods, 100 %) per 60 s, no stabilisation; down: 600 s stabilisation, 1 pod per 300 s), 2..8 replicas;
* clients give up after ``--client-timeout-s`` of waiting (counted as timed out);
* a new pod serves after ``--startup`` s (schedule on a node with a free GPU, image cached, engines read from the
  PVC, warm-up). ``--startup-cold`` is a second run where a node must be added first.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, save_figure  # noqa: E402


def erlang_c_wait(lam: float, c: int, mu: float) -> float:
    """Mean wait in queue (s) of M/M/c; inf at or above saturation."""
    if lam <= 0:
        return 0.0
    a = lam / mu
    rho = a / c
    if rho >= 1:
        return math.inf
    # Erlang B by recursion (stable), then C.
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    pc = b / (1 - rho * (1 - b))
    return pc / (c * mu - lam)


def arrivals(t: float, base: float, peak: float, start: float, length: float, ramp: float) -> float:
    if t < start:
        return base
    if t < start + ramp:
        return base + (peak - base) * (t - start) / ramp
    if t < start + length:
        return peak
    return base


def simulate(args, startup: float) -> dict:
    c, mu, target = args.slots, 1.0 / args.request_s, args.target_us
    cap = c * mu                                     # requests/s one replica serves at saturation
    ready = [0.0] * args.min_replicas                # times at which each pod became/becomes ready
    desired, backlog = args.min_replicas, 0.0
    window = []                                      # (t, wait_s, served) over the last 60 s, for rate([1m])
    scale_events, history, recs = [], [], []          # recs: (t, recommendation) for the down stabilisation
    metric, dropped = 0.0, 0.0
    for t in range(int(args.duration)):
        lam = arrivals(t, args.base_rps, args.peak_rps, args.burst_at, args.burst_s, args.ramp_s)
        n = sum(1 for r in ready if r <= t)
        demand = lam + backlog
        served = min(demand, n * cap)
        backlog = demand - served
        limit = n * cap * args.client_timeout_s          # a request that would wait longer times out at the client
        if backlog > limit:
            dropped += backlog - limit
            backlog = limit
        per = lam / n
        wait = backlog / (n * cap) if backlog > 0 else erlang_c_wait(min(per, 0.999 * cap), c, mu)
        window.append((t, wait, served))
        window = [w for w in window if w[0] > t - 60]
        if t % args.scrape_s == 0:
            tot = sum(s for _, _, s in window)
            metric = 1e6 * sum(w * s for _, w, s in window) / tot if tot else 0.0
        if t % args.sync_s == 0 and t > 0:
            current = len(ready)
            ratio = metric / target
            rec = current if abs(ratio - 1) <= 0.1 else math.ceil(current * ratio)
            rec = max(args.min_replicas, min(args.max_replicas, rec))
            recs.append((t, rec))
            recs = [r for r in recs if r[0] > t - 600]
            if rec > current:
                added = sum(d for (te, d) in scale_events if te > t - 60 and d > 0)
                step = max(2, current - added)               # max(2 pods, 100 %) per 60 s
                new = min(rec, current + max(0, step - added))
            else:
                stable = max(r for _, r in recs)              # highest recommendation of the last 600 s
                removed = -sum(d for (te, d) in scale_events if te > t - 300 and d < 0)
                new = max(stable, current - max(0, 1 - removed)) if stable < current else current
            if new > current:
                ready += [t + startup] * (new - current)
                scale_events.append((t, new - current))
            elif new < current:
                # scale-in: the newest pod goes (its preStop drains in-flight requests; the model ignores that)
                ready = sorted(ready)[: new]
                scale_events.append((t, new - current))
            desired = new
        history.append({"t": t, "arrivals_rps": round(lam, 2), "replicas": len(ready), "ready": n,
                        "desired": desired, "backlog": round(backlog, 1), "wait_ms": round(1000 * wait, 2),
                        "metric_us": round(metric, 1)})
    peak_wait = max(h["wait_ms"] for h in history)
    over = [h["t"] for h in history if h["wait_ms"] > args.slo_ms]
    return {"startup_s": startup, "capacity_per_replica_rps": cap, "peak_wait_ms": peak_wait,
            "max_replicas": max(h["replicas"] for h in history),
            "seconds_over_slo": len(over), "timed_out_requests": round(dropped),
            "requests": round(sum(h["arrivals_rps"] for h in history)),
            "first_scale_up_s": next((te for te, d in scale_events if d > 0), None),
            "scale_events": scale_events, "history": history}


def plot(runs: dict, args, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for (name, run), color in zip(runs.items(), ("#36a", "#c63")):
        h = run["history"]
        t = [x["t"] / 60 for x in h]
        if color == "#36a":
            axes[0].plot(t, [x["arrivals_rps"] for x in h], color="k", label="arrivals")
            axes[0].plot(t, [x["ready"] * run["capacity_per_replica_rps"] for x in h], color=color,
                         label=f"capacity of ready pods ({name})")
        else:
            axes[0].plot(t, [x["ready"] * run["capacity_per_replica_rps"] for x in h], color=color,
                         label=f"capacity of ready pods ({name})")
        axes[1].step(t, [x["replicas"] for x in h], color=color, where="post", label=f"pods ({name})")
        axes[1].step(t, [x["ready"] for x in h], color=color, ls=":", where="post", label=f"ready ({name})")
        axes[2].semilogy(t, [max(x["wait_ms"], 1e-3) for x in h], color=color, label=f"queue wait ({name})")
    axes[2].axhline(args.target_us / 1000, color="g", ls="--", lw=1, label=f"HPA target {args.target_us / 1000:g} ms")
    axes[2].axhline(args.slo_ms, color="r", ls="--", lw=1, label=f"a wait users notice ({args.slo_ms:g} ms; clients time out at {args.client_timeout_s:g} s)")
    axes[0].set_ylabel("requests/s")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("mean queue wait, ms")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"HPA on llm_queue_delay_us per request (target {args.target_us / 1000:g} ms): a 4x burst, simulated")
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=32, help="in-flight batch slots per replica")
    ap.add_argument("--request-s", type=float, default=2.0, help="mean request time in the batcher, s")
    ap.add_argument("--base-rps", type=float, default=20.0)
    ap.add_argument("--peak-rps", type=float, default=80.0)
    ap.add_argument("--burst-at", type=float, default=300.0)
    ap.add_argument("--burst-s", type=float, default=1200.0)
    ap.add_argument("--ramp-s", type=float, default=60.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--target-us", type=float, default=50000.0)
    ap.add_argument("--slo-ms", type=float, default=1000.0, help="a queue wait that users notice")
    ap.add_argument("--client-timeout-s", type=float, default=60.0, help="clients give up after this wait")
    ap.add_argument("--scrape-s", type=int, default=15)
    ap.add_argument("--sync-s", type=int, default=15)
    ap.add_argument("--min-replicas", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=8)
    ap.add_argument("--startup", type=float, default=120.0, help="s from scale-up to serving (GPU node free)")
    ap.add_argument("--startup-cold", type=float, default=480.0, help="s when a GPU node must be added first")
    ap.add_argument("--out", default=str(RESULTS / "hpa_burst.json"))
    args = ap.parse_args(argv)
    runs = {f"warm node, {args.startup:.0f} s to ready": simulate(args, args.startup),
            f"new node, {args.startup_cold:.0f} s to ready": simulate(args, args.startup_cold)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, args, out.with_suffix(".png"))
    summary = {name: {k: v for k, v in run.items() if k != "history"} for name, run in runs.items()}
    out.write_text(json.dumps({"benchmark": "hpa_burst_sim", "params": vars(args), "runs": summary,
                               "history_every_10s": {n: r["history"][::10] for n, r in runs.items()}}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
