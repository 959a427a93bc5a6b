"""Bad input never yields a 500: a catalogue of malformed requests against every model the server exposes.

The catalogue is derived from what the server itself declares (repository index, each model's metadata and
config): for every input a missing required input, a wrong dtype, a wrong rank, an empty tensor, several values
where one is expected, invalid UTF-8, oversized strings, non-JSON / wrong-typed / deeply nested JSON in the inputs
that carry JSON, huge / negative / zero / NaN / inf numbers, unknown enum values, and an extra unknown input. A
few hand-written field-level cases reach the JSON payloads' own fields. Non-decoupled models are asked over HTTP
and gRPC, decoupled ones over a gRPC stream.

Every answer must be a success or a client-class error (HTTP 4xx, gRPC INVALID_ARGUMENT-class), never a 5xx /
INTERNAL / UNKNOWN, never a bare exception class name or a traceback, never a hang; afterwards the server is
still ready, a good ``rag`` request still succeeds and no Python stub died.
"""
from __future__ import annotations

import json
import os
import queue
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.helpers import admin_headers, auth_headers, make_input, strings, wire_headers

CASE_TIMEOUT_S = 60.0        # a case that takes longer than this is a hang
MAX_CASES_PER_MODEL = 120    # per protocol; every kind of mutation is kept, the per-input ones are sampled
THREADS = 4
DEEP = 100_000               # nesting levels of the deep-JSON cases
BIG_STRING = 16_000          # characters of the oversized-string cases (a valid ingest of 64k took 30 s here)

# Optional inputs every base request carries: the fuzz test writes and reads only its own collection, and a
# request that is valid after all generates a few tokens, not the default budget (the catalogue stays short);
# generate declares input_ids optional (TRT-LLM does), but a request without it never gets past the first check.
ALWAYS = {"collection", "max_tokens", "input_ids", "texts"}
COLLECTION = "fuzz"
# Inputs whose strings carry JSON (or may: rag's documents are plain text or a JSON object).
JSON_INPUTS = {"payload", "schema", "metadata", "guide", "guided_decoding_guide", "documents"}
# Inputs that take one of a fixed set of names.
ENUM_INPUTS = {"op", "task", "input_type", "guide_type", "guided_decoding_guide_type", "collection", "model"}
# A valid-looking value per input name (model-specific first); everything else gets a generic one.
VALUES = {
    ("vector_index", "op"): "stats", ("model_manager", "op"): "status", ("ingest", "op"): "upsert",
    ("vector_index", "payload"): '{"doc_id": "fuzz-none"}', ("model_manager", "payload"): "{}",
    ("model_manager", "model"): "embed", ("embed_text", "task"): "Find the passage",
    ("rerank_text", "task"): "Find the passage",
    "query": "What does Triton serve?", "text": "hello fuzz", "prompt": "Say hi.", "system": "Be brief.",
    "documents": "Triton serves models over HTTP and gRPC.", "collection": COLLECTION, "doc_ids": "fuzz-doc",
    "texts": "A short document written by the fuzz test.", "metadata": '{"source": "fuzz"}',
    "input_type": "query", "task": "answer", "schema": '{"type": "object"}', "guide_type": "json",
    "guide": '{"type": "object"}', "guided_decoding_guide_type": "json", "guided_decoding_guide": "",
}
NUMBERS = {"input_lengths": 3, "request_output_len": 2, "max_tokens": 32, "top_k": 4, "top_n": 2, "runtime_top_k": 0,
           "chunk_tokens": 64, "overlap_tokens": 8, "temperature": 0.0, "runtime_top_p": 1.0, "top_p": 1.0,
           "end_id": 0, "pad_id": 0, "beam_width": 1}
# Inputs whose JSON mutations only matter together with another input's value.
COMPANIONS = {"guide": {"guide_type": "json_schema"},
              "guided_decoding_guide": {"guided_decoding_guide_type": "json_schema"},
              "schema": {"task": "generate_json"}}
