#!/usr/bin/env python3
"""Adaptive batching beside a running server (ragstack/governance/adaptive.py): off unless started, and dry-run unless --apply.

Every --interval seconds it reads Triton's metrics port (queue depth per engine, the pipeline's per-stage latency
histogram for the p95, the lifecycle manager's memory headroom), feeds one ragstack.governance.adaptive.Controller per
engine, writes every decision to the event log (``adaptive_batching`` events) and shows its own gauges on
--metrics-port (``llm_adaptive_max_preferred_batch``, ``llm_adaptive_queue_delay_us``, ``llm_adaptive_changes``).
With --apply a decision reloads the engine with a config override (gRPC model-repository API; the admin key from
$TRITON_ADMIN_KEY when the API is restricted); Triton keeps serving the old instance until the new one is ready.

Why it is off by default on the reference profile: see results/priority.json ("adaptive"): batching buys little
on 2 CPU cores and each change is a model reload.

  tools/adaptive_batching.py --url 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics [--apply]
"""
import argparse
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.governance.adaptive import LADDERS, Controller, Sample, buckets, config_override, histogram_p95, \
    parse_prometheus, value  # noqa: E402
from ragstack.governance.events import EventLog  # noqa: E402

STAGE = {"embed": "embed", "rerank": "rerank"}


def scrape(url: str) -> list:
    with urllib.request.urlopen(url, timeout=5) as r:
        return parse_prometheus(r.read().decode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    ap.add_argument("--models", default="embed,rerank")
    ap.add_argument("--p95-target-ms", type=float, default=250.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--cooldown-s", type=float, default=60.0)
    ap.add_argument("--events", default="logs/llm_events.jsonl")
    ap.add_argument("--metrics-port", type=int, default=0, help="serve this tool's gauges here (0: off)")
    ap.add_argument("--apply", action="store_true", help="reload engines with the chosen settings")
    ap.add_argument("--samples", type=int, default=0, help="stop after this many samples (0: run until killed)")
    args = ap.parse_args()

    models = [m for m in args.models.split(",") if m]
    controllers = {m: Controller(m, LADDERS[m], args.p95_target_ms, cooldown_s=args.cooldown_s) for m in models}
    events = EventLog(args.events)
    client = None
    if args.apply:
        import tritonclient.grpc as grpcclient

        from ragstack.settings import current
        client = grpcclient.InferenceServerClient(args.url)
        key = current().triton_admin_key
        headers = {"triton-grpc-protocol-admin-key": key} if key else None
    if args.metrics_port:
        _serve_gauges(args.metrics_port, controllers)

    before = {}
    n = 0
    while not args.samples or n < args.samples:
        n += 1
        samples = scrape(args.metrics_url)
        budget = value(samples, "llm_memory_budget_bytes")
        room = value(samples, "llm_memory_headroom_bytes")
        headroom = room / budget if budget and room is not None else None
        for model, ctl in controllers.items():
            after = buckets(samples, "llm_stage_latency_us", stage=STAGE[model])
            p95_us = histogram_p95(before.get(model, {}), after) if after else None
            before[model] = after
            depth = value(samples, "nv_inference_pending_request_count", model=model) or 0.0
            event = ctl.observe(Sample(depth, None if p95_us is None else p95_us / 1000.0, headroom))
            if event is None:
                continue
            event["applied"] = False
            if client is not None:
                cfg = client.get_model_config(model, as_json=True, headers=headers)["config"]
                client.load_model(model, config=json.dumps(config_override(cfg, ctl.rung)), headers=headers)
                event["applied"] = True
            events.emit(event.pop("event"), **event)
            print(json.dumps(event), file=sys.stderr)
        time.sleep(args.interval)
    events.close()
    return 0


def _serve_gauges(port: int, controllers: dict) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            lines = []
            for name, key in (("llm_adaptive_max_preferred_batch", "max_preferred_batch"),
                              ("llm_adaptive_queue_delay_us", "queue_delay_us"), ("llm_adaptive_changes", "changes")):
                lines.append(f"# TYPE {name} gauge")
                lines += [f'{name}{{model="{m}"}} {c.gauges()[key]}' for m, c in controllers.items()]
            body = ("\n".join(lines) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
