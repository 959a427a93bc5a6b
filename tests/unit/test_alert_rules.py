"""monitoring/: the alert rules (promtool unit tests), the Grafana dashboard and the metric catalogue.

promtool comes from Debian's ``prometheus`` package:
``apt-get install -y --no-install-recommends prometheus`` (puts /usr/bin/promtool on PATH).
The promtool tests are skipped without it; the structural checks below run everywhere.
"""
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH: apt-get install -y --no-install-recommends prometheus")
SEVERITIES = {"warning", "major", "critical"}
METRIC = re.compile(r"\b((?:nv|llm)_[a-z0-9_]+)")

RULES = yaml.safe_load((MON / "alerts.yml").read_text())
ALERTS = [r for g in RULES["groups"] for r in g["rules"] if "alert" in r]
CATALOGUE = {m["name"]: m for m in json.loads((MON / "metrics.json").read_text())["metrics"]}


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("grafana_dashboard", MON / "grafana_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DASHBOARD = json.loads((MON / "grafana-dashboard.json").read_text())
DASHBOARD_EXPRS = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def promtool(*args, cwd=MON):
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# -------------------------------------------------------------------------------------------- promtool
@needs_promtool
def test_rules_are_valid():
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_rules_unit_tests_pass():
    """Each alert fires just over its threshold, stays quiet at or under it, and honours its `for`."""
    r = promtool("test", "rules", "alerts_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e.replace("$model", ".*")} for i, e in enumerate(DASHBOARD_EXPRS)]}]}
    (tmp_path / "q.yml").write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", "q.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ structure
def test_every_alert_has_severity_summary_description():
    for rule in ALERTS:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_is_covered_by_the_rule_tests():
    tests = yaml.safe_load((MON / "alerts_test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert {r["alert"] for r in ALERTS} == tested


def test_thresholds_match_the_specs_and_the_policy():
    policy = json.loads((ROOT / "config" / "runtime_policy.json").read_text())
    queue_us = policy["thresholds"]["max_queue_delay_us"]
    exprs = {(r["alert"], r["labels"]["severity"]): " ".join(r["expr"].split()) for r in ALERTS}
    assert exprs[("GPUUtilisationHigh", "warning")] == "nv_gpu_utilization > 0.90"
    for name in ("GPUMemoryHigh", "ProcessMemoryHigh"):
        assert exprs[(name, "warning")].endswith("> 0.80 <= 0.90")
        assert exprs[(name, "major")].endswith("> 0.90 <= 0.95")
        assert exprs[(name, "critical")].endswith("> 0.95")
    assert exprs[("InferenceErrorRateHigh", "warning")].endswith("> 0.01 <= 0.02")
    assert exprs[("InferenceErrorRateHigh", "critical")].endswith("> 0.02")
    assert exprs[("ModelLoadSlow", "warning")] == "llm_model_load_seconds > 30"
    assert exprs[("QueueDelayP95High", "warning")].endswith(f"> {queue_us}")
    assert exprs[("QueueDelayMeanHigh", "major")].endswith(f"> {queue_us}")
    assert queue_us in CATALOGUE["llm_queue_delay_us"]["buckets"]   # p95 is exact at the threshold
    queue_vs_compute = next(r for r in ALERTS if r["alert"] == "QueueTimeAboveCompute")
    assert queue_vs_compute["for"] == "10m"


def _metrics_in(text: str) -> set:
    names = set()
    for name in METRIC.findall(text):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if CATALOGUE.get(base, {}).get("kind") == "histogram" else name)
    return names


def test_rules_and_dashboard_only_use_catalogued_metrics():
    used = _metrics_in((MON / "alerts.yml").read_text()) | _metrics_in(" ".join(DASHBOARD_EXPRS))
    assert used <= set(CATALOGUE), sorted(used - set(CATALOGUE))
    stages = set(CATALOGUE["llm_stage_latency_us"]["stages"])
    assert stages == {"tokenize", "embed", "search", "rerank", "generate"}


# ------------------------------------------------------------------------------------------- dashboard
def test_dashboard_file_is_generated_and_current():
    assert (MON / "grafana-dashboard.json").read_text() == _dashboard_module().render(), \
        "run monitoring/grafana_dashboard.py"


def test_dashboard_shape():
    d = DASHBOARD
    assert d["schemaVersion"] == 39 and d["uid"] and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in d["panels"]}
    for needed in ("Requests per model", "Error rate per model", "Queue vs compute time per request",
                   "LLM queue delay p50 / p95", "Tokens per second", "Cost per hour", "Per-stage latency p50 / p95",
                   "Models loaded", "GPU memory used", "Process memory vs budget"):
        assert needed in titles
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]
    used = " ".join(DASHBOARD_EXPRS)
    for metric in ("llm_queue_delay_us_bucket", "llm_stage_latency_us_bucket", "llm_tokens_in",
                   "llm_tokens_out", "llm_cost_usd", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "llm_memory_used_bytes", "nv_gpu_memory_used_bytes"):
        assert metric in used
