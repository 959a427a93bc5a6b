#!/usr/bin/env python3
"""Poll a Triton server's readiness and its metrics thresholds; one line per round, a JSON report at the end.

Each round asks ``/v2/health/ready``, ``/v2/models/{m}/ready`` for every ``--models`` entry, and scrapes the
metrics endpoint. Queue delay and error rate are computed over the interval since the previous round (the
counters are cumulative; the first round uses the totals since the server started):

* queue delay per model: ``llm_queue_delay_us`` (the stack's histogram, _sum/_count) when exported, else
  Triton's ``nv_inference_queue_duration_us`` per successful request;
* error rate per model: ``nv_inference_request_failure`` / (success + failure), models without traffic skipped.

A model whose Python stub died counts as not ready until it is reloaded (``llm_model_stub_healthy`` 0: Triton
2.51 itself keeps reporting it ready).

Round lines go to stderr, the JSON report to stdout (pipe it to ``jq``). Exit status, from the last round:
0 ready, 1 not ready (server, a model, or a dead stub), 2 ready but a threshold is breached or the metrics are
unreadable.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.governance.policy import RuntimePolicy  # noqa: E402

READY, NOT_READY, DEGRADED = "ready", "not_ready", "degraded"
EXIT_CODES = {READY: 0, NOT_READY: 1, DEGRADED: 2}
DEFAULT_MAX_ERROR_RATE = 0.01  # degraded when more than 1 % of requests fail

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?\s*')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


# ------------------------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict:
    """Prometheus text exposition → {(name, ((label, value), ...)): float}; comments and bad lines skipped."""
    samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted((k, re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group()], v))
                              for k, v in _LABEL.findall(m.group("labels") or "")))
        try:
            samples[(m.group("name"), labels)] = float(m.group("value"))
        except ValueError:
            continue
    return samples


def sum_by(samples: dict, name: str, label: str = "model") -> dict:
    """{label value: sum of the series of ``name``} (e.g. failures of all reasons per model)."""
    out = {}
    for (n, labels), value in samples.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def _delta(cur: dict, prev: dict) -> dict:
    # A counter that went down was reset (server or model restart): its current value is the increase.
    return {k: (v - prev.get(k, 0.0)) if v >= prev.get(k, 0.0) else v for k, v in cur.items()}


def evaluate_metrics(cur: dict, prev: Optional[dict], max_queue_delay_us: float, max_error_rate: float) -> dict:
    """Queue delay and error rate per model over the window since ``prev``, and the thresholds they breach."""
    prev = prev or {}

    def d(name):
        return _delta(sum_by(cur, name), sum_by(prev, name))

    if any(n == "llm_queue_delay_us_count" for n, _ in cur):
        source, total, count = "llm_queue_delay_us", d("llm_queue_delay_us_sum"), d("llm_queue_delay_us_count")
    else:
        source, total, count = ("nv_inference_queue_duration_us", d("nv_inference_queue_duration_us"),
                                d("nv_inference_request_success"))
    queue = {m: total.get(m, 0.0) / n for m, n in count.items() if n > 0}
    ok, failed = d("nv_inference_request_success"), d("nv_inference_request_failure")
    errors = {m: failed.get(m, 0.0) / (ok.get(m, 0.0) + failed.get(m, 0.0))
              for m in set(ok) | set(failed) if ok.get(m, 0.0) + failed.get(m, 0.0) > 0}
    dead = sorted(dict(labels).get("model", "?") for (name, labels), v in cur.items()
                  if name == "llm_model_stub_healthy" and v == 0)
    breaches = [f"queue delay {v:.0f} us > {max_queue_delay_us:g} us on {m}" for m, v in sorted(queue.items())
                if v > max_queue_delay_us]
    breaches += [f"error rate {v:.2%} > {max_error_rate:.2%} on {m}" for m, v in sorted(errors.items())
                 if v > max_error_rate]
    return {"queue_delay_source": source, "queue_delay_us": queue, "error_rate": errors, "breaches": breaches,
            "dead_stubs": dead}


# ------------------------------------------------------------------------------------------------ HTTP
def _get(url: str, timeout: float) -> tuple:
    """(status code or None, body text or error message)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.reason
    except (urllib.error.URLError, OSError) as e:
        return None, str(getattr(e, "reason", e))


