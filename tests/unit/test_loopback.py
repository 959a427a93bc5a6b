"""The loopback client (ragstack/triton/loopback.py) against a local HTTP server that answers as Triton's endpoints
do: server-sent events for /generate_stream, the binary tensor extension for /infer, JSON errors with Triton's
status codes. The real server's side is covered by the integration tests (every rag_stream answer, the background
levels of test_priority, the stub deaths)."""
import json
import socket
import struct
import threading

import numpy as np
import pytest

from ragstack.contracts.errors import InvalidInput, Unavailable
from ragstack.governance import access
from ragstack.triton import loopback


class Server:
    """Accepts connections on loopback; each request is answered by the next scripted reply (bytes, or a callable
    given the request). Records every request and every connection it accepted."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.replies, self.requests, self.connections = [], [], 0
        self.closed_by_client = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline()
                if not line:
                    self.closed_by_client.set()
                    return
                headers = {}
                while True:
                    h = f.readline()
                    if h in (b"\r\n", b""):
                        break
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers.get("content-length", 0)))
                request = {"line": line.decode().strip(), "headers": headers, "body": body}
                self.requests.append(request)
                reply = self.replies.pop(0)
                if callable(reply):
                    reply = reply(conn, request)
                if reply is None:
                    continue
                conn.sendall(reply)
        except OSError:
            self.closed_by_client.set()
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def sse(events, chunk_per_event=True) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for event in events:
        data = b"data: " + json.dumps(event).encode() + b"\n\n"
        out.append(b"%x\r\n%s\r\n" % (len(data), data))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def json_reply(status, obj, reason=b"X") -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status, reason, len(body), body)


@pytest.fixture
def server(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    monkeypatch.setenv(access.SECRET_FILE_ENV, str(secret))
    srv = Server()
    monkeypatch.setenv(loopback.PORT_ENV, str(srv.port))
    monkeypatch.setattr(loopback, "_idle", [])
    yield srv
    for conn in loopback._idle:
        conn.close()
    srv.close()


INPUTS = {"input_ids": np.array([[1, 2, 3]], np.int32), "request_output_len": np.array([[4]], np.int32),
          "guided_decoding_guide": np.array([[b'{"type": "object"}']], np.object_)}
OUTPUTS = ["output_ids", "sequence_length"]


def test_a_stream_sends_the_inputs_as_fields_and_yields_each_event_as_the_contracts_arrays(server):
    server.replies.append(sse([{"output_ids": 7, "sequence_length": 1, "model_name": "generate"},
                               {"output_ids": [8, 9], "sequence_length": 2}, {"model_name": "generate"}]))
    got = list(loopback.stream("generate", INPUTS, OUTPUTS, {"x-engine-hash": "abc", "x-api-key": "k"},
                               level=2, version=3, timeout_s=5))
    assert len(got) == 2                                   # an event without outputs yields nothing
    assert got[0]["output_ids"].shape == (1, 1, 1) and got[0]["output_ids"].dtype == np.int32
    assert got[1]["output_ids"].tolist() == [[[8, 9]]] and got[1]["sequence_length"].tolist() == [[2]]
    request = server.requests[0]
    assert request["line"] == "POST /v2/models/generate/versions/3/generate_stream HTTP/1.1"
    fields = json.loads(request["body"])
    assert fields["input_ids"] == [1, 2, 3] and fields["request_output_len"] == 4
    assert fields["guided_decoding_guide"] == '{"type": "object"}'
    # what a BLS child carries: forwarded headers and the internal proof, never the client's key
    assert fields["x-engine-hash"] == "abc" and access.is_internal(fields) and "x-api-key" not in fields
    assert len(loopback._idle) == 1                        # a stream read to its end leaves its connection kept


def test_a_kept_connection_serves_the_next_calls(server):
    for _ in range(3):
        server.replies.append(sse([{"output_ids": 1, "sequence_length": 1}]))
    for _ in range(3):
        assert len(list(loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5))) == 1
    assert server.connections == 1 and len(server.requests) == 3
    assert server.requests[0]["line"] == "POST /v2/models/generate/generate_stream HTTP/1.1"   # no version


def test_at_most_idle_connections_max_are_kept(server):
    conns = [loopback._Connection() for _ in range(loopback.IDLE_CONNECTIONS_MAX + 2)]
    for conn in conns:
        conn.open(5)
        loopback._release(conn, True)
    assert len(loopback._idle) == loopback.IDLE_CONNECTIONS_MAX
    assert sum(c.sock is None for c in conns) == 2


def test_closing_the_stream_early_closes_its_connection_which_cancels_the_request(server):
    def slow(conn, request):
        conn.sendall(sse([{"output_ids": i, "sequence_length": 1} for i in range(3)])[:-5])   # no end yet
        return None
    server.replies.append(slow)
    gen = loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5)
    next(gen)
    gen.close()
    assert server.closed_by_client.wait(5) and not loopback._idle


@pytest.mark.parametrize("status, message, cls", [
    (400, "invalid regex: the regex does not compile", InvalidInput),
    (503, "Exceeds maximum queue size", Unavailable),
    (500, "engine exploded", Exception),
])
def test_an_error_before_the_stream_keeps_its_class(server, status, message, cls):
    server.replies.append(json_reply(status, {"error": message}))
    with pytest.raises(cls) as err:
        list(loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5))
    assert message.split(":")[0] in str(err.value) or "queue" in str(err.value)
    assert len(loopback._idle) == 1                        # the error answer was read whole: the connection is kept


def test_an_error_event_in_the_stream_is_raised(server):
    server.replies.append(sse([{"output_ids": 1, "sequence_length": 1}, {"error": "model 'generate' failed"}]))
    gen = loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5)
    next(gen)
    with pytest.raises(Exception, match="failed"):
        next(gen)


def test_silence_past_the_timeout_is_unavailable(server):
    server.replies.append(lambda conn, request: None)     # never answers
    with pytest.raises(Unavailable, match="sent nothing"):
        list(loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=0.3))


def test_a_kept_connection_the_server_closed_is_replaced(server):
    def close(conn, request):
        conn.shutdown(socket.SHUT_RDWR)
        return None
    server.replies += [sse([{"output_ids": 1, "sequence_length": 1}]), close,
                       sse([{"output_ids": 2, "sequence_length": 1}])]
    list(loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5))
    got = list(loopback.stream("generate", INPUTS, OUTPUTS, {}, timeout_s=5))
    assert got[0]["output_ids"].item() == 2 and server.connections == 2


def test_only_one_row_inputs_can_stream():
    assert loopback.streamable("generate", INPUTS)
    assert not loopback.streamable("generate", {"stop_words_list": np.zeros((1, 2, 3), np.int32)})
    assert not loopback.streamable("generate", {"guided_decoding_guide": np.array([[b"\xff"]], np.object_)})


def _binary_reply(outputs) -> bytes:
    header, blobs = {"model_name": "embed", "outputs": []}, []
    for name, arr in outputs.items():
        if arr.dtype == np.object_:
            blob = b"".join(struct.pack("<I", len(v)) + v for v in arr.reshape(-1))
            datatype = "BYTES"
        else:
            blob, datatype = arr.tobytes(), {"int32": "INT32", "float32": "FP32"}[arr.dtype.name]
        header["outputs"].append({"name": name, "datatype": datatype, "shape": list(arr.shape),
                                  "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps(header).encode()
    body = head + b"".join(blobs)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(head), len(body), body))


def test_infer_sends_binary_tensors_at_the_level_and_reads_binary_outputs(server):
    emb = np.arange(8, dtype=np.float32).reshape(2, 4)
    server.replies.append(_binary_reply({"embedding": emb, "note": np.array([[b"a"], [b"bc"]], np.object_)}))
    ids = np.array([[5, 6, 7], [8, 9, 0]], np.int32)
    out = loopback.infer("embed", {"input_ids": ids, "attention_mask": np.ones_like(ids)}, ["embedding", "note"],
                         {"x-priority": "background", "x-api-key": "k"}, level=2)
    assert out["embedding"].tolist() == emb.tolist() and out["note"].tolist() == [[b"a"], [b"bc"]]
    request = server.requests[0]
    assert request["line"] == "POST /v2/models/embed/infer HTTP/1.1"
    size = int(request["headers"]["inference-header-content-length"])
    header = json.loads(request["body"][:size])
    assert header["parameters"]["priority"] == 2 and access.is_internal(header["parameters"])
    assert "x-api-key" not in header["parameters"]
    first = header["inputs"][0]
    assert (first["name"], first["shape"], first["datatype"]) == ("input_ids", [2, 3], "INT32")
    n = first["parameters"]["binary_data_size"]
    assert np.frombuffer(request["body"][size:size + n], np.int32).tolist() == ids.reshape(-1).tolist()
    assert [o["parameters"]["binary_data"] for o in header["outputs"]] == [True, True]


def test_infer_errors_keep_their_class(server):
    server.replies.append(json_reply(503, {"error": "Exceeds maximum queue size"}))
    with pytest.raises(Unavailable, match="full queue at the background level"):
        loopback.infer("embed", {"input_ids": np.zeros((1, 2), np.int32)}, ["embedding"], {}, level=2)


def test_only_a_traced_child_with_tracing_on_keeps_the_bls_path(monkeypatch):
    from ragstack.triton import adapter as ta

    traced, untraced = ta.Hop({}, trace=object()), ta.Hop({})
    monkeypatch.delenv(ta.TRACE_ENV, raising=False)
    assert not ta._traced(traced) and not ta._traced(untraced) and not ta._traced(None)
    monkeypatch.setenv(ta.TRACE_ENV, "/tmp/trace.json")
    assert ta._traced(traced) and not ta._traced(untraced) and not ta._traced(None)
