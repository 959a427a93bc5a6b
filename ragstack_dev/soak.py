"""Soak load against a running tritonserver: mixed clients, outcome classes, stub deaths, heals, RSS over time.

The core of ``benchmarks/soak.py`` (which starts a server, ingests the corpus, writes results/soak.json and a plot)
and of ``tests/integration/test_soak.py`` (a short run in the test suite). Client-side only: it imports no Triton
Python-backend code, and talks to the server over loopback only.

Request kinds (each request ends in exactly one outcome class):

* good requests, expected ``ok``: ``rag_http_<task>`` / ``rag_grpc_<task>`` for the four tasks (``answer``,
  ``generate_json``, ``rank_candidates``, ``judge``; rank_candidates and half of judge with caller ``documents``),
  ``rag_stream_grpc`` (gRPC streaming), ``generate_http`` (``/v2/models/rag/generate``), ``generate_stream_sse``
  (``/v2/models/rag_stream/generate_stream`` read to the end), ``ingest_upsert`` / ``ingest_delete`` (small
  documents in a collection of their own, over HTTP and gRPC);
* cancellations, expected ``cancelled`` (``ok`` when the answer came first): ``cancel_grpc_deadline`` (a short
  client deadline), ``cancel_grpc_stream`` (stream cancelled after the first response), ``cancel_sse_disconnect``
  (SSE connection closed after the first event);
* bad requests, expected ``client_error`` (HTTP 4xx / gRPC INVALID_ARGUMENT or a refusal): ``bad_rag_http``,
  ``bad_rag_grpc``, ``bad_generate``, ``bad_ingest`` (each a catalogue of malformed inputs).

Outcome classes: ``ok``, ``client_error``, ``cancelled``, ``server_error`` (5xx, INTERNAL, UNAVAILABLE, UNKNOWN, a
"Stub process ... is not healthy" message, a traceback), ``hung`` (no answer within the client timeout) and
``transport`` (connection refused/reset, a broken stream); ``frontend_500`` is Triton's own HTTP 500 on a
malformed request body (not JSON, or not the KServe request shape: see FRONTEND_500). A bad request that succeeds
is ``ok`` on its kind and is listed under ``unexpected``; so is a good request refused as a client error.

Every acknowledged ingest goes into a ledger; at the end every acknowledged, not-deleted document must still be in
the index (``vector_index`` op ``get``) and every acknowledged delete must have stayed deleted.
"""
from __future__ import annotations

import collections
import dataclasses
import http.client
import json
import os
import queue
import random
import re
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ragstack.contracts import client as client_io
from ragstack.contracts.tensors import bytes_array

TASKS = ("answer", "generate_json", "rank_candidates", "judge")
OUTCOMES = ("ok", "client_error", "cancelled", "server_error", "hung", "transport", "frontend_500")
# Triton 2.51's own HTTP frontend answers a body that is not a request document (not JSON: "failed to parse the
# request JSON buffer"; JSON of the wrong shape: "Unable to parse 'inputs'") with 500, before any model sees it. A
# server-class answer to a client mistake, but not one the stack's models can change: those malformed-body requests
# get a class of their own (reported, not a criterion) unless strict_frontend is set.
FRONTEND_500 = "Triton's HTTP frontend answers a malformed request body with 500 before any model sees it"
STUB_NAME = "triton_python_backend_stub"
INSTANCE_RE = re.compile(r"^(?P<model>.+)_(?P<group>\d+)_(?P<index>\d+)$")
# Server-log lines that mean a stub (or the server) died or was found dead.
DEATH_LOG_RE = re.compile(r"not healthy|unhealthy|Segmentation fault|double free|malloc\(\)|free\(\)|"
                          r"Reference count error|lock_exception|core dumped|Aborted|terminate called|"
                          r"Stub process .* (?:exited|died|killed)", re.I)
UNLOAD_LOG_RE = re.compile(r"successfully unloaded '([^']+)'")
SERVER_ERROR_MARKERS = ("not healthy", "Traceback", "internal error", "Stub process", "RecursionError",
                        "JSONDecodeError", "has no available versions", "unknown model")
# Messages that mean the server could not serve a model it has (dead stub; a model being reloaded: "Request for
# unknown model: 'rag' has no available versions"). No soak request names a model the server lacks, so these are
# server errors whatever status code carries them.
UNAVAILABLE_MARKERS = ("not healthy", "Stub process", "has no available versions", "unknown model")
GRPC_CLIENT_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION", "ALREADY_EXISTS",
                     "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED"}
GRPC_CANCEL_CODES = {"CANCELLED", "DEADLINE_EXCEEDED"}
SMALL_SCHEMA = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 999}},
                "required": ["hours"], "additionalProperties": False}
QUESTIONS = ["How long is a primary on-call shift?", "What is the hotel limit?", "Who approves a release?",
             "How much GPU quota do I get?", "What is the Pro plan rate limit?", "When are stipends paid?"]
CALLER_DOCS = ["Shifts last a week.", "The office has a gym.", "Stipends are paid monthly.",
               "Releases need two approvals."]


@dataclasses.dataclass
class SoakConfig:
    http_url: str                         # host:port
    grpc_url: str
    identity: dict                        # the engine-identity headers the policy requires
    metrics_url: Optional[str] = None     # http://host:port/metrics
    server_pid: Optional[int] = None      # tritonserver's PID (RSS, stubs); None: no process sampling
    server_log: Optional[Path] = None     # scanned for "not healthy" and crash lines
    clients: int = 16
    duration_s: float = 1800.0
    timeout_s: float = 120.0              # per request; longer counts as hung
    bad_fraction: float = 0.15
    cancel_fraction: float = 0.08
    ingest_fraction: float = 0.10
    sample_s: float = 5.0
    progress_s: float = 20.0
    warmup_fraction: float = 0.2          # RSS growth = last sample vs the sample at this fraction of the run
    rss_growth_limit: float = 0.05
    query_collection: str = "corpus"      # what the good rag requests search
    ingest_collection: str = "soak_scratch"
    max_live_docs_per_client: int = 8     # deletes keep the scratch collection bounded
    max_tokens: Optional[int] = None      # None: the task policy's default
    strict_frontend: bool = False         # count Triton's own 500 on unparseable JSON bodies as server errors
    seed: int = 0
    api_key: Optional[str] = None         # a writer (or admin) key for ingest (X-Api-Key; ragstack.governance.access)
    # The operator's headers for the ledger check, which reads the internal vector_index directly: the internal
    # proof (x-ragstack-internal) of the server under test, or none if the server opens vector_index
    # (RAG_DIRECT_MODELS). ragstack_dev.server.AccessKeys.headers() for a server this process started.
    operator_headers: Optional[dict] = None