def check_ready(base_url: str, models: list, timeout: float) -> dict:
    base = base_url.rstrip("/")
    code, detail = _get(f"{base}/v2/health/ready", timeout)
    out = {"server": code == 200, "models": {}, "errors": []}
    if code != 200:
        out["errors"].append(f"/v2/health/ready: {code if code is not None else 'unreachable'} {detail}".strip())
    for m in models:
        code, detail = _get(f"{base}/v2/models/{m}/ready", timeout)
        out["models"][m] = code == 200
        if code != 200:
            out["errors"].append(f"model {m}: {code if code is not None else 'unreachable'} {detail}".strip())
    return out


# ----------------------------------------------------------------------------------------------- rounds
def one_round(args, prev_samples: Optional[dict]) -> tuple:
    """(round record, samples to diff against next round)."""
    ready = check_ready(args.url, args.models, args.timeout)
    record = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **ready}
    samples = prev_samples
    if args.metrics_url:
        code, text = _get(args.metrics_url, args.timeout)
        if code == 200:
            samples = parse_metrics(text)
            record["metrics"] = evaluate_metrics(samples, prev_samples, args.max_queue_delay_us, args.max_error_rate)
        else:
            record["metrics"] = {"breaches": [f"metrics endpoint {args.metrics_url}: {code} {text}"]}
    breaches = record.get("metrics", {}).get("breaches", [])
    dead = record.get("metrics", {}).get("dead_stubs", [])
    if dead:        # Triton still says ready: the stack's own gauge says a stub is dead until its reload
        record["errors"].append(f"dead Python stub (reload pending): {', '.join(dead)}")
    if not ready["server"] or not all(ready["models"].values()) or dead:
        record["status"] = NOT_READY
    else:
        record["status"] = DEGRADED if breaches else READY
    return record, samples


def format_round(n: int, record: dict) -> str:
    models = " ".join(f"{m}={'ok' if r else 'NOT-READY'}" for m, r in record["models"].items())
    met = record.get("metrics", {})
    worst = []
    for key, fmt in (("queue_delay_us", "{:.0f}us"), ("error_rate", "{:.2%}")):
        values = met.get(key) or {}
        if values:
            m = max(values, key=values.get)
            worst.append(f"{key}={fmt.format(values[m])}({m})")
    problems = record["errors"] + met.get("breaches", [])
    return " ".join(filter(None, [f"round {n}", record["ts"], record["status"].upper(),
                                  f"server={'ok' if record['server'] else 'NOT-READY'}", models, *worst,
                                  ("| " + "; ".join(problems)) if problems else ""]))


def run(args, sleep=time.sleep, log=None) -> dict:
    log = log or sys.stderr
    rounds, samples = [], None
    try:
        n = 0
        while args.rounds <= 0 or n < args.rounds:
            if n:
                sleep(args.interval)
            n += 1
            record, samples = one_round(args, samples)
            rounds.append(record)
            print(format_round(n, record), file=log, flush=True)
    except KeyboardInterrupt:
        pass
    status = rounds[-1]["status"] if rounds else NOT_READY
    return {"status": status, "url": args.url, "metrics_url": args.metrics_url, "models": args.models,
            "thresholds": {"max_queue_delay_us": args.max_queue_delay_us, "max_error_rate": args.max_error_rate},
            "rounds": rounds}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="Triton HTTP endpoint")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help="'' to skip the metrics")
    ap.add_argument("--models", default="", help="comma-separated models that must be ready")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between rounds (30: the readiness poll)")
    ap.add_argument("--rounds", type=int, default=1, help="number of rounds; 0 = until interrupted")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, seconds")
    ap.add_argument("--policy", default=str(ROOT / "config" / "runtime_policy.json"),
                    help="runtime policy giving max_queue_delay_us")
    ap.add_argument("--max-queue-delay-us", type=float, help="override the policy's max_queue_delay_us")
    ap.add_argument("--max-error-rate", type=float, default=DEFAULT_MAX_ERROR_RATE)
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.max_queue_delay_us is None:
        args.max_queue_delay_us = RuntimePolicy.load(args.policy).thresholds.max_queue_delay_us
    return args


def main(argv=None) -> int:
    report = run(parse_args(argv))
    print(json.dumps(report, indent=2))
    return EXIT_CODES[report["status"]]


if __name__ == "__main__":
    sys.exit(main())
