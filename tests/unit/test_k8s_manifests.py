"""deploy/k8s: schema-valid against the Kubernetes 1.37 API (kubernetes-validate, schemas inside its wheel),
clean under a policy linter (checkov), the PrometheusRule equal to monitoring/alerts.yml and accepted by promtool,
and the pieces that must agree (HPA metric = adapter rule, probes, Secrets, selectors) agreeing.

The checkers live in .venv-lint (tools/setup.sh, requirements-lint.txt); the tests that need them skip, saying so,
when it is absent."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
LINT_BIN = ROOT / ".venv-lint" / "bin"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}        # CRDs: no schema in the Kubernetes API's


def docs():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return kust, out


def tool(name):
    path = LINT_BIN / name
    if not path.exists():
        pytest.skip(f"{path} missing: run tools/setup.sh (requirements-lint.txt)")
    return str(path)


def test_every_builtin_resource_is_valid_against_the_kubernetes_schemas(tmp_path):
    kv = tool("kubernetes-validate")
    kust, _ = docs()
    files = [str(K8S / f) for f in kust["resources"]]
    r = subprocess.run([kv, "--strict", "-k", "1.37.0", *files], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = re.findall(r"passed for resource (\S+)", r.stdout + r.stderr)
    assert len(passed) == sum(1 for f in kust["resources"] if "monitor" not in f and "prometheusrule" not in f)
    # The validator does reject what the API would: an unknown field and a wrong type.
    for field, value, word in ((("spec", "template", "spec", "containers", 0, "livenesProbe"), {}, "livenesProbe"),
                               (("spec", "replicas"), "two", "replicas")):
        dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
        node = dep
        for key in field[:-1]:
            node = node[key]
        node[field[-1]] = value
        bad = tmp_path / f"bad-{word}.yaml"
        bad.write_text(yaml.safe_dump(dep))
        r = subprocess.run([kv, "--strict", str(bad)], check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and word in r.stdout + r.stderr, r.stdout + r.stderr


def test_policy_linter_passes_with_only_the_documented_skips():
    checkov = tool("checkov")
    r = subprocess.run([checkov, "-d", str(K8S), "--framework", "kubernetes", "--compact",
                        "--skip-download", "-o", "json"], check=False, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT / "build"), "BC_SKIP_MAPPING": "TRUE"})
    import json
    report = json.loads(r.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and r.returncode == 0, failed
    assert summary["passed"] >= 50
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    _, objs = docs()
    ann = objs[("Deployment", "ragstack-triton")]["metadata"]["annotations"]
    assert skipped == {v.split("=")[0] for k, v in ann.items() if k.startswith("checkov.io/skip")}


def test_prometheus_rule_is_monitoring_alerts_and_promtool_accepts_it(tmp_path):
    _, objs = docs()
    rule = objs[("PrometheusRule", "ragstack-alerts")]
    alerts = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], "rerun tools/gen_k8s_rules.py"
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus; tools/setup.sh installs it)")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_pieces_agree():
    kust, objs = docs()
    dep = objs[("Deployment", "ragstack-triton")]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    # Service, PDB, ServiceMonitor select the pods; the ServiceMonitor scrapes a named Service port.
    svc = objs[("Service", "ragstack-triton")]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert objs[("PodDisruptionBudget", "ragstack-triton")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sm = objs[("ServiceMonitor", "ragstack-triton")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    # Probes: readiness/startup on /v2/health/ready; liveness runs the health check that sees dead stubs.
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    live = " ".join(c["livenessProbe"]["exec"]["command"])
    assert "tools/health_check.py" in live and "-ne 1" in live
    assert "COPY tools/health_check.py" in (ROOT / "Dockerfile").read_text()
    assert "llm_model_stub_healthy" in (ROOT / "tools" / "health_check.py").read_text()
    assert c["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] > int(re.search(r"--exit-timeout-secs=(\d+)",
                                                                 " ".join(c["args"])).group(1))
    # GPU, /dev/shm, engines read-only from the PVC (and checked by the init container).
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert vols[mounts["/workspace/engines"]]["persistentVolumeClaim"]["claimName"] == "ragstack-engines"
    assert pod["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/workspace/engines"
    # Secrets, not literals: the DSN and the admin key come from the generated Secret (the key as a mounted file,
    # which the launcher turns into Triton's restricted-API flags: none of those may be in the args as well).
    env = {e["name"]: e for e in c["env"]}
    assert env["RAG_PG_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "ragstack-secrets", "key": "pg-dsn"}
    key_file = Path(env["RAG_ADMIN_KEY_FILE"]["value"])
    assert vols[mounts[str(key_file.parent)]]["secret"]["secretName"] == "ragstack-secrets"
    assert key_file.name == "admin-key"
    assert not [a for a in c.get("args", []) if "restricted" in a]
    assert not [e for e in c["env"] if "ADMIN_KEY" in e["name"] and "valueFrom" in e]
    gen = {g["name"]: g for g in kust["secretGenerator"]}["ragstack-secrets"]
    assert {f.split("=")[0] for f in gen["files"]} == {"pg-dsn", "admin-key"}
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()
    # The HPA's metric is the one the adapter rule serves, computed from the stack's queue histogram.
    hpa = objs[("HorizontalPodAutoscaler", "ragstack-triton")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [metric]
    assert "llm_queue_delay_us_sum" in rules[0]["metricsQuery"]
    catalogue = (ROOT / "monitoring" / "metrics.json").read_text()
    assert '"llm_queue_delay_us"' in catalogue
    # The PDB leaves a replica up at the HPA's floor.
    assert hpa["spec"]["minReplicas"] - objs[("PodDisruptionBudget", "ragstack-triton")]["spec"]["maxUnavailable"] >= 1


def test_haproxy_config_of_the_scale_out_test_is_valid(tmp_path):
    sys.path.insert(0, str(ROOT))
    from ragstack_dev import scaleout as so
    binary = so.haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (tools/setup.sh installs the Debian package)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(so.haproxy_config([so.Backend("r1", 18000, 18002), so.Backend("r2", 18010, 18012)], 18100, 18101))
    r = subprocess.run([binary, "-c", "-f", str(cfg)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = cfg.read_text()
    assert "uri /v2/health/ready" in text and "uri /metrics" in text and "llm_model_stub_healthy" in text
    # The regex haproxy uses matches a dead stub's sample and not a healthy one.
    regex = so.STUB_DEAD_REGEX.replace("[[:space:]]", r"\s")
    assert re.search(regex, 'llm_model_stub_healthy{model="generate"} 0\n')
    assert not re.search(regex, 'llm_model_stub_healthy{model="generate"} 1\n')