# ------------------------------------------------------------------------------------------- recording
class Recorder:
    """Thread-safe outcome log: per kind and class counts, latencies, a few examples, a time series."""

    def __init__(self, t0: float, bucket_s: float = 10.0):
        self.t0, self.bucket_s = t0, bucket_s
        self.lock = threading.Lock()
        self.counts = collections.defaultdict(collections.Counter)     # kind -> outcome -> n
        self.latency = collections.defaultdict(list)                   # kind -> [s] (every outcome but hung)
        self.latency_ok = collections.defaultdict(list)                # kind -> [s] (ok only)
        self.examples = collections.defaultdict(list)                  # "kind/outcome" -> [detail]
        self.unexpected = collections.Counter()                        # "kind/outcome" -> n
        self.timeline = collections.defaultdict(collections.Counter)   # bucket -> outcome -> n
        self.in_flight = 0

    def record(self, kind: str, expected: str, outcome: str, latency_s: float, detail: str = "") -> None:
        now = time.time()
        with self.lock:
            self.counts[kind][outcome] += 1
            if outcome != "hung":
                self.latency[kind].append(latency_s)
            if outcome == "ok":
                self.latency_ok[kind].append(latency_s)
            if outcome not in ("ok", expected) and not (expected == "cancelled" and outcome == "ok"):
                self.unexpected[f"{kind}/{outcome}"] += 1
            key = f"{kind}/{outcome}"
            if outcome != "ok" and len(self.examples[key]) < 3 and detail:
                self.examples[key].append(detail[:400])
            self.timeline[int((now - self.t0) // self.bucket_s)][outcome] += 1

    def totals(self) -> collections.Counter:
        with self.lock:
            out = collections.Counter()
            for c in self.counts.values():
                out.update(c)
            return out


def percentiles(values: list) -> dict:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def pct(q):
        return round(1000 * s[min(len(s) - 1, int(round(q * (len(s) - 1))))], 1)
    return {"n": len(s), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(1000 * s[-1], 1)}


# --------------------------------------------------------------------------------------- classification
def classify_http(status: int, body: str, expected: str, frontend: bool = False) -> str:
    """``frontend``: the body was not a valid request document (not JSON, or not the KServe shape), so Triton's
    HTTP frontend answers it before any model sees it; its 500 there is ``frontend_500``."""
    if 200 <= status < 300:
        return "ok"
    if status == 500 and frontend:
        return "frontend_500"
    if any(m in body for m in UNAVAILABLE_MARKERS):
        return "server_error"
    if 400 <= status < 500:
        return "client_error"
    return "server_error"


def classify_message(msg: str) -> str:
    """A stream error without a status code (gRPC stream responses carry only a message)."""
    if any(m.lower() in msg.lower() for m in SERVER_ERROR_MARKERS):
        return "server_error"
    if any(m in msg.lower() for m in ("failed to connect", "connection refused", "socket closed",
                                       "connection reset", "broken pipe")):
        return "transport"
    return "client_error"


def classify_exception(exc: BaseException, expected: str) -> str:
    """tritonclient / socket exceptions -> outcome class."""
    import socket

    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        msg = str(exc.message() if hasattr(exc, "message") else exc) or str(exc)
        code = status.replace("StatusCode.", "")
        if any(m in msg for m in UNAVAILABLE_MARKERS):
            return "server_error"
        if code in GRPC_CANCEL_CODES:
            if expected == "cancelled":
                return "cancelled"
            return "hung" if code == "DEADLINE_EXCEEDED" else "cancelled"
        if code in GRPC_CLIENT_CODES or status.startswith("4"):
            return "client_error"
        if code == "UNAVAILABLE" and any(m in msg.lower() for m in ("failed to connect", "connection refused",
                                                                     "socket closed", "connection reset")):
            return "transport"
        if code or status:
            return "server_error"
        return classify_message(msg)
    if isinstance(exc, (socket.timeout, TimeoutError, queue.Empty)):
        return "hung"
    if isinstance(exc, (ConnectionError, http.client.HTTPException, OSError)):
        return "transport"
    return "server_error"


# ------------------------------------------------------------------------------------------ the clients
def _grpc_inputs(arrays: dict) -> list:
    """As given: the soak sends malformed requests on purpose."""
    return client_io.inputs_as_given("grpc", arrays)


def _json_inputs(arrays: dict) -> list:
    out = []
    for name, arr in arrays.items():
        data = arr.reshape(-1).tolist()
        if arr.dtype == np.object_:
            data = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in data]
        out.append({"name": name, "shape": list(arr.shape), "datatype": client_io.datatype(arr), "data": data})
    return out


class Worker:
    """One client thread: picks a request kind at random, sends it, records its outcome, until the deadline."""

    def __init__(self, soak: "Soak", index: int):
        self.soak, self.cfg, self.index = soak, soak.cfg, index
        self.rng = random.Random(soak.cfg.seed * 1000 + index)
        self.live_docs: dict = {}      # doc_id -> text (acknowledged, not deleted)
        self.n_docs = 0
        self._grpc = None
        self.current: Optional[tuple] = None   # (kind, expected, start) of the request in flight
        self.abandoned = False

    # --------------------------------------------------------------------------------- plumbing
    def grpc(self):
        if self._grpc is None:
            import tritonclient.grpc as grpcclient
            self._grpc = grpcclient.InferenceServerClient(self.cfg.grpc_url)
        return self._grpc

    def close(self):
        if self._grpc is not None:
            try:
                self._grpc.close()
            except Exception:  # noqa: BLE001
                pass

    def identity(self, grpc: bool = False) -> dict:
        return {k.lower(): v for k, v in self.cfg.identity.items()} if grpc else dict(self.cfg.identity)

    def key_headers(self) -> Optional[dict]:
        return {"x-api-key": self.cfg.api_key} if self.cfg.api_key else None

    def http_post(self, path: str, body, headers: Optional[dict] = None, timeout: Optional[float] = None):
        host, port = self.cfg.http_url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout or self.cfg.timeout_s)
        try:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def rag_arrays(self, task: str, query: Optional[str] = None, documents=None, **extra) -> dict:
        arrays = {"query": bytes_array([query or self.rng.choice(QUESTIONS)]).reshape(1, 1),
                  "task": bytes_array([task]).reshape(1, 1),
                  "collection": bytes_array([self.cfg.query_collection]).reshape(1, 1),
                  "top_k": np.array([[6]], np.int32), "top_n": np.array([[2]], np.int32)}
        if self.cfg.max_tokens:
            arrays["max_tokens"] = np.array([[self.cfg.max_tokens]], np.int32)
        if task == "generate_json":
            arrays["schema"] = bytes_array([json.dumps(SMALL_SCHEMA)]).reshape(1, 1)
        if documents is None and (task == "rank_candidates" or (task == "judge" and self.rng.random() < 0.5)):
            documents = self.rng.sample(CALLER_DOCS, 3)
        if documents is not None:
            arrays["documents"] = bytes_array(documents).reshape(1, -1)
        for k, v in extra.items():
            if v is None:
                arrays.pop(k, None)
            else:
                arrays[k] = v
        return arrays

    # ------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        cfg = self.cfg
        good = [(f"rag_http_{t}", 4.0) for t in TASKS] + [(f"rag_grpc_{t}", 4.0) for t in TASKS] + [
            ("rag_stream_grpc", 8.0), ("generate_http", 6.0), ("generate_stream_sse", 4.0)]
        cancels = ["cancel_grpc_deadline", "cancel_grpc_stream", "cancel_sse_disconnect"]
        bads = ["bad_rag_http", "bad_rag_grpc", "bad_generate", "bad_ingest"]
        kinds, weights = zip(*good)
        try:
            while time.time() < self.soak.deadline and not self.soak.stop.is_set():
                r = self.rng.random()
                if r < cfg.bad_fraction:
                    kind, expected = self.rng.choice(bads), "client_error"
                elif r < cfg.bad_fraction + cfg.cancel_fraction:
                    kind, expected = self.rng.choice(cancels), "cancelled"
                elif r < cfg.bad_fraction + cfg.cancel_fraction + cfg.ingest_fraction:
                    delete = len(self.live_docs) >= cfg.max_live_docs_per_client or (
                        self.live_docs and self.rng.random() < 0.35)
                    kind, expected = ("ingest_delete" if delete else "ingest_upsert"), "ok"
                else:
                    kind, expected = self.rng.choices(kinds, weights)[0], "ok"
                if self.one(kind, expected) in ("server_error", "transport"):
                    time.sleep(0.2)              # a broken server answers at once: no hot loop against it
        finally:
            self.close()

    def one(self, kind: str, expected: str) -> str:
        with self.soak.recorder.lock:
            self.soak.recorder.in_flight += 1
        t0 = time.perf_counter()
        self.current = (kind, expected, t0)
        try:
            outcome, detail = self.send(kind, expected)
        except Exception as e:  # noqa: BLE001 - every failure is an outcome
            outcome, detail = classify_exception(e, expected), f"{type(e).__name__}: {e}"
        latency = time.perf_counter() - t0
        if latency > self.cfg.timeout_s and outcome not in ("hung",):
            outcome, detail = "hung", f"took {latency:.1f}s (> {self.cfg.timeout_s}s): {detail}"
        with self.soak.recorder.lock:
            self.soak.recorder.in_flight -= 1
            self.current, abandoned = None, self.abandoned
        if not abandoned:                      # else it was recorded as hung when the run gave up on it
            self.soak.recorder.record(kind, expected, outcome, latency, detail)
        return outcome

    def abandon(self) -> None:
        """The run gives up on this client: its request in flight (if any) is recorded as hung."""
        with self.soak.recorder.lock:
            current, self.abandoned = self.current, True
        if current is not None:
            kind, expected, t0 = current
            self.soak.recorder.record(kind, expected, "hung", time.perf_counter() - t0,
                                      "still running when the run gave up on it")

    def send(self, kind: str, expected: str) -> tuple:
        if kind.startswith("rag_http_"):
            return self.rag_http(kind[len("rag_http_"):], expected)
        if kind.startswith("rag_grpc_"):
            return self.rag_grpc(kind[len("rag_grpc_"):], expected)
        return getattr(self, kind)(expected)

    # ------------------------------------------------------------------------------ good kinds
    def rag_http(self, task: str, expected: str, arrays: Optional[dict] = None, headers: Optional[dict] = None,
                 raw_body: Optional[bytes] = None) -> tuple:
        body = raw_body if raw_body is not None else {"inputs": _json_inputs(arrays or self.rag_arrays(task))}
        status, text = self.http_post("/v2/models/rag/infer", body,
                                      self.identity() if headers is None else headers)
        outcome = classify_http(status, text, expected,
                                frontend=raw_body is not None and not self.cfg.strict_frontend)
        if outcome == "ok":
            outs = {o["name"]: o["data"][0] for o in json.loads(text)["outputs"]}
            json.loads(outs["answer"])                       # the answer is JSON
        return outcome, f"HTTP {status}: {text[:300]}"

    def rag_grpc(self, task: str, expected: str, arrays: Optional[dict] = None, headers: Optional[dict] = None,
                 timeout: Optional[float] = None) -> tuple:
        result = self.grpc().infer("rag", _grpc_inputs(arrays or self.rag_arrays(task)),
                                   headers=self.identity(True) if headers is None else headers,
                                   client_timeout=timeout or self.cfg.timeout_s)
        client_io.output_json(result, "answer")
        return "ok", ""

    def _stream(self, arrays: dict, cancel_after: Optional[int], headers: Optional[dict] = None) -> tuple:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.cfg.grpc_url)
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers=self.identity(True) if headers is None else headers)
        n = 0
        deadline = time.perf_counter() + self.cfg.timeout_s
        final = False
        try:
            client.async_stream_infer("rag_stream", _grpc_inputs(arrays), enable_empty_final_response=True)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return "hung", f"no final response within {self.cfg.timeout_s}s ({n} responses)"
                try:
                    result, error = responses.get(timeout=left)
                except queue.Empty:
                    return "hung", f"no final response within {self.cfg.timeout_s}s ({n} responses)"
                if error is not None:
                    return classify_exception(error, "ok"), f"stream error after {n} responses: {error}"
                response = result.get_response()
                if response.outputs:
                    n += 1
                if response.parameters["triton_final_response"].bool_param:
                    final = True
                    return "ok", f"{n} responses"
                if cancel_after is not None and n >= cancel_after:
                    client.stop_stream(cancel_requests=True)
                    return "cancelled", f"cancelled after {n} responses"
        finally:
            try:
                # without cancel_requests, stop_stream waits for the server to end the stream: forever, on a
                # stream the server never finishes
                client.stop_stream(cancel_requests=not final)
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def rag_stream_grpc(self, expected: str) -> tuple:
        return self._stream(self.rag_arrays(self.rng.choice(("answer", "generate_json"))), None)

    def generate_http(self, expected: str) -> tuple:
        body = {"query": self.rng.choice(QUESTIONS), "collection": self.cfg.query_collection, "top_n": 2,
                **self.cfg.identity}
        if self.cfg.max_tokens:
            body["max_tokens"] = self.cfg.max_tokens
        status, text = self.http_post("/v2/models/rag/generate", body)
        outcome = classify_http(status, text, expected)
        if outcome == "ok":
            json.loads(json.loads(text)["answer"])
        return outcome, f"HTTP {status}: {text[:300]}"

    def _sse(self, body: dict, disconnect_after: Optional[int]) -> tuple:
        host, port = self.cfg.http_url.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=self.cfg.timeout_s)
        deadline = time.perf_counter() + self.cfg.timeout_s
        try:
            conn.request("POST", "/v2/models/rag_stream/generate_stream", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                text = r.read().decode("utf-8", "replace")
                return classify_http(r.status, text, "ok"), f"HTTP {r.status}: {text[:300]}"
            events = 0
            while True:
                if time.perf_counter() > deadline:
                    return "hung", f"SSE not finished within {self.cfg.timeout_s}s ({events} events)"
                line = r.readline()
                if not line:
                    return "ok", f"{events} events"                       # the server ended the stream
                line = line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                events += 1
                event = json.loads(line[5:])
                if "error" in event:
                    return classify_message(str(event["error"])), f"SSE error event: {str(event['error'])[:300]}"
                if disconnect_after is not None and events >= disconnect_after:
                    return "cancelled", f"disconnected after {events} events"
        finally:
            conn.close()                                                  # the disconnect, for cancel kinds

    def generate_stream_sse(self, expected: str) -> tuple:
        return self._sse({"query": self.rng.choice(QUESTIONS), "collection": self.cfg.query_collection,
                          **self.cfg.identity}, None)

    def _ingest(self, arrays: dict, use_grpc: bool, timeout: Optional[float] = None) -> tuple:
        if use_grpc:
            result = self.grpc().infer("ingest", _grpc_inputs(arrays), client_timeout=timeout or self.cfg.timeout_s,
                                       headers=self.key_headers())
            return "ok", client_io.output_json(result, "report")
        status, text = self.http_post("/v2/models/ingest/infer", {"inputs": _json_inputs(arrays)},
                                      headers=self.key_headers())
        outcome = classify_http(status, text, "ok")
        if outcome != "ok":
            return outcome, f"HTTP {status}: {text[:300]}"
        return "ok", json.loads({o["name"]: o["data"][0] for o in json.loads(text)["outputs"]}["report"])

    def ingest_upsert(self, expected: str) -> tuple:
        ledger = self.soak.ledger
        if self.live_docs and self.rng.random() < 0.25:                    # an update of a live document
            doc_id = self.rng.choice(sorted(self.live_docs))
        else:
            self.n_docs += 1
            doc_id = f"soak-c{self.index}-d{self.n_docs}"
        words = self.rng.sample(self.soak.words, min(30, len(self.soak.words)))
        text = f"Soak document {doc_id} revision {self.rng.randrange(10**6)}. " + " ".join(words) + "."
        arrays = {"doc_ids": bytes_array([doc_id]), "texts": bytes_array([text]),
                  "metadata": bytes_array([json.dumps({"source": "soak", "client": self.index})]),
                  "collection": bytes_array([self.cfg.ingest_collection])}
        ledger.pending(doc_id)
        try:
            outcome, report = self._ingest(arrays, self.rng.random() < 0.5)
        except Exception:
            ledger.uncertain(doc_id)
            self.live_docs.pop(doc_id, None)
            raise
        if outcome != "ok":
            ledger.uncertain(doc_id)
            self.live_docs.pop(doc_id, None)
            return outcome, str(report)
        doc = report["documents"][0]
        if doc.get("status") not in ("created", "replaced", "updated", "unchanged"):
            ledger.uncertain(doc_id)
            return "server_error", f"unexpected ingest report {doc}"
        ledger.acked_upsert(doc_id)
        self.live_docs[doc_id] = text
        return "ok", doc["status"]

    def ingest_delete(self, expected: str) -> tuple:
        ledger = self.soak.ledger
        doc_id = self.rng.choice(sorted(self.live_docs))
        arrays = {"doc_ids": bytes_array([doc_id]), "op": bytes_array(["delete"]),
                  "collection": bytes_array([self.cfg.ingest_collection])}
        del self.live_docs[doc_id]
        ledger.pending(doc_id)
        try:
            outcome, report = self._ingest(arrays, self.rng.random() < 0.5)
        except Exception:
            ledger.uncertain(doc_id)
            raise
        if outcome != "ok":
            ledger.uncertain(doc_id)
            return outcome, str(report)
        if report["documents"][0].get("status") != "deleted":
            ledger.uncertain(doc_id)
            return "server_error", f"an acknowledged document was not there to delete: {report['documents'][0]}"
        ledger.acked_delete(doc_id)
        return "ok", "deleted"

    # --------------------------------------------------------------------------- cancellations
    def cancel_grpc_deadline(self, expected: str) -> tuple:
        deadline = self.rng.uniform(0.05, 1.5)
        task = self.rng.choice(TASKS)
        try:
            self.rag_grpc(task, expected, timeout=deadline)
            return "ok", "finished before the deadline"
        except Exception as e:  # noqa: BLE001
            return classify_exception(e, "cancelled"), f"deadline {deadline:.2f}s: {e}"

    def cancel_grpc_stream(self, expected: str) -> tuple:
        return self._stream(self.rag_arrays("answer"), cancel_after=self.rng.choice((1, 2, 4)))

    def cancel_sse_disconnect(self, expected: str) -> tuple:
        return self._sse({"query": self.rng.choice(QUESTIONS), "collection": self.cfg.query_collection,
                          **self.cfg.identity}, disconnect_after=self.rng.choice((1, 2, 4)))

    # ------------------------------------------------------------------------------ bad kinds
    def _bad_rag_variant(self, grpc: bool) -> tuple:
        """(label, arrays, headers): one malformed rag request from the catalogue."""
        ident = self.identity(grpc)
        hash_key = next(k for k in ident if k.lower() == "x-engine-hash")
        variants = [
            ("unknown task", self.rag_arrays("poem"), ident),
            ("empty query", self.rag_arrays("answer", query="   "), ident),
            ("schema not JSON", self.rag_arrays("generate_json", schema=bytes_array(["{oops"]).reshape(1, 1)), ident),
            ("schema not a schema", self.rag_arrays("generate_json", schema=bytes_array(['{"type": 12}']).reshape(1, 1)),
             ident),
            ("generate_json without schema", self.rag_arrays("generate_json", schema=None), ident),
            ("top_k 0", self.rag_arrays("answer", top_k=np.array([[0]], np.int32)), ident),
            ("top_n > top_k", self.rag_arrays("answer", top_k=np.array([[3]], np.int32),
                                              top_n=np.array([[5]], np.int32)), ident),
            ("max_tokens too large", self.rag_arrays("answer", max_tokens=np.array([[100000]], np.int32)), ident),
            ("unknown collection", self.rag_arrays("answer", collection=bytes_array(["no-such-coll"]).reshape(1, 1)),
             ident),
            ("document over the limit", self.rag_arrays("answer", documents=["x" * 30000]), ident),
            ("missing identity headers", self.rag_arrays("answer"), {}),
            ("wrong engine hash", self.rag_arrays("answer"), {**ident, hash_key: "0" * 64}),
            ("query missing", {k: v for k, v in self.rag_arrays("answer").items() if k != "query"}, ident),
            ("top_k as BYTES", self.rag_arrays("answer", top_k=bytes_array(["many"]).reshape(1, 1)), ident),
        ]
        if grpc:
            variants.append(("non-UTF-8 query", self.rag_arrays("answer", query=b"\xff\xfeq"), ident))
        return self.rng.choice(variants)

    def bad_rag_http(self, expected: str) -> tuple:
        if self.rng.random() < 0.15:
            raw = self.rng.choice([b"{not json", b'{"inputs": 7}', b'{"inputs": [{"name": "query"}]}', b"[]"])
            outcome, detail = self.rag_http("answer", expected, raw_body=raw)
            return outcome, f"malformed body {raw[:30]!r}: {detail}"
        label, arrays, headers = self._bad_rag_variant(grpc=False)
        outcome, detail = self.rag_http("answer", expected, arrays=arrays, headers=headers)
        return outcome, f"{label}: {detail}"

    def bad_rag_grpc(self, expected: str) -> tuple:
        label, arrays, headers = self._bad_rag_variant(grpc=True)
        try:
            self.rag_grpc("answer", expected, arrays=arrays, headers=headers)
            return "ok", f"{label}: accepted"
        except Exception as e:  # noqa: BLE001
            return classify_exception(e, expected), f"{label}: {e}"

    def bad_generate(self, expected: str) -> tuple:
        ident = dict(self.cfg.identity)
        variants = [
            ("no identity fields", {"query": "How long is a shift?", "collection": self.cfg.query_collection}),
            ("unknown task", {"query": "x", "task": "poem", **ident}),
            ("bad schema", {"query": "x", "task": "generate_json", "schema": "{oops", **ident}),
            ("top_k 0", {"query": "x", "top_k": 0, **ident}),
            ("empty query", {"query": "", **ident}),
        ]
        if self.rng.random() < 0.2:
            status, text = self.http_post("/v2/models/rag/generate", b'{"query": ')
            return (classify_http(status, text, expected, frontend=not self.cfg.strict_frontend),
                    f"truncated JSON: HTTP {status}: {text[:300]}")
        label, body = self.rng.choice(variants)
        status, text = self.http_post("/v2/models/rag/generate", body)
        return classify_http(status, text, expected), f"{label}: HTTP {status}: {text[:300]}"

    def bad_ingest(self, expected: str) -> tuple:
        coll = bytes_array([self.cfg.ingest_collection])
        variants = [
            ("upsert without texts", {"doc_ids": bytes_array(["soak-bad"]), "collection": coll}),
            ("unknown op", {"doc_ids": bytes_array(["soak-bad"]), "op": bytes_array(["frobnicate"]), "collection": coll}),
            ("bad collection name", {"doc_ids": bytes_array(["soak-bad"]), "texts": bytes_array(["text"]),
                                     "collection": bytes_array(["no/such name"])}),
            ("metadata not JSON", {"doc_ids": bytes_array(["soak-bad"]), "texts": bytes_array(["text"]),
                                   "metadata": bytes_array(["{oops"]), "collection": coll}),
            ("texts/doc_ids mismatch", {"doc_ids": bytes_array(["soak-bad1", "soak-bad2"]), "texts": bytes_array(["one"]),
                                        "collection": coll}),
        ]
        label, arrays = self.rng.choice(variants)
        try:
            outcome, report = self._ingest(arrays, self.rng.random() < 0.5)
        except Exception as e:  # noqa: BLE001
            return classify_exception(e, expected), f"{label}: {e}"
        return outcome, f"{label}: {str(report)[:300]}"


# --------------------------------------------------------------------------------------------- ledger
class Ledger:
    """What ingest acknowledged: documents that must be present, documents that must be absent, and documents
    whose last operation had no clear answer (excluded from the check)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state: dict = {}        # doc_id -> "present" | "deleted" | "uncertain" | "pending"
        self.acked = collections.Counter()

    def pending(self, doc_id):
        with self.lock:
            self.state[doc_id] = "pending"

    def uncertain(self, doc_id):
        with self.lock:
            self.state[doc_id] = "uncertain"

    def acked_upsert(self, doc_id):
        with self.lock:
            self.state[doc_id] = "present"
            self.acked["upsert"] += 1

    def acked_delete(self, doc_id):
        with self.lock:
            self.state[doc_id] = "deleted"
            self.acked["delete"] += 1

    def verify(self, grpc_url: str, collection: str, headers: Optional[dict] = None) -> dict:
        import tritonclient.grpc as grpcclient

        headers = {k.lower(): v for k, v in headers.items()} if headers else None

        with self.lock:
            state = dict(self.state)
        client = grpcclient.InferenceServerClient(grpc_url)
        lost, resurrected, errors = [], [], []
        try:
            for doc_id, st in sorted(state.items()):
                if st not in ("present", "deleted"):
                    continue
                arrays = {"op": bytes_array(["get"]), "collection": bytes_array([collection]),
                          "payload": bytes_array([json.dumps({"doc_id": doc_id})])}
                try:
                    res = client.infer("vector_index", _grpc_inputs(arrays), client_timeout=60, headers=headers)
                    doc = client_io.output_json(res, "result")["document"]
                except Exception as e:  # noqa: BLE001
                    errors.append(f"{doc_id}: {e}"[:300])
                    continue
                if st == "present" and doc is None:
                    lost.append(doc_id)
                if st == "deleted" and doc is not None:
                    resurrected.append(doc_id)
            stats = None
            try:
                arrays = {"op": bytes_array(["stats"]), "collection": bytes_array([collection])}
                stats = client_io.output_json(client.infer("vector_index", _grpc_inputs(arrays), client_timeout=60,
                                                           headers=headers), "result")
            except Exception as e:  # noqa: BLE001
                stats = {"error": str(e)[:300]}
        finally:
            client.close()
        counts = collections.Counter(state.values())
        return {"collection": collection, "acknowledged_upserts": self.acked["upsert"],
                "acknowledged_deletes": self.acked["delete"], "final_state_counts": dict(counts),
                "must_be_present": counts.get("present", 0), "must_be_absent": counts.get("deleted", 0),
                "uncertain_excluded": counts.get("uncertain", 0) + counts.get("pending", 0),
                "lost": lost, "resurrected": resurrected, "check_errors": errors[:10],
                "n_check_errors": len(errors), "index_stats": stats,
                "pass": not lost and not resurrected and not errors}


# -------------------------------------------------------------------------------------------- sampler
def _stub_identity(cmdline: list) -> tuple:
    """(model, instance) from a stub's command line: .../<model>/<version>/model.py ... <model>_<g>_<i> DEFAULT"""
    model, instance = None, None
    for arg in cmdline:
        if arg.endswith("model.py"):
            p = Path(arg)
            model = p.parent.parent.name
        if INSTANCE_RE.match(arg):
            instance = arg
    if model is None and instance:
        model = INSTANCE_RE.match(instance).group("model")
    return model or "stub", instance or "?"


def process_table(server_pid: int) -> dict:
    """{pid: (group, label, rss_bytes)} of tritonserver and every stub under it (psutil, else /proc)."""
    out = {}
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            server = psutil.Process(server_pid)
            out[server_pid] = ("tritonserver", "tritonserver", server.memory_info().rss)
            children = server.children(recursive=True)
        except psutil.Error:
            return out
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:     # a zombie stub is a dead stub
                    continue
                cmd = child.cmdline()
                if not any(STUB_NAME in c for c in cmd[:1]):
                    continue
                model, instance = _stub_identity(cmd)
                out[child.pid] = (model, instance, child.memory_info().rss)
            except psutil.Error:
                continue
        return out
    page = os.sysconf("SC_PAGE_SIZE")
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
                parents[int(entry.name)] = int(raw[raw.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    if server_pid not in parents:
        return out
    tree, todo = set(), [server_pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, pp in parents.items() if pp == p and c not in tree)
    for pid in tree:
        if pid != server_pid and not pid_alive(pid):          # a zombie stub is a dead stub
            continue
        try:
            rss = int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * page
            cmd = (Path("/proc") / str(pid) / "cmdline").readbytes_array().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if pid == server_pid:
            out[pid] = ("tritonserver", "tritonserver", rss)
        elif cmd and STUB_NAME in cmd[0]:
            model, instance = _stub_identity(cmd)
            out[pid] = (model, instance, rss)
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def scrape_heals(metrics_url: Optional[str]) -> Optional[dict]:
    """{model: heals} from llm_model_heals_total on the metrics port (None when unreachable)."""
    if not metrics_url:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        m = re.match(r'^llm_model_heals_total\{([^}]*)\}\s+([-+\deE.]+)$', line)
        if m:
            model = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))).get("model", "?")
            out[model] = out.get(model, 0) + float(m.group(2))
    return out


