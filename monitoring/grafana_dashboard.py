#!/usr/bin/env python3
"""Writes monitoring/grafana-dashboard.json (run it after editing; a unit test fails when the two differ).

The dashboard is generated rather than hand-edited because Grafana JSON repeats the same panel skeleton a
dozen times: here each panel is one line of intent (title, queries, unit, thresholds), and the thresholds
are the same numbers as the alert rules (monitoring/alerts.yml; docs/design-notes.md). ``--check`` only compares.
"""
import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'  # the dashboard's model filter, for Triton's per-model series
WIDTH = 24


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def steps(*levels) -> dict:
    """Absolute thresholds: green below the first level, then yellow / orange / red."""
    colours = ["yellow", "orange", "red"]
    return {"mode": "absolute",
            "steps": [{"color": "green", "value": None}] + [{"color": c, "value": v} for c, v in zip(colours, levels)]}


def panel(title: str, queries: list, unit: str, w: int, h: int = 8, kind: str = "timeseries",
          thresholds: tuple = (), description: str = "") -> dict:
    """One panel; ``queries`` is [(expr, legend)]. Thresholds show as lines on time series."""
    p = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "targets": [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(queries)],
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": steps(*thresholds)}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "orientation": "auto"},
    }
    if kind == "timeseries" and thresholds:
        p["fieldConfig"]["defaults"]["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return p


def quantiles(metric: str, by: str, qs=(0.5, 0.95), where: str = "") -> list:
    sel = f"{{{where}}}" if where else ""
    return [(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{sel}[5m])))",
             f"{{{{{by}}}}} p{int(q * 100)}") for q in qs]


def rows() -> list:
    """[(row title, [panels])]: the layout, top to bottom."""
    per_request = f"sum by (model) (rate(nv_inference_request_success{{{M}}}[5m]))"
    return [
        ("Traffic and errors", [
            panel("Requests per model", [
                (f"sum by (model) (rate(nv_inference_request_success{{{M}}}[5m]))", "{{model}} ok"),
                (f"sum by (model) (rate(nv_inference_request_failure{{{M}}}[5m]))", "{{model}} failed"),
            ], "reqps", 10),
            panel("Error rate per model", [
                (f"sum by (model) (rate(nv_inference_request_failure{{{M}}}[5m])) / "
                 f"(sum by (model) (rate(nv_inference_request_success{{{M}}}[5m])) + "
                 f"sum by (model) (rate(nv_inference_request_failure{{{M}}}[5m])))", "{{model}}"),
            ], "percentunit", 10, thresholds=(0.01, 0.02),
                description="Warning over 1 %, auto-rollback over 2 %."),
            panel("Models loaded", [("count(count by (model, version) (nv_inference_count))", "models")],
                  "none", 4, kind="stat",
                  description="Triton keeps per-model series only while a model is loaded."),
        ]),
        ("Latency", [
            panel("Queue vs compute time per request", [
                (f"sum by (model) (rate(nv_inference_queue_duration_us{{{M}}}[5m])) / {per_request}",
                 "{{model}} queue"),
                (f"sum by (model) (rate(nv_inference_compute_infer_duration_us{{{M}}}[5m])) / {per_request}",
                 "{{model}} compute"),
            ], "µs", 8, description="Queue above compute for 10 minutes raises QueueTimeAboveCompute."),
            panel("LLM queue delay p50 / p95", quantiles("llm_queue_delay_us", "model", where=M),
                  "µs", 8, thresholds=(2500,), description="max_queue_delay_us 2500 (config/runtime_policy.json)."),
            panel("Per-stage latency p50 / p95", quantiles("llm_stage_latency_us", "stage"), "µs", 8,
                  description="tokenize, embed, search, rerank, generate."),
        ]),
        ("Tokens and cost", [
            panel("Tokens per second", [
                ("sum by (model) (rate(llm_tokens_in[5m]))", "{{model}} in"),
                ("sum by (model) (rate(llm_tokens_out[5m]))", "{{model}} out"),
            ], "short", 10),
            panel("Cost per hour", [("sum by (task) (rate(llm_cost_usd[5m])) * 3600", "{{task}}")],
                  "currencyUSD", 10),
            panel("Cost, last 24 h", [("sum(increase(llm_cost_usd[24h]))", "USD")], "currencyUSD", 4,
                  kind="stat"),
        ]),
        ("Models and memory", [
            panel("Model load time", [("llm_model_load_seconds", "{{model}}")], "s", 6, kind="stat",
                  thresholds=(30,), description="Alert over 30 s (slow_load_s)."),
            panel("GPU utilisation", [("nv_gpu_utilization", "{{gpu_uuid}}")], "percentunit", 6,
                  thresholds=(0.9,)),
            panel("GPU memory used", [("nv_gpu_memory_used_bytes / nv_gpu_memory_total_bytes", "{{gpu_uuid}}")],
                  "percentunit", 6, thresholds=(0.8, 0.9, 0.95), description="Warning/major/critical at 80/90/95 %."),
            panel("Process memory vs budget", [("llm_memory_used_bytes / llm_memory_budget_bytes",
                                                "{{component}}")],
                  "percentunit", 6, thresholds=(0.8, 0.9, 0.95)),
        ]),
    ]


def dashboard() -> dict:
    panels, y, next_id = [], 0, 1
    for title, row_panels in rows():
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1}, "panels": []})
        next_id, y, x = next_id + 1, y + 1, 0
        for p in row_panels:
            p["id"] = next_id
            p["gridPos"].update(x=x, y=y)
            next_id, x = next_id + 1, x + p["gridPos"]["w"]
        assert x <= WIDTH, f"row {title!r} is {x} units wide"
        panels += row_panels
        y += max(p["gridPos"]["h"] for p in row_panels)
    return {
        "uid": "ragstack-triton",
        "title": "RAG stack on Triton",
        "description": "Requests, errors, queueing, tokens, cost, per-stage latency, models and memory.",
        "tags": ["ragstack", "triton", "llm"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "model", "label": "Model", "type": "query", "datasource": DS,
             "query": {"query": "label_values(nv_inference_count, model)", "refId": "models"},
             "definition": "label_values(nv_inference_count, model)", "refresh": 2, "multi": True,
             "includeAll": True, "current": {"text": "All", "value": "$__all"}, "sort": 1, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date, write nothing")
    args = ap.parse_args()
    text = render()
    if OUT.exists() and OUT.read_text(encoding="utf-8") == text:
        return 0
    if args.check:
        print(f"out of date: {OUT} (run {Path(__file__).name})")
        return 1
    OUT.write_text(text, encoding="utf-8")
    print(f"written: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
