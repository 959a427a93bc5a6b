#!/usr/bin/env python3
"""What enforcing every runtime policy costs one request, in pure Python (target: under 1 ms).

Per request, the steps a BLS model runs before it calls the generate engine: identity-header check, task
policy and sampling resolution, context trimming, token-budget check, worst-case cost and its decision, the
guided schema's id, and the event decision (building the event record when a budget or the queue-delay
threshold is breached, or a BudgetError rejects the request; writing it is I/O and measured separately). The
request mix cycles through tasks, context sizes, price tables and queue delays, so the quiet path, the alert
path and the rejection path (an oversized fixed prompt: token_budget_overrun) are all timed.

Writes results/policy_overhead.json (mean, p50, p99, max in microseconds).
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.governance.events import OBSERVABILITY_ALERT, EventLog, encode_record, make_record  # noqa: E402
from ragstack.governance.identity import check_identity, forward_headers  # noqa: E402
from ragstack.governance.policy import BudgetError, RuntimePolicy, schema_id  # noqa: E402

ENGINE = {"engine_hash": "9f2c1e7a" * 8, "quantisation": "w4a8"}
PRICES = ({"price_per_1k_input_usd": 0.0006, "price_per_1k_output_usd": 0.0024},
          {"price_per_1k_input_usd": 0.02, "price_per_1k_output_usd": 0.08})   # the second breaches $0.10
SOURCE = "manifest build/engines/generate/manifest.json"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"},
                                           "citations": {"type": "array", "items": {"type": "integer"}}},
          "required": ["answer", "citations"]}
TASKS = ("answer", "generate_json", "rank_candidates", "judge")


def make_requests(n_kinds: int = 64) -> list:
    """A fixed, varied mix of requests (parameters JSON as Triton hands it over, as a string)."""
    reqs = []
    for i in range(n_kinds):
        params = json.dumps({"x-engine-hash": ENGINE["engine_hash"], "x-quantisation": "W4A8",
                             "x-request-id": f"req-{i}", "inference-header-content-length": 0})
        reqs.append({"params": params, "task": TASKS[i % 4],
                     "contexts": [180 + 37 * ((i + k) % 11) for k in range(8 + i % 17)],
                     "fixed": 5000 if i % 16 == 15 else 300 + 13 * (i % 9),   # 1 in 16 over the prompt limit
                     "prices": PRICES[i % 3 == 2],
                     "queue_delay_us": 1200 + 97 * (i % 31)})   # every few requests over 2500
    return reqs


def enforce(policy: RuntimePolicy, req: dict) -> list:
    """All the policy steps for one request; returns the encoded event records it would emit."""
    ts = "2025-01-01T00:00:00.000000Z"
    check_identity(req["params"], ENGINE, SOURCE)
    child_params = forward_headers(req["params"])
    task = policy.task(req["task"])
    sampling = task.sampling()
    events = []
    try:
        keep = policy.trim_contexts(req["contexts"], req["fixed"], sampling["max_tokens"])
        prompt_tokens = req["fixed"] + sum(req["contexts"][:keep])
        policy.check_token_budget(prompt_tokens, sampling["max_tokens"])
        decision = policy.check_cost(policy.cost_usd(prompt_tokens, sampling["max_tokens"], req["prices"]))
    except BudgetError as e:   # rejected: the event is the flag
        return [encode_record(make_record(e.flag, {**e.details, "task": task.name}, ts))]
    sid = schema_id(SCHEMA) if task.name == "generate_json" else None
    if decision.alert:
        events.append(make_record(decision.flag, {"cost_usd": decision.cost_usd, "task": task.name,
                                                  "request_id": child_params.get("x-request-id")}, ts))
    if policy.queue_delay_exceeded(req["queue_delay_us"]):
        events.append(make_record(OBSERVABILITY_ALERT, {"metric": "queue_delay_us", "value": req["queue_delay_us"],
                                                        "schema_id": sid}, ts))
    return [encode_record(e) for e in events]


def percentile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(q * (len(sorted_values) - 1))))]


def time_each(fn, items: list, iterations: int) -> list:
    """Per-call durations in microseconds."""
    out = []
    clock = time.perf_counter_ns
    for i in range(iterations):
        item = items[i % len(items)]
        t0 = clock()
        fn(item)
        out.append((clock() - t0) / 1000.0)
    return out


def stats(samples: list) -> dict:
    s = sorted(samples)
    return {"mean_us": round(statistics.fmean(s), 2), "p50_us": round(percentile(s, 0.50), 2),
            "p99_us": round(percentile(s, 0.99), 2), "max_us": round(s[-1], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=50_000)
    ap.add_argument("--policy", default=str(ROOT / "config" / "runtime_policy.json"))
    ap.add_argument("--out", default=str(ROOT / "results" / "policy_overhead.json"))
    args = ap.parse_args()

    policy = RuntimePolicy.load(args.policy)
    reqs = make_requests()
    for req in reqs[:200]:  # warm-up
        enforce(policy, req)
    per_request = time_each(lambda r: enforce(policy, r), reqs, args.iterations)
    alerts = sum(1 for r in reqs if enforce(policy, r))

    with tempfile.TemporaryDirectory() as tmp:
        log = EventLog(Path(tmp) / "events.jsonl")
        emit = time_each(lambda i: log.emit(OBSERVABILITY_ALERT, metric="queue_delay_us", value=i),
                         list(range(100)), min(args.iterations, 5_000))
        log.close()

    result = {
        "benchmark": "policy_overhead",
        "what": "identity check + header forwarding + task policy + trim + token budget + cost + schema id "
                "+ event decision (record built and encoded, not written), per request",
        "iterations": args.iterations,
        "requests_with_events_in_mix": f"{alerts}/{len(reqs)}",
        "per_request": stats(per_request),
        "target_us": 1000.0,
        "within_target": statistics.fmean(per_request) < 1000.0 and percentile(sorted(per_request), 0.99) < 1000.0,
        "event_emit_to_log": stats(emit),
        "cost_breach_action": policy.thresholds.cost_breach_action,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