def manager_heals(grpc_url: str) -> Optional[dict]:
    """{model: heals} from model_manager's status (None when it is not loaded or does not answer)."""
    import tritonclient.grpc as grpcclient

    try:
        with grpcclient.InferenceServerClient(grpc_url) as client:
            res = client.infer("model_manager", _grpc_inputs({"op": bytes_array(["status"])}), client_timeout=30)
            status = client_io.output_json(res, "result")
        out = {m: v.get("heals", 0) for m, v in status.get("models", {}).items()}            # budgeted engines
        out.update({m: v.get("heals", 0) for m, v in (status.get("watched") or {}).items()})  # other Python models
        return out
    except Exception:  # noqa: BLE001
        return None


class Sampler:
    """Every ``sample_s``: RSS of the server and each stub, stub deaths, server-log alarms, heals."""

    def __init__(self, cfg: SoakConfig, t0: float):
        self.cfg, self.t0 = cfg, t0
        self.samples: list = []             # {t, total, groups: {group: bytes}, procs: {label: bytes}}
        self.stub_deaths: list = []
        self.stub_exits_planned: list = []
        self.stub_starts: list = []
        self.log_alarms: list = []
        self.n_log_alarms = 0
        self.heals_first: Optional[dict] = None
        self.heals_last: Optional[dict] = None
        self.heal_series: list = []          # (t, {model: heals}) whenever the counters changed
        self.server_died_at: Optional[float] = None
        self._known: dict = {}              # pid -> (model, instance)
        self._vanished: list = []           # (t, pid, model, instance) waiting one sample for an unload line
        self._unloaded: dict = {}           # model -> last time an unload line was seen
        self._log_pos = 0
        if cfg.server_log and Path(cfg.server_log).exists():
            self._log_pos = Path(cfg.server_log).stat().st_size
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self):
        self.sample()
        self.thread.start()

    def _loop(self):
        while not self.stop.wait(self.cfg.sample_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - sampling must not end the run
                self.log_alarms.append({"t": round(time.time() - self.t0, 1), "line": f"sampler error: {e}"})

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        self.sample()
        self.sample(final=True)

    def _read_log(self, t: float) -> None:
        path = self.cfg.server_log
        if not path or not Path(path).exists():
            return
        with open(path, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self._log_pos += cut
        for line in data[:cut].decode("utf-8", "replace").splitlines():
            m = UNLOAD_LOG_RE.search(line)
            if m:
                self._unloaded[m.group(1)] = t
            if DEATH_LOG_RE.search(line):
                self.n_log_alarms += 1
                if len(self.log_alarms) < 50:
                    self.log_alarms.append({"t": round(t, 1), "line": line.strip()[:400]})

    def sample(self, final: bool = False) -> None:
        t = time.time() - self.t0
        self._read_log(t)
        heals = scrape_heals(self.cfg.metrics_url)
        if heals is not None:
            if self.heals_first is None:
                self.heals_first = heals
            self.heals_last = heals
            if not self.heal_series or self.heal_series[-1][1] != heals:
                self.heal_series.append((round(t, 1), heals))
        if not self.cfg.server_pid:
            return
        alive = pid_alive(self.cfg.server_pid)
        if not alive and self.server_died_at is None:
            self.server_died_at = t
        table = process_table(self.cfg.server_pid) if alive else {}
        # stubs that vanished last time: an unload line since then means a planned exit, otherwise a death
        still = []
        for rec in self._vanished:
            tv, pid, model, instance = rec
            if self._unloaded.get(model, -1) >= tv - 2 * self.cfg.sample_s:
                self.stub_exits_planned.append({"t": round(tv, 1), "pid": pid, "model": model, "instance": instance})
            elif final or t - tv >= 3 * self.cfg.sample_s:     # an unload's log line may come a little later
                self.stub_deaths.append({"t": round(tv, 1), "pid": pid, "model": model, "instance": instance})
            else:
                still.append(rec)
        self._vanished = still
        if alive:
            for pid, (model, instance) in list(self._known.items()):
                if pid not in table:
                    self._vanished.append((t, pid, model, instance))
                    del self._known[pid]
        for pid, (group, label, _) in table.items():
            if group != "tritonserver" and pid not in self._known:
                self._known[pid] = (group, label)
                if self.samples:
                    self.stub_starts.append({"t": round(t, 1), "pid": pid, "model": group, "instance": label})
        if final or not table:
            return
        groups, procs = collections.Counter(), collections.Counter()
        for pid, (group, label, rss) in table.items():
            groups[group] += rss
            procs[label if group == "tritonserver" else f"{label}/{pid}"] += rss   # a restarted stub: a new series
        self.samples.append({"t": round(t, 1), "total": sum(groups.values()), "groups": dict(groups),
                             "procs": dict(procs), "n_stubs": len(table) - 1})

    def deaths(self) -> list:
        """PID deaths, plus the exits that looked like unloads but were followed by a heal of their model (the
        manager unloads and reloads a model whose stub died: that unload must not hide the death)."""
        out = list(self.stub_deaths)
        for e in self.stub_exits_planned:
            before = [h for tt, h in self.heal_series if tt <= e["t"]]
            base = before[-1].get(e["model"], 0) if before else 0
            if self.heals_last and self.heals_last.get(e["model"], 0) > base:
                out.append({**e, "note": "its model was healed after this exit"})
        return sorted(out, key=lambda d: d["t"])

    def rss_growth(self, warmup_fraction: float) -> dict:
        if len(self.samples) < 3:
            return {"error": "fewer than 3 RSS samples"}
        t_end = self.samples[-1]["t"]
        base = next(s for s in self.samples if s["t"] >= warmup_fraction * t_end)
        last = self.samples[-1]
        growth = (last["total"] - base["total"]) / base["total"] if base["total"] else 0.0
        per_group = {}
        for g, v in last["groups"].items():
            b = base["groups"].get(g)
            if b:
                per_group[g] = {"at_warmup_mib": round(b / 2**20, 1), "last_mib": round(v / 2**20, 1),
                                "growth": round((v - b) / b, 4)}
        peak = max(s["total"] for s in self.samples)
        return {"warmup_t_s": base["t"], "last_t_s": last["t"], "total_at_warmup_mib": round(base["total"] / 2**20, 1),
                "total_last_mib": round(last["total"] / 2**20, 1), "total_peak_mib": round(peak / 2**20, 1),
                "growth": round(growth, 4), "per_group": per_group}


# ------------------------------------------------------------------------------------------------ soak
class Soak:
    def __init__(self, cfg: SoakConfig, progress: Callable[[str], None] = print):
        self.cfg, self.progress = cfg, progress
        self.stop = threading.Event()
        self.ledger = Ledger()
        words = set()
        for p in sorted((Path(__file__).resolve().parent.parent / "data" / "corpus").glob("*.md")):
            words.update(w.strip(".,;:()[]#*`|") for w in p.read_text(encoding="utf-8").split())
        self.words = sorted(w for w in words if w.isalpha() and 3 <= len(w) <= 12) or ["soak", "word"]

    def run(self) -> dict:
        cfg = self.cfg
        self.t0 = time.time()
        self.deadline = self.t0 + cfg.duration_s
        self.recorder = Recorder(self.t0)
        self.sampler = Sampler(cfg, self.t0)
        self.sampler.start()
        workers = [Worker(self, i) for i in range(cfg.clients)]
        threads = [threading.Thread(target=w.run, name=f"soak-client-{i}", daemon=True)
                   for i, w in enumerate(workers)]
        for th in threads:
            th.start()
        next_progress = self.t0 + cfg.progress_s
        try:
            while any(th.is_alive() for th in threads):
                time.sleep(0.5)
                if time.time() >= next_progress:
                    next_progress += cfg.progress_s
                    self.progress(self.progress_line())
                if self.sampler.server_died_at is not None and not self.stop.is_set():
                    self.progress(f"tritonserver is gone (at {self.sampler.server_died_at:.0f} s): "
                                  "stopping the clients")
                    self.stop.set()
                # in-flight requests may end up to one client timeout after the deadline
                if time.time() > self.deadline + cfg.timeout_s + 60:
                    self.progress("clients still running one timeout after the deadline: giving up on them "
                                  "(their requests count as hung)")
                    self.stop.set()
                    for w, th in zip(workers, threads):
                        if th.is_alive():
                            w.abandon()
                    break
        except KeyboardInterrupt:
            self.progress("interrupted: stopping the clients")
            self.stop.set()
            for th in threads:
                th.join(cfg.timeout_s + 5)
        self.ended = time.time()
        self.progress("load finished; checking every acknowledged ingest")
        self.ledger_result = self.ledger.verify(cfg.grpc_url, cfg.ingest_collection, cfg.operator_headers) \
            if self.ledger.state else {"pass": True, "note": "no ingest acknowledged", "lost": [], "resurrected": []}
        self.sampler.finish()
        self.manager_heals = manager_heals(cfg.grpc_url)
        return self.summary()

    def progress_line(self) -> str:
        el = time.time() - self.t0
        tot = self.recorder.totals()
        n = sum(tot.values())
        rss = self.sampler.samples[-1]["total"] / 2**20 if self.sampler.samples else float("nan")
        classes = " ".join(f"{k}={tot[k]}" for k in OUTCOMES if tot[k])
        return (f"soak {el:6.0f}/{self.cfg.duration_s:.0f}s: {n} requests ({n / max(el, 1e-9):.2f}/s), "
                f"{classes or 'none yet'}; in flight {self.recorder.in_flight}; RSS {rss:.0f} MiB; "
                f"stub deaths {len(self.sampler.deaths())}; log alarms {self.sampler.n_log_alarms}")

    def summary(self) -> dict:
        cfg, rec, smp = self.cfg, self.recorder, self.sampler
        kinds = {}
        for kind in sorted(rec.counts):
            kinds[kind] = {"outcomes": {o: rec.counts[kind][o] for o in OUTCOMES if rec.counts[kind][o]},
                           "latency_all": percentiles(rec.latency[kind]),
                           "latency_ok": percentiles(rec.latency_ok[kind])}
        tot = rec.totals()
        heals = {"metrics": None, "model_manager_status": self.manager_heals}
        if smp.heals_last is not None:
            first = smp.heals_first or {}
            heals["metrics"] = {"source": "llm_model_heals_total on the metrics port",
                                "during_run": {m: v - first.get(m, 0) for m, v in smp.heals_last.items()
                                               if v - first.get(m, 0)},
                                "total_at_end": smp.heals_last}
        growth = smp.rss_growth(cfg.warmup_fraction)
        deaths = smp.deaths()
        n = sum(tot.values())
        bad_n = sum(sum(c.values()) for k, c in rec.counts.items() if k.startswith("bad_"))
        criteria = {
            "stub_deaths": {"value": len(deaths), "target": "== 0", "pass": not deaths},
            "server_log_alarms": {"value": smp.n_log_alarms, "target": "== 0 ('not healthy', crash lines)",
                                  "pass": smp.n_log_alarms == 0},
            "server_errors": {"value": tot["server_error"], "target": "== 0", "pass": tot["server_error"] == 0},
            "hung": {"value": tot["hung"], "target": "== 0", "pass": tot["hung"] == 0},
            "transport_errors": {"value": tot["transport"], "target": "== 0", "pass": tot["transport"] == 0},
            "server_alive": {"value": smp.server_died_at is None, "target": "tritonserver ran to the end",
                             "pass": smp.server_died_at is None},
            "acknowledged_ingest_kept": {"value": {"lost": len(self.ledger_result.get("lost", [])),
                                                   "resurrected": len(self.ledger_result.get("resurrected", []))},
                                         "target": "no acknowledged document lost or resurrected",
                                         "pass": bool(self.ledger_result.get("pass"))},
        }
        if "growth" in growth:
            criteria["rss_growth_after_warmup"] = {"value": growth["growth"], "target": f"< {cfg.rss_growth_limit}",
                                                   "pass": growth["growth"] < cfg.rss_growth_limit}
        elif cfg.server_pid:
            criteria["rss_growth_after_warmup"] = {"value": None, "target": f"< {cfg.rss_growth_limit}",
                                                   "pass": False, "note": growth.get("error")}
        buckets = sorted(rec.timeline)
        return {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
                       if k != "identity"},
            "wall_s": round(self.ended - self.t0, 1),
            "requests": n, "requests_per_s": round(n / max(self.ended - self.t0, 1e-9), 3),
            "bad_request_share": round(bad_n / n, 4) if n else None,
            "notes": {"frontend_500": f"{FRONTEND_500} ('failed to parse the request JSON buffer', 'Unable to "
                                      f"parse 'inputs''): counted apart, not a criterion (strict_frontend="
                                      f"{cfg.strict_frontend}; true makes it a server error)"},
            "outcomes_total": {o: tot[o] for o in OUTCOMES},
            "by_kind": kinds,
            "unexpected": dict(rec.unexpected),
            "examples": dict(rec.examples),
            "stub_deaths": deaths,
            "first_stub_death_s": deaths[0]["t"] if deaths else None,
            "stub_exits_after_unload": smp.stub_exits_planned,
            "stub_starts": smp.stub_starts,
            "server_died_at_s": smp.server_died_at,
            "server_log_alarms": {"count": smp.n_log_alarms, "first": smp.log_alarms[:20]},
            "heals": heals,
            "heal_series": smp.heal_series,
            "ingest_check": self.ledger_result,
            "rss": {"growth": growth, "samples": smp.samples},
            "timeline": {"bucket_s": rec.bucket_s,
                         "buckets": [{"t": b * rec.bucket_s, **{o: rec.timeline[b][o] for o in OUTCOMES
                                                                if rec.timeline[b][o]}} for b in buckets]},
            "criteria": criteria,
            "pass": all(c["pass"] for c in criteria.values()),
        }


def run_soak(cfg: SoakConfig, progress: Callable[[str], None] = print) -> dict:
    return Soak(cfg, progress).run()
