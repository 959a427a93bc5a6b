"""The scale-out balancer's health checks (ragstack_dev/scaleout.py) in a real haproxy, against a stand-in replica:
a loopback HTTP server answering /v2/health/ready and a Triton-sized /metrics page. A dead Python stub
(llm_model_stub_healthy 0, which Triton 2.51 does not reflect in /v2/health/ready) takes the replica out of the
rotation and its reload brings it back; so does readiness going to 503."""
import http.server
import threading

import pytest

from ragstack_dev import scaleout as so

PADDING = "".join(f'nv_inference_count{{model="m{i}",version="1"}} {i}\n' for i in range(3000))  # ~130 kB


class FakeReplica:
    def __init__(self):
        self.ready, self.stub = 200, 1
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/v2/health/ready":
                    code, body = state.ready, b""
                elif self.path == "/metrics":
                    code = 200
                    body = (PADDING + "# TYPE llm_model_stub_healthy gauge\n"
                            f'llm_model_stub_healthy{{model="generate"}} {state.stub}\n'
                            'llm_model_stub_healthy{model="embed"} 1\n').encode()
                else:
                    code, body = 404, b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.metrics = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        for s in (self.http, self.metrics):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def close(self):
        for s in (self.http, self.metrics):
            s.shutdown()
            s.server_close()


def test_a_dead_stub_or_unready_server_takes_the_replica_out_and_back(tmp_path):
    if so.haproxy_binary() is None:
        pytest.skip("haproxy is not installed (Debian package 'haproxy'; tools/setup.sh installs it)")
    rep = FakeReplica()
    lb = None
    try:
        lb = so.Haproxy([so.Backend("r1", rep.http.server_address[1], rep.metrics.server_address[1])], tmp_path,
                        inter_ms=100, fall=2, rise=2).start()
        lb.wait_status({"r1": "UP"}, timeout=10)
        rep.stub = 0                                      # the generate stub died
        assert lb.wait_status({"r1": "DOWN"}, timeout=10) < 5
        rep.stub = 1                                      # the model manager reloaded it
        lb.wait_status({"r1": "UP"}, timeout=10)
        rep.ready = 503
        lb.wait_status({"r1": "DOWN"}, timeout=10)
        rep.ready = 200
        lb.wait_status({"r1": "UP"}, timeout=10)
    finally:
        if lb:
            lb.stop()
        rep.close()
