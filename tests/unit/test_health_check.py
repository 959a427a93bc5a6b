"""tools/health_check.py against a fake Triton (http.server on 127.0.0.1): parsing, thresholds, exit codes."""
import http.server
import importlib.util
import io
import json
import socket
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("health_check", ROOT / "tools" / "health_check.py")
hc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hc)


def triton_metrics(success: dict, failure: dict, queue_us: dict, llm_queue: dict = None) -> str:
    """Metrics text in Triton's format; llm_queue: {model: (sum_us, count)}."""
    lines = ["# HELP nv_inference_request_success Number of successful inference requests",
             "# TYPE nv_inference_request_success counter"]
    lines += [f'nv_inference_request_success{{model="{m}",version="1"}} {v}' for m, v in success.items()]
    lines += ["# TYPE nv_inference_request_failure counter"]
    for m, v in failure.items():   # Triton splits failures by reason
        lines += [f'nv_inference_request_failure{{model="{m}",reason="BACKEND",version="1"}} {v / 2}',
                  f'nv_inference_request_failure{{model="{m}",reason="REJECTED",version="1"}} {v / 2}']
    lines += [f'nv_inference_queue_duration_us{{model="{m}",version="1"}} {v}' for m, v in queue_us.items()]
    for m, (total, count) in (llm_queue or {}).items():
        lines += [f'llm_queue_delay_us_bucket{{model="{m}",le="+Inf"}} {count}',
                  f'llm_queue_delay_us_sum{{model="{m}"}} {total}', f'llm_queue_delay_us_count{{model="{m}"}} {count}']
    lines.append('nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5')
    return "\n".join(lines) + "\n"