# Field-level cases: (model, fixed string inputs, JSON input, template); each field is dropped, nulled and given
# values of the wrong kind. Only ops that cannot change the served state with a wrong value are listed.
FIELD_CASES = [
    ("vector_index", {"op": "upsert", "collection": "fuzz_vectors", "vectors": np.ones((1, 4), np.float32)}, "payload",
     {"doc_id": "fuzz-doc", "chunks": [{"text": "a chunk"}], "content_hash": "h", "doc_metadata": {}}),
    ("vector_index", {"op": "get", "collection": "fuzz"}, "payload", {"doc_id": "fuzz-doc"}),
    ("vector_index", {"op": "delete", "collection": "fuzz"}, "payload", {"doc_id": "fuzz-none"}),
    ("model_manager", {"op": "release", "model": "embed"}, "payload",
     {"lease": "fuzz-no-such-lease", "ok": True, "latency_ms": 1.0, "error": "x"}),
    ("model_manager", {"op": "canary_report", "model": "embed"}, "payload",
     {"version": 1, "ok": True, "latency_ms": 1.0}),
    ("model_manager", {"op": "canary_start", "model": "fuzz_no_such_model"}, "payload", {"version": 2, "share": 0.5}),
    ("model_manager", {"op": "rollback", "model": "fuzz_no_such_model"}, "payload", {"root_cause": "fuzz"}),
]
# Wrong values for a field that must hold something else; 'configure' and 'set_mode' get only these (any valid
# value would change the session's manager).
WRONG_FIELD_VALUES = [None, "fuzz", 5, -1, 1e308, [], {}, [["x"]], True, float("nan")]
MANAGER_STATEFUL = [
    ({"op": "configure"}, {"cooldown_s": v}) for v in (None, "soon", [], {}, float("nan"), float("inf"), -1, True)
] + [
    ({"op": "configure"}, {"budget_bytes": v}) for v in ("lots", -5, 0, [], float("nan"), "1e999G")
] + [
    ({"op": "configure"}, {"safety_buffer": v}) for v in (2.0, -0.1, "x", None)
] + [
    ({"op": "configure"}, {"parallel_loads": v}) for v in (0, "many", 1.5, None, 10 ** 30)
] + [
    ({"op": "configure"}, {"no_such_setting": 1}),
    ({"op": "set_mode"}, {}), ({"op": "set_mode"}, {"mode": 5}), ({"op": "set_mode"}, {"mode": "fuzz"}),
    ({"op": "set_mode"}, {"mode": "co_resident", "phases": "embed"}),
    ({"op": "set_mode"}, {"mode": "co_resident", "phases": [1, 2]}),
    ({"op": "set_mode"}, {"mode": "co_resident", "phases": [["embed"], ["rerank"]]}),
    ({"op": "set_mode"}, {"mode": "co_resident", "cyclic": "maybe"}),
    ({"op": "heal", "model": "fuzz_no_such_model"}, {"force": True}),
    ({"op": "unload", "model": "fuzz_no_such_model"}, {}),
    ({"op": "acquire", "model": "x" * 5000}, {}),
]

# Triton 2.51's own HTTP frontend answers a request body it cannot parse (before any model sees it) with 500 and
# its parser's message; nothing in this project can change that. Such answers are counted and printed, not failed.
KNOWN_TRITON_500 = "triton core 500 (unparsable HTTP body)"
TRITON_PARSE_ERROR = re.compile(r"failed to parse the request JSON buffer|Unable to parse '|Unable to parse JSON")
ALLOWED_GRPC = {"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.OUT_OF_RANGE",
                "StatusCode.FAILED_PRECONDITION", "StatusCode.UNIMPLEMENTED"}
BARE_CLASS = re.compile(r"^(internal error: )?[A-Z][A-Za-z]*(Error|Exception|Exit|Interrupt)\b")
BAD_TEXT = ("Traceback (most recent call last)", "is not healthy", "internal error")


@dataclass
class Case:
    model: str
    label: str
    inputs: dict                                 # name -> numpy array (its dtype is the wire dtype)
    raw: bytes | None = None                     # a raw HTTP body instead of inputs
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- catalogue
class Model:
    def __init__(self, name, metadata, config):
        self.name = name
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled"))
        optional = {i["name"]: bool(i.get("optional")) for i in config.get("input", [])}
        # Ensembles declare their inputs in the config too; metadata gives dtype and shape for every model.
        self.inputs = [(i["name"], i["datatype"], [int(d) for d in i["shape"]][1 if self.batching else 0:],
                        optional.get(i["name"], False)) for i in metadata["inputs"]]

    def shape(self, dims, fill=1):
        shape = [fill if d < 0 else d for d in dims]
        return ([1] if self.batching else []) + shape


