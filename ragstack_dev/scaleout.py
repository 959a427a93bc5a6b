"""Scale-out on one machine: N Triton replicas on one shared Postgres + pgvector, behind haproxy (Debian).

Used by ``tests/integration/test_scale_out.py`` and ``benchmarks/scale_out.py``. Nothing here balances or
health-checks by itself: haproxy does both, with its own HTTP checks:

* ``GET /v2/health/ready`` on the replica's HTTP port (the Kubernetes readiness probe's endpoint), and
* ``GET /metrics`` on its metrics port, down when any ``llm_model_stub_healthy{...} 0`` sample is present (a dead
  Python stub: Triton 2.51 keeps saying ready; the liveness probe in deploy/k8s catches the same thing).

Both checks run in a hidden per-replica backend (``chk_<name>``) that the serving server ``track``s, because a
check sequence can only name fixed ports. Requests that hit a replica killed under them are retried once on the
other (``retry-on conn-failure empty-response``): safe here because ingest is idempotent (per-document advisory
lock, content hash) and queries are read-only.

Keys (README "Security"): replicas are TritonProcess servers, so they share this process's admin key, writer key and
internal secret (``ragstack_dev.server.access_keys``). The client calls here send ``headers`` on every request;
``headers=None`` sends the operator's (admin key and internal proof: the drill's query path calls ``embed_text`` and
``vector_index``, internal models, directly), ``{}`` sends none.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ragstack.contracts import client as client_io
from ragstack_dev.server import ROOT, TritonProcess, access_keys

# What a replica in the drill loads: the ingest path and a text-level query path (embed_text → vector_index).
REPLICA_MODELS = "ingest embed embed_text vector_index"
STUB_DEAD_REGEX = r"llm_model_stub_healthy\{[^}]*\}[[:space:]]+0(\.0+)?([[:space:]]|$)"   # no spaces: haproxy splits on them


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backend:
    name: str
    http_port: int
    metrics_port: int


def haproxy_config(backends: list[Backend], port: int, stats_port: int, inter_ms: int = 500, fall: int = 2,
                   rise: int = 2, timeout_s: int = 60, retry: bool = True) -> str:
    """haproxy.cfg: one HTTP frontend, round-robin over the replicas, checks as in the module docstring."""
    lines = [
        "global",
        "    maxconn 256",
        # The stub check reads /metrics from the buffer: Triton's page with every model loaded is ~100 kB.
        "    tune.bufsize 262144",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        f"    timeout client {timeout_s}s",
        f"    timeout server {timeout_s}s",
        "    timeout check 2s",
        "frontend triton",
        f"    bind 127.0.0.1:{port}",
        "    default_backend replicas",
        "frontend stats",
        f"    bind 127.0.0.1:{stats_port}",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 1s",
        "backend replicas",
        "    balance roundrobin",
        "    option http-buffer-request",
    ]
    if retry:   # off in the benchmark's second drill, to count what a client sees without it
        lines += ["    retries 2", "    option redispatch 1", "    retry-on conn-failure empty-response response-timeout"]
    lines += [f"    server {b.name} 127.0.0.1:{b.http_port} track chk_{b.name}/{b.name}" for b in backends]
    for b in backends:
        lines += [
            f"backend chk_{b.name}",
            "    option httpchk",
            f"    http-check connect port {b.http_port}",
            "    http-check send meth GET uri /v2/health/ready",
            "    http-check expect status 200",
            f"    http-check connect port {b.metrics_port}",
            "    http-check send meth GET uri /metrics",
            f"    http-check expect ! rstring {STUB_DEAD_REGEX}",
            f"    server {b.name} 127.0.0.1:{b.http_port} check inter {inter_ms} fall {fall} rise {rise}",
        ]
    return "\n".join(lines) + "\n"


class Haproxy:
    """haproxy in the foreground (``-db``) as a child of this process, on loopback."""

    def __init__(self, backends: list[Backend], workdir: Path, name: str = "haproxy", **config):
        self.port, self.stats_port = _free_port(), _free_port()
        self.workdir = Path(workdir)
        self.name = name
        self.cfg = self.workdir / f"{name}.cfg"
        self.cfg.write_text(haproxy_config(backends, self.port, self.stats_port, **config))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> Haproxy:
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-f", str(self.cfg)], check=False, capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"haproxy rejected {self.cfg}: {check.stdout}{check.stderr}")
        self._log = open(self.workdir / f"{self.name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.status()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("haproxy did not start")

    def status(self) -> dict:
        """{server name: 'UP'|'DOWN'|...} of the serving backend, from haproxy's stats CSV."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"] for row in rows
                    if row["pxname"] == "replicas" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def counters(self) -> dict:
        """haproxy's own per-server counters of the serving backend: sessions, response errors, retries,
        redispatches, server aborts (what happened to the requests a killed replica held)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2) as r:
            rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
            keys = ("stot", "eresp", "econ", "wretr", "wredis", "srv_abrt", "hrsp_5xx")
            return {row["svname"]: {k: int(row[k] or 0) for k in keys} for row in rows
                    if row["pxname"] == "replicas" and row["svname"] != "FRONTEND"}

    def wait_status(self, want: dict, timeout: float = 60) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            st = self.status()
            if all(st.get(k, "").startswith(v) for k, v in want.items()):
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"haproxy status {self.status()} != {want}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self._log.close()


def replica(models: Path, name: str, data: Path, dsn: str, env: dict | None = None,
            load_models: str = REPLICA_MODELS) -> TritonProcess:
    """One reference-profile replica on the shared store (its own data folder: nothing else is kept there)."""
    data.mkdir(parents=True, exist_ok=True)
    return TritonProcess(models, load_models=load_models, log_path=ROOT / "build" / "logs" / f"scale-{name}.log",
                         env={"RAG_DATA_PATH": str(data), "RAG_VECTOR_STORE": "pgvector", "RAG_PG_DSN": dsn,
                              **(env or {})})


def kill9(proc: TritonProcess) -> None:
    """kill -9 the replica's tritonserver (the launcher execs it when a DSN is given: it is the Popen's pid)."""
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def reap(proc: TritonProcess) -> None:
    """After a kill -9: end what is left of that replica's process group (its stubs), by its id."""
    try:
        os.killpg(proc.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- client calls
def _infer(client, model, values: dict, output: str, headers=None):
    import tritonclient.http as httpclient
    if headers is None:
        headers = access_keys().headers()
    result = client.infer(model, client_io.infer_inputs(httpclient, model, values),
                          outputs=client_io.requested_outputs(httpclient, [output]),
                          headers=dict(headers) if headers else None)
    return result.as_numpy(output)


def ingest(client, doc_ids, texts, collection="scale", headers=None) -> dict:
    out = _infer(client, "ingest", {"doc_ids": doc_ids, "texts": texts, "collection": collection, "op": "upsert"},
                 "report", headers)
    return json.loads(out.reshape(-1)[0])


def index_op(client, op, collection="scale", payload=None, headers=None, **tensors) -> dict:
    values = {"op": op, "collection": collection, "payload": None if payload is None else json.dumps(payload),
              **tensors}
    return json.loads(_infer(client, "vector_index", values, "result", headers).reshape(-1)[0])


def query(client, text, collection="scale", top_k=3, headers=None) -> list:
    """Retrieval through the replica: embed_text (query side) → vector_index search; the hits."""
    vec = _infer(client, "embed_text", {"text": text, "input_type": "query"}, "embedding", headers)
    return index_op(client, "search", collection, headers=headers, query_vector=vec.reshape(-1), top_k=top_k)["hits"]


def doc_text(doc_id: str) -> str:
    return f"Document {doc_id}: the scale-out drill wrote this text about replica {doc_id} and shared storage."


# ------------------------------------------------------------------------------------------- load
@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    acked: list = field(default_factory=list)          # doc ids whose ingest was acknowledged
    events: list = field(default_factory=list)         # (monotonic t, ok: bool, latency_s)
    errors: list = field(default_factory=list)


def run_load(url: str, clients: int, duration: float, kind: str = "ingest", prefix: str = "load",
             headers=None, collection: str = "scale", on_tick=None) -> LoadResult:
    """``clients`` threads, each with its own HTTP client, for ``duration`` s; ``kind`` ingest (a new document
    per request) or query. Every outcome is recorded with its time."""
    import tritonclient.http as httpclient
    res, lock = LoadResult(), threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(w):
        client = httpclient.InferenceServerClient(url, network_timeout=60, connection_timeout=5)
        i = 0
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            doc = f"{prefix}-{w}-{i}"
            i += 1
            try:
                if kind == "ingest":
                    report = ingest(client, [doc], [doc_text(doc)], collection, headers)
                    good = report["documents"][0]["status"] in ("created", "updated", "unchanged")
                else:
                    good = isinstance(query(client, f"replica {doc}", collection, headers=headers), list)
                err = None
            except Exception as e:  # noqa: BLE001 - every failure is counted, not raised
                good, err = False, f"{type(e).__name__}: {str(e)[:200]}"
            t1 = time.monotonic()
            with lock:
                res.events.append((t1, good, t1 - t0))
                if good:
                    res.ok += 1
                    if kind == "ingest":
                        res.acked.append(doc)
                else:
                    res.failed += 1
                    res.errors.append(err)
        client.close()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(clients)]
    for t in threads:
        t.start()
    if on_tick:
        on_tick()
    for t in threads:
        t.join()
    return res