class FakeTriton:
    """Answers Triton's readiness endpoints and serves one metrics text per scrape (the last one repeats)."""

    def __init__(self, metrics: list, server_ready=True, models_ready=None):
        self.metrics, self.server_ready = list(metrics), server_ready
        self.models_ready = models_ready or {}
        self.paths = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                if self.path == "/v2/health/ready":
                    code, body = (200 if outer.server_ready else 400), b""
                elif self.path.startswith("/v2/models/") and self.path.endswith("/ready"):
                    name = self.path.split("/")[3]
                    code, body = (200 if outer.models_ready.get(name) else 400), b""
                elif self.path == "/metrics":
                    text = outer.metrics.pop(0) if len(outer.metrics) > 1 else outer.metrics[0]
                    code, body = 200, text.encode()
                else:
                    code, body = 404, b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(*args, **kwargs):
        servers.append(FakeTriton(*args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def args_for(server, *extra):
    return hc.parse_args(["--url", server.url, "--metrics-url", f"{server.url}/metrics", "--interval", "0",
                          *extra])


# --------------------------------------------------------------------------------------------- parsing
def test_parse_metrics_text_format():
    text = ('# HELP x A help line\n# TYPE x counter\n'
            'x{model="a",version="1"} 12\n'
            'x{version="1",model="b"} 3.5e3 1700000000000\n'
            'hist_bucket{le="+Inf",model="a"} 7\n'
            'weird{path="C:\\\\dir",msg="say \\"hi\\"",brace="}"} 1\n'
            'no_labels 4\n'
            'bad line here\n'
            'nan_value NaN\n')
    s = hc.parse_metrics(text)
    assert s[("x", (("model", "a"), ("version", "1")))] == 12
    assert s[("x", (("model", "b"), ("version", "1")))] == 3500        # label order and timestamp ignored
    assert s[("hist_bucket", (("le", "+Inf"), ("model", "a")))] == 7
    assert s[("weird", (("brace", "}"), ("msg", 'say "hi"'), ("path", "C:\\dir")))] == 1
    assert s[("no_labels", ())] == 4
    assert hc.sum_by(s, "x") == {"a": 12, "b": 3500}
    assert len(s) == 6


# ------------------------------------------------------------------------------------------ thresholds
def test_error_rate_and_triton_queue_delay_over_the_window():
    prev = hc.parse_metrics(triton_metrics({"gen": 1000, "emb": 500}, {"gen": 0, "emb": 0},
                                           {"gen": 1_000_000, "emb": 100_000}))
    cur = hc.parse_metrics(triton_metrics({"gen": 1099, "emb": 600, "idle": 0}, {"gen": 1, "emb": 2, "idle": 0},
                                          {"gen": 1_000_000 + 99 * 2500, "emb": 100_000 + 100 * 2501}))
    r = hc.evaluate_metrics(cur, prev, max_queue_delay_us=2500, max_error_rate=0.01)
    assert r["queue_delay_source"] == "nv_inference_queue_duration_us"
    assert r["queue_delay_us"] == {"gen": 2500.0, "emb": 2501.0}       # per successful request, this window
    assert r["error_rate"] == {"gen": 0.01, "emb": pytest.approx(2 / 102)}   # idle: no traffic, no rate
    # at the threshold is fine, over it is a breach
    assert r["breaches"] == ["queue delay 2501 us > 2500 us on emb", "error rate 1.96% > 1.00% on emb"]


def test_stack_histogram_is_preferred_and_first_round_uses_totals():
    cur = hc.parse_metrics(triton_metrics({"gen": 10}, {"gen": 0}, {"gen": 10 * 9000},
                                          llm_queue={"gen": (10 * 2400, 10)}))
    r = hc.evaluate_metrics(cur, None, 2500, 0.01)
    assert r["queue_delay_source"] == "llm_queue_delay_us"
    assert r["queue_delay_us"] == {"gen": 2400.0} and r["breaches"] == []


def test_counter_reset_counts_from_zero():
    prev = hc.parse_metrics(triton_metrics({"gen": 5000}, {"gen": 10}, {"gen": 5_000_000}))
    cur = hc.parse_metrics(triton_metrics({"gen": 97}, {"gen": 3}, {"gen": 97 * 100}))   # server restarted
    r = hc.evaluate_metrics(cur, prev, 2500, 0.01)
    assert r["error_rate"] == {"gen": 0.03} and r["queue_delay_us"] == {"gen": 100.0}


# ----------------------------------------------------------------------------------- rounds and exits
def test_rounds_against_a_fake_server(fake):
    healthy = triton_metrics({"gen": 100}, {"gen": 0}, {"gen": 100 * 1000})
    slow = triton_metrics({"gen": 200}, {"gen": 0}, {"gen": 100 * 1000 + 100 * 4000})
    server = fake([healthy, slow], models_ready={"gen": True, "embed": True})
    log = io.StringIO()
    slept = []
    report = hc.run(args_for(server, "--models", "gen,embed", "--rounds", "2"), sleep=slept.append, log=log)
    assert slept == [0.0]
    assert [r["status"] for r in report["rounds"]] == ["ready", "degraded"]
    assert report["status"] == "degraded" and hc.EXIT_CODES[report["status"]] == 2
    assert report["rounds"][1]["metrics"]["queue_delay_us"] == {"gen": 4000.0}
    assert report["thresholds"] == {"max_queue_delay_us": 2500, "max_error_rate": 0.01}   # from the policy
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("round 1 ") and " READY server=ok gen=ok embed=ok queue_delay_us=1000us(gen)" \
        in lines[0]
    assert "DEGRADED" in lines[1] and "queue delay 4000 us > 2500 us on gen" in lines[1]
    assert {"/v2/health/ready", "/v2/models/gen/ready", "/v2/models/embed/ready", "/metrics"} <= set(server.paths)


def test_model_not_ready_is_exit_1(fake, capsys):
    server = fake([triton_metrics({}, {}, {})], models_ready={"gen": True})
    code = hc.main(["--url", server.url, "--metrics-url", f"{server.url}/metrics", "--models", "gen,rerank"])
    out, err = capsys.readouterr()
    assert code == 1
    report = json.loads(out)
    assert report["status"] == "not_ready" and report["rounds"][0]["models"] == {"gen": True, "rerank": False}
    assert "model rerank: 400" in report["rounds"][0]["errors"][0]
    assert "rerank=NOT-READY" in err


def test_server_not_ready_and_unreachable(fake):
    server = fake([triton_metrics({}, {}, {})], server_ready=False)
    report = hc.run(args_for(server), log=io.StringIO())
    assert report["status"] == "not_ready" and report["rounds"][0]["server"] is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    report = hc.run(hc.parse_args(["--url", dead, "--metrics-url", "", "--timeout", "1"]), log=io.StringIO())
    assert report["status"] == "not_ready" and "unreachable" in report["rounds"][0]["errors"][0]
    assert "metrics" not in report["rounds"][0]


def test_ready_without_metrics_endpoint_is_degraded(fake):
    server = fake([triton_metrics({}, {}, {})])
    report = hc.run(hc.parse_args(["--url", server.url, "--metrics-url", f"{server.url}/nometrics"]),
                    log=io.StringIO())
    assert report["status"] == "degraded"
    assert "metrics endpoint" in report["rounds"][0]["metrics"]["breaches"][0]


def test_interrupt_stops_and_reports(fake):
    server = fake([triton_metrics({"gen": 1}, {"gen": 0}, {"gen": 1})])

    def interrupt(_):
        raise KeyboardInterrupt

    report = hc.run(args_for(server, "--rounds", "0", "--max-queue-delay-us", "5"), sleep=interrupt,
                    log=io.StringIO())
    assert len(report["rounds"]) == 1 and report["status"] == "ready"
    assert report["thresholds"]["max_queue_delay_us"] == 5


def test_a_dead_python_stub_is_not_ready_although_triton_says_ready(fake):
    """Triton 2.51 keeps a model with a dead stub ready; the stack's gauge says the truth until the reload."""
    text = triton_metrics({"gen": 10}, {"gen": 0}, {"gen": 1000})
    dead = text + 'llm_model_stub_healthy{model="rag_orchestrator"} 0\nllm_model_stub_healthy{model="ingest"} 1\n'
    healed = text + 'llm_model_stub_healthy{model="rag_orchestrator"} 1\n'
    server = fake([dead, healed], models_ready={"gen": True})
    report = hc.run(args_for(server, "--models", "gen", "--rounds", "2"), sleep=lambda s: None, log=io.StringIO())
    first, second = report["rounds"]
    assert first["server"] and first["models"] == {"gen": True}
    assert first["status"] == "not_ready"
    assert any("dead Python stub (reload pending): rag_orchestrator" in e for e in first["errors"])
    assert second["status"] == "ready"