def _array(dtype, shape, value):
    if dtype == "BYTES":
        v = value.encode("utf-8") if isinstance(value, str) else value
        out = np.empty(shape, dtype=object)
        out.fill(v)
        return out
    np_dtype = {"INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_,
                "UINT8": np.uint8}[dtype]
    return np.full(shape, value, dtype=np_dtype)


def _value(model, name, dtype):
    if dtype == "BYTES":
        return VALUES.get((model, name), VALUES.get(name, "fuzz"))
    if dtype == "BOOL":
        return False
    if name == "input_ids":
        return 1
    return NUMBERS.get(name, 1)


def base_inputs(m: Model, with_optional=()) -> dict:
    out = {}
    for name, dtype, dims, optional in m.inputs:
        if optional and name not in with_optional and name not in ALWAYS:
            continue
        fill = 3 if name in ("input_ids", "attention_mask") else 1
        out[name] = _array(dtype, m.shape(dims, fill), _value(m.name, name, dtype))
    return out


def _json_strings():
    return [("not JSON", "this is { not json"), ("truncated JSON", '{"a": [1, 2'), ("JSON list", "[1, 2, 3]"),
            ("JSON number", "42"), ("JSON null", "null"), ("JSON string", '"text"'), ("JSON NaN", "NaN"),
            ("JSON 1e999", '{"a": 1e999}'), ("JSON duplicate keys", '{"a": 1, "a": []}'),
            ("deep JSON list", "[" * DEEP + "]" * DEEP),
            ("deep JSON object", '{"a": ' * DEEP + "1" + "}" * DEEP),
            ("deep unbalanced JSON", "{" + '"a":[' * DEEP)]


def _numbers(dtype):
    if dtype == "FP32":
        return [("huge", 3.4e38), ("negative", -1.0), ("zero", 0.0), ("NaN", float("nan")), ("inf", float("inf")),
                ("-inf", float("-inf"))]
    if dtype == "UINT64":
        return [("huge", 2 ** 64 - 1), ("zero", 0)]
    if dtype == "INT32":
        return [("huge", 2 ** 31 - 1), ("negative", -1), ("min", -2 ** 31), ("zero", 0)]
    if dtype == "BOOL":
        return [("true", True)]
    return [("huge", np.iinfo(np.int64).max), ("negative", -1), ("zero", 0)]