def kill_drill(balancer: Haproxy, victim: TritonProcess, victim_name: str, clients: int, duration: float,
               kill_after: float, headers=None, prefix: str = "drill") -> dict:
    """Load through the balancer; kill -9 one replica after ``kill_after`` s; when haproxy marks it DOWN;
    failures before/during/after detection. Returns the figures and the acknowledged doc ids."""
    marks = {}

    def killer():
        time.sleep(kill_after)
        marks["kill"] = time.monotonic()
        kill9(victim)
        marks["detect_s"] = balancer.wait_status({victim_name: "DOWN"}, timeout=30)
        marks["down"] = marks["kill"] + marks["detect_s"]

    t = threading.Thread(target=killer, daemon=True)
    before = balancer.counters()
    res = run_load(balancer.url, clients, duration, "ingest", prefix, headers, on_tick=t.start)
    t.join(40)
    after = balancer.counters()
    haproxy_counters = {sv: {k: after[sv][k] - before.get(sv, {}).get(k, 0) for k in after[sv]} for sv in after}
    kill_t, down_t = marks["kill"], marks["down"]
    failed_before = sum(1 for ts, ok, _ in res.events if not ok and ts < kill_t)
    # "during detection": failed after the kill, having started before haproxy marked the replica down (the ones
    # in flight on it, and any sent to it before the check noticed).
    failed_during = sum(1 for ts, ok, lat in res.events if not ok and ts >= kill_t and ts - lat <= down_t)
    # "after": requests that *started* after haproxy marked the replica down.
    failed_after = sum(1 for ts, ok, lat in res.events if not ok and ts - lat > down_t)
    ok_after = sum(1 for ts, ok, lat in res.events if ok and ts - lat > down_t)
    return {"requests": res.ok + res.failed, "ok": res.ok, "failed": res.failed,
            "failed_before_kill": failed_before, "failed_during_detection": failed_during,
            "failed_after_detection": failed_after, "ok_after_detection": ok_after,
            "detect_s": round(marks["detect_s"], 3), "haproxy_counters": haproxy_counters, "errors": sorted(set(res.errors))[:5],
            "acked": res.acked, "throughput_rps": round(res.ok / duration, 2),
            "events": [(round(ts - kill_t, 3), ok, round(lat, 4)) for ts, ok, lat in res.events]}


def missing_docs(client, doc_ids, collection="scale", headers=None) -> list:
    return [d for d in doc_ids
            if index_op(client, "get", collection, payload={"doc_id": d}, headers=headers).get("document") is None]