def input_cases(m: Model) -> list:
    """(label, inputs) per mutation of each declared input, on top of the model's base request."""
    cases = []
    base = base_inputs(m)
    for name, dtype, dims, optional in m.inputs:
        with_it = base_inputs(m, with_optional={name, *COMPANIONS.get(name, {})})
        for other, value in COMPANIONS.get(name, {}).items():
            with_it[other] = _array("BYTES", with_it[other].shape, value)
        shape = with_it[name].shape

        def put(label, arr, _name=name, _base=with_it):
            cases.append((f"{_name}: {label}", {**_base, _name: arr}))

        if not optional:
            cases.append((f"{name}: missing", {k: v for k, v in base.items() if k != name}))
        # wrong dtype
        if dtype == "BYTES":
            put("INT32 instead of BYTES", np.ones(shape, np.int32))
        elif dtype == "FP32":
            put("BYTES instead of FP32", _array("BYTES", shape, "0.5"))
            put("INT32 instead of FP32", np.ones(shape, np.int32))
        else:
            put(f"BYTES instead of {dtype}", _array("BYTES", shape, "1"))
            put(f"FP32 instead of {dtype}", np.full(shape, 1.5, np.float32))
        # wrong rank, empty, several
        put("extra dimension", np.repeat(with_it[name][..., None], 2, axis=-1))
        if len(shape) > 1:
            put("rank reduced", with_it[name].reshape(-1))
        put("empty tensor", with_it[name].reshape(-1)[:0].reshape(shape[:-1] + (0,)))
        put("several values", np.concatenate([with_it[name]] * 3, axis=-1))
        if m.batching:
            put("batch of 3", np.concatenate([with_it[name]] * 3, axis=0))
        if dtype == "BYTES":
            put("invalid UTF-8", _array("BYTES", shape, b"\xff\xfe bad \xc3"))
            put("empty string", _array("BYTES", shape, ""))
            put("blank string", _array("BYTES", shape, "   \n\t "))
            put("NUL characters", _array("BYTES", shape, "a\x00b\x00"))
            put("oversized string", _array("BYTES", shape, "fuzz " * (BIG_STRING // 5)))
            if name in JSON_INPUTS:
                for label, text in _json_strings():
                    put(label, _array("BYTES", shape, text))
            if name in ENUM_INPUTS:
                for label, text in (("unknown value", "fuzz_no_such_value"), ("path-like value", "../../etc/passwd"),
                                    ("long value", "x" * 5000), ("non-ASCII value", "anträge ✓")):
                    put(label, _array("BYTES", shape, text))
        else:
            for label, value in _numbers(dtype):
                put(label, _array(dtype, shape, value))
    cases.append(("extra unknown input", {**base, "fuzz_extra": strings(["x"]).reshape([1, 1] if m.batching else [1])}))
    cases.append(("no inputs at all", {}))
    return cases


def field_cases(m: Model) -> list:
    """Hand-written JSON-field mutations for the models with a JSON payload (FIELD_CASES, MANAGER_STATEFUL)."""
    out = []

    def request(fixed, json_input, payload):
        inputs = base_inputs(m)
        for k, v in fixed.items():
            inputs[k] = v if isinstance(v, np.ndarray) else _array("BYTES", [1], v)
        inputs[json_input] = _array("BYTES", [1], json.dumps(payload))
        return inputs

    for model, fixed, json_input, template in FIELD_CASES:
        if model != m.name:
            continue
        op = fixed.get("op")
        for key in template:
            out.append((f"{op} {json_input}.{key}: missing", request(fixed, json_input,
                                                                      {k: v for k, v in template.items() if k != key})))
            for wrong in WRONG_FIELD_VALUES:
                out.append((f"{op} {json_input}.{key}: {json.dumps(wrong)[:20]}",
                            request(fixed, json_input, {**template, key: wrong})))
            deep = json.loads("[" * 200 + "]" * 200)
            out.append((f"{op} {json_input}.{key}: 200-deep list", request(fixed, json_input, {**template, key: deep})))
        out.append((f"{op} {json_input}: unknown field", request(fixed, json_input, {**template, "fuzz": 1})))
    if m.name == "model_manager":
        for fixed, payload in MANAGER_STATEFUL:
            out.append((f"{fixed['op']} {json.dumps(payload)[:40]}", request(fixed, "payload", payload)))
    return out


def catalogue(m: Model) -> list:
    per_input = input_cases(m)
    print(f"{m.name}: {len(per_input)} input cases{' (sampled)' if len(per_input) > MAX_CASES_PER_MODEL else ''}")
    if len(per_input) > MAX_CASES_PER_MODEL:
        # Keep every 'missing' and every model-wide case, sample the rest evenly (deterministic).
        keep = [c for c in per_input if c[0].endswith("missing") or ":" not in c[0]]
        rest = [c for c in per_input if c not in keep]
        step = len(rest) / (MAX_CASES_PER_MODEL - len(keep))
        per_input = keep + [rest[int(i * step)] for i in range(MAX_CASES_PER_MODEL - len(keep))]
    cases = [Case(m.name, label, inputs) for label, inputs in per_input + field_cases(m)]
    if not m.decoupled:
        for label, body in (("raw: body is not JSON", b"{ not json"), ("raw: inputs not a list", b'{"inputs": 5}'),
                            ("raw: data of the wrong type", json.dumps({"inputs": [
                                {"name": m.inputs[0][0], "datatype": m.inputs[0][1], "shape": [1] * (1 + m.batching),
                                 "data": [{"a": 1}]}]}).encode())):
            cases.append(Case(m.name, label, {}, raw=body))
    return cases


# ------------------------------------------------------------------------------------------- running
def _judge_message(msg: str) -> str:
    """'' when an error message is a proper client-facing message, else why not."""
    text = (msg or "").strip()
    for bad in BAD_TEXT:
        if bad in text:
            return f"message contains {bad!r}"
    if BARE_CLASS.match(text) and len(text.split()) <= 3:
        return "message is a bare exception class name"
    if not text:
        return "empty error message"
    return ""


def run_unary(case: Case, protocol: str, server, headers) -> Case:
    case = Case(case.model, f"{protocol} {case.label}", case.inputs, case.raw)
    t0 = time.monotonic()
    try:
        if case.raw is not None:
            req = urllib.request.Request(f"http://{server.http_url}/v2/models/{case.model}/infer", data=case.raw,
                                         method="POST", headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(req, timeout=CASE_TIMEOUT_S) as r:
                    case.outcome = "ok" if r.status < 400 else f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                body = e.read().decode("utf-8", "replace")
                case.outcome = "client error" if 400 <= e.code < 500 else f"HTTP {e.code}"
                case.detail = body[:300]
                if e.code == 500 and TRITON_PARSE_ERROR.search(body):
                    case.outcome = KNOWN_TRITON_500
                if case.outcome == "client error":
                    why = _judge_message(body)
                    case.outcome = f"bad message: {why}" if why else case.outcome
            return case
        if protocol == "http":
            with httpclient.InferenceServerClient(server.http_url, network_timeout=CASE_TIMEOUT_S,
                                                  connection_timeout=CASE_TIMEOUT_S) as client:
                client.infer(case.model, [make_input("http", k, v) for k, v in case.inputs.items()],
                             headers=wire_headers("http", headers))
        else:
            with grpcclient.InferenceServerClient(server.grpc_url) as client:
                client.infer(case.model, [make_input("grpc", k, v) for k, v in case.inputs.items()],
                             headers=wire_headers("grpc", headers), client_timeout=CASE_TIMEOUT_S)
        case.outcome = "ok"
    except InferenceServerException as e:
        status = str(e.status() or "")
        case.detail = (e.message() or "")[:300]
        if status == "StatusCode.DEADLINE_EXCEEDED" or "timed out" in case.detail.lower():
            case.outcome = "hang"
        elif (status.isdigit() and 400 <= int(status) < 500) or status in ALLOWED_GRPC:
            why = _judge_message(case.detail)
            case.outcome = f"bad message: {why}" if why else "client error"
        else:
            case.outcome = f"server error {status}"
    except Exception as e:  # noqa: BLE001 - e.g. a socket timeout: the server did not answer in time
        hang = "timed out" in str(e).lower()
        case.outcome, case.detail = "hang" if hang else f"client failure {type(e).__name__}", str(e)[:300]
    finally:
        case.seconds = time.monotonic() - t0
    return case


def run_stream(case: Case, server, headers) -> Case:
    """One request over a gRPC stream: every response until the final one. A stream error carries no status
    code (tritonclient gives only the message), so it is judged by its message."""
    case = Case(case.model, f"stream {case.label}", case.inputs)
    t0 = time.monotonic()
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers=wire_headers("grpc", headers))
        client.async_stream_infer(case.model, [make_input("grpc", k, v) for k, v in case.inputs.items()],
                                  enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=max(0.1, CASE_TIMEOUT_S - (time.monotonic() - t0)))
            except queue.Empty:
                case.outcome = "hang"
                break
            if error is not None:
                case.detail = (error.message() or "")[:300]
                why = _judge_message(case.detail)
                case.outcome = f"bad message: {why}" if why else "client error"
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                case.outcome = "ok"
                break
    except InferenceServerException as e:
        case.outcome, case.detail = f"stream failure {e.status()}", (e.message() or "")[:300]
    finally:
        try:
            client.stop_stream(cancel_requests=True)
        finally:
            client.close()
        case.seconds = time.monotonic() - t0
    return case


def stub_pids(server) -> dict:
    import psutil

    out = {}
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "triton_python_backend_stub" in p.name() or "python_backend_stub" in " ".join(p.cmdline()[:1]):
                out[p.pid] = " ".join(p.cmdline())[-80:]
        except psutil.Error:
            pass
    return out


def good_rag(server, identity):
    with httpclient.InferenceServerClient(server.http_url, network_timeout=120) as client:
        inputs = {"query": strings(["What does Triton serve?"]).reshape(1, 1),
                  "documents": strings(["Triton serves models over HTTP and gRPC."]).reshape(1, 1)}
        result = client.infer("rag", [make_input("http", k, v) for k, v in inputs.items()],
                              headers=wire_headers("http", identity))
        return json.loads(result.as_numpy("answer").reshape(-1)[0])


# ------------------------------------------------------------------------------------------- the test
def test_bad_input_never_yields_a_server_error(server, http, identity):
    index = [m for m in http.get_model_repository_index(headers=admin_headers()) if m.get("state") == "READY"]
    names = sorted({m["name"] for m in index})
    models = [Model(n, http.get_model_metadata(n), http.get_model_config(n, headers=admin_headers())) for n in names]
    # Everything the project serves must be covered (a model that failed to load would hide here).
    for expected in ("rag", "rag_stream", "rag_orchestrator", "rag_stream_orchestrator", "embed", "rerank", "generate",
                     "embed_text", "rerank_text", "generate_text", "vector_index", "ingest", "model_manager"):
        assert expected in names, f"{expected} is not served (index: {names})"

    # The fuzz collection exists (so rag's base request runs the whole pipeline) and the baseline works.
    with httpclient.InferenceServerClient(server.http_url, network_timeout=120) as client:
        seed = {"doc_ids": strings(["fuzz-seed"]), "texts": strings(["Triton serves models over HTTP and gRPC."]),
                "collection": strings([COLLECTION])}
        client.infer("ingest", [make_input("http", k, v) for k, v in seed.items()],
                     headers=wire_headers("http", None))
    good_rag(server, identity)
    pids_before = stub_pids(server)
    assert pids_before, "no Python stub found under the server: the stub-death check would prove nothing"
    log_start = server.log_path.stat().st_size
    only = os.environ.get("FUZZ_MODELS")                 # e.g. FUZZ_MODELS=generate,rag while debugging
    work = []
    headers = {**auth_headers(), **identity}            # operator key + internal proof: every model reachable
    for m in models if not only else [m for m in models if m.name in only.split(",")]:
        for case in catalogue(m):
            if m.decoupled:
                work.append((run_stream, (case, server, headers)))
            else:
                work.append((run_unary, (case, "http", server, headers)))
                if case.raw is None:
                    work.append((run_unary, (case, "grpc", server, headers)))
    t0 = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda w: w[0](*w[1]), work))
    elapsed = time.monotonic() - t0

    failures = [c for c in results if c.outcome not in ("ok", "client error", KNOWN_TRITON_500)]
    known = [c for c in results if c.outcome == KNOWN_TRITON_500]
    by_model = {}
    for c in results:
        by_model.setdefault(c.model, [0, 0])[c.outcome == "ok"] += 1
    summary = ", ".join(f"{k}: {v[0]}+{v[1]}ok" for k, v in sorted(by_model.items()))
    from collections import Counter
    for name in sorted(by_model):
        common = Counter(c.detail[:90] for c in results if c.model == name and c.outcome == "client error")
        print(f"{name}: most common refusals: {common.most_common(2)}")
    slowest = sorted(results, key=lambda c: -c.seconds)[:6]
    print("\nslowest: " + "; ".join(f"{c.model} {c.label} {c.outcome} {c.seconds:.1f}s" for c in slowest))
    print(f"\nfuzz: {len(results)} requests in {elapsed:.1f}s ({summary}); "
          f"{len(known)} answered by Triton core's HTTP parser with 500")
    assert not failures, f"{len(failures)} of {len(results)} cases failed:\n" + "\n".join(
        f"  {c.model} | {c.label} -> {c.outcome}: {c.detail[:200]!r}" for c in failures[:60])

    # The server is unharmed: ready, a good request succeeds, no stub died, none was reported unhealthy.
    assert http.is_server_ready()
    answer = good_rag(server, identity)
    assert "answer" in answer
    log = server.log_path.read_bytes()[log_start:].decode("utf-8", "replace")
    assert "is not healthy" not in log, "a stub was reported unhealthy during the fuzz run"
    died = set(pids_before) - set(stub_pids(server))
    assert not died, f"stubs died during the fuzz run: {[pids_before[p] for p in died]}"
