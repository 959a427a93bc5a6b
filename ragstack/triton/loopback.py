"""Child requests through the server's own HTTP endpoint instead of BLS, for two reasons.

1. Decoupled children (``generate``), always: :func:`stream`, over Triton's generate extension
   (``POST /v2/models/<m>/generate_stream``, server-sent events). The 24.10 stub can deadlock when two threads of one
   stub use decoupled BLS at once (three locks taken in a cycle; README "When a Python stub dies"), and its
   response iterators are what freed numpy arrays without the GIL (issue 11). An HTTP stream has neither, and
   closing its connection cancels the request (Triton sets ``is_cancelled`` when an SSE client goes away). Without
   ``$TRITON_HTTP_PORT`` the caller falls back to ``exec(decoupled=True)``.
2. A non-decoupled child at a priority level other than its model's default: :func:`infer`
   (``POST /v2/models/<m>/infer`` with the binary tensor extension and Triton's ``priority`` parameter).

In Triton 2.51 (python_backend r24.10) ``pb_utils.InferenceRequest`` has no priority argument, and the request
executor sets none on the child it builds (``request_executor.cc``: id, correlation id, flags, timeout,
parameters): a BLS child always has priority 0, which Triton maps to the target's ``default_priority_level``.
The only way for a Python model to give a child another level is to send it through a protocol endpoint, where
``priority`` is Triton's own request parameter (``http_server.cc``). This module does that for the non-decoupled
children of background work (:func:`ragstack.triton.adapter.bls_infer` decides); the cost is a local HTTP round
trip (the tensors as bytes), small next to an engine batch. A stream has no Triton priority (the generate
extension turns every field that is not an input into a request parameter): its level travels as the
``x-priority`` parameter, which the generate engine admits by. What a child loses on this path: the parent's trace
(Triton's BLS trace linkage exists only in-process).

Why HTTP and not gRPC (what this module used before): memory. ``import grpc`` costs a stub ~14 MiB of RSS (its C
core and asyncio) and ``tritonclient.grpc`` ~17 MiB, paid by every orchestrator and ``generate_text`` stub; the
few HTTP/1.1 exchanges needed here are written on ``socket`` (:class:`_Connection`).

The generate extension maps a JSON field to an input of the same name: a number, string or boolean is a
one-element tensor, a flat list a 1-D one (the batch dimension of a batching model is added by Triton), and each
response comes back as one JSON object with every output flattened. So a stream carries inputs that are one value
or one row (``input_ids``, the scalars, the guide text): :func:`streamable` says whether a request's inputs are; a
multi-row input (``stop_words_list``) keeps the BLS path. Outputs are rebuilt with their contract's dtype and a
batch of one, the last dimension taking the length (``output_ids`` ``[1, 1, n]``).

The server's HTTP port is ``$TRITON_HTTP_PORT`` (set by tools/serve_triton.sh, ragstack_dev/server.py and the
image), reached on the address the server binds (``Settings.local_host``); without it
:func:`available` is False and children keep the plain BLS path (the model's default level). A loopback child
carries what a BLS child carries (``ragstack.governance.access.child_parameters``): the parent's forwarded headers
and the server's internal proof.
"""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from typing import Iterator, Optional

import numpy as np

from ragstack.contracts import tensors as contracts
from ragstack.governance import priority as prio
from ragstack.contracts.errors import InvalidInput, Unavailable
from ragstack.settings import current

log = logging.getLogger(__name__)
PORT_ENV = "TRITON_HTTP_PORT"
# An engine call of background work waits at most this long for its answer (the background queue's own timeout,
# 60 s, rejects it earlier when it cannot even start); a stream at most this long between two responses.
CLIENT_TIMEOUT_S = 600.0
# Connections whose last exchange ended cleanly are kept for the next call (at most this many per stub): a new
# one costs a TCP handshake with the server.
IDLE_CONNECTIONS_MAX = 8

_lock = threading.Lock()
_idle: list = []
# The contracts' numeric types by Triton's wire name, and back (BYTES is written and read apart).
_NP = {contracts.CLIENT_DTYPES[t]: np_type for t, np_type in contracts.NP_DTYPES.items() if np_type is not np.object_}
_DATATYPES = {np.dtype(np_type).str: name for name, np_type in _NP.items()}


class LoopbackError(Exception):
    """A child's error as the server reported it: the HTTP status and the server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def available() -> bool:
    return current().http_port is not None


def prepare() -> None:
    """Open one connection now, in a model's initialize before ``ta.freeze_startup_heap``, rather than in the first
    call (nothing happens when the server is not listening yet: it opens its endpoints after the start-up loads)."""
    if available():
        conn = _Connection()
        try:
            conn.open(5.0)
        except OSError:
            conn.close()
            return
        _release(conn, True)


class _Closed(OSError):
    """The server closed the connection before an answer began."""


class _Connection:
    """One keep-alive HTTP/1.1 connection to this server: the part of the protocol Triton's endpoints use (a POST
    with a Content-Length body; an answer with a Content-Length or chunked body). Written on ``socket`` rather than
    ``http.client``, which imports ``ssl`` and the ``email`` parser (~2.2 MiB of RSS in every stub that calls)."""

    def __init__(self):
        self.sock = None
        self.file = None

    def open(self, timeout_s: float) -> None:
        settings = current()
        # the host as bytes: getaddrinfo would otherwise run a str through the idna codec (and import it)
        host = settings.local_host.strip("[]").encode("ascii")
        self.sock = socket.create_connection((host, settings.http_port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        for part in (self.file, self.sock):
            if part is not None:
                try:
                    part.close()
                except OSError:
                    pass
        self.sock = self.file = None

    def post(self, path: str, body: bytes, headers: dict, timeout_s: float) -> "_Response":
        """Send one request and read the answer's status line and headers."""
        if self.sock is None:
            self.open(timeout_s)
        self.sock.settimeout(timeout_s)
        head = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        line = self.file.readline(65537)
        if not line:
            raise _Closed("the server closed the connection")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise OSError(f"not an HTTP status line: {line[:80]!r}")
        response = _Response(self.file, int(parts[1]), parts[0] == b"HTTP/1.0")
        while True:
            line = self.file.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            response.headers[key.strip().lower()] = value.strip()
        response.begin()
        return response


class _Response:
    """An answer's body, read as a whole (:meth:`read`) or line by line (:meth:`readline`, for server-sent events);
    ``done`` once its end was read, ``will_close`` when the connection cannot serve another request."""

    def __init__(self, file, status: int, http10: bool):
        self.file, self.status, self.headers = file, status, {}
        self.will_close = http10
        self.done = False
        self._chunked = False
        self._left = 0               # bytes left of the body (Content-Length) or of the current chunk
        self._buffer = b""

    def begin(self) -> None:
        self.will_close = self.will_close or self.headers.get("connection", "").lower() == "close"
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            self._left = int(self.headers["content-length"])
            self.done = self._left == 0
        else:
            self._left = -1          # until the server closes the connection
            self.will_close = True

    def getheader(self, name: str) -> Optional[str]:
        return self.headers.get(name.lower())

    def _piece(self) -> bytes:
        """The next piece of the body (b"" at its end)."""
        if self.done:
            return b""
        if not self._chunked:
            data = self.file.read(self._left) if self._left >= 0 else self.file.read()
            if self._left >= 0 and len(data) < self._left:
                raise OSError("the server closed the connection in the middle of an answer")
            self.done = True
            return data
        size_line = self.file.readline(65537)
        if not size_line:
            raise OSError("the server closed the connection in the middle of an answer")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while self.file.readline(65537) not in (b"\r\n", b"\n", b""):
                pass                 # trailers
            self.done = True
            return b""
        data = self.file.read(size)
        self.file.readline(65537)    # the CRLF after the chunk
        if len(data) < size:
            raise OSError("the server closed the connection in the middle of an answer")
        return data

    def read(self) -> bytes:
        parts = [self._buffer]
        self._buffer = b""
        while not self.done:
            parts.append(self._piece())
        return b"".join(parts)

    def readline(self) -> bytes:
        while b"\n" not in self._buffer and not self.done:
            self._buffer += self._piece()
        at = self._buffer.find(b"\n")
        if at < 0:
            line, self._buffer = self._buffer, b""
        else:
            line, self._buffer = self._buffer[:at + 1], self._buffer[at + 1:]
        return line


def _connection() -> _Connection:
    with _lock:
        if _idle:
            return _idle.pop()
    return _Connection()


def _release(conn: _Connection, reusable: bool) -> None:
    if reusable and conn.sock is not None:
        with _lock:
            if len(_idle) < IDLE_CONNECTIONS_MAX:
                _idle.append(conn)
                return
    conn.close()


def error(model: str, exc: Exception, level: Optional[int]) -> Exception:
    """The exception a parent raises for a failed loopback child, classed like a BLS child's error."""
    from ragstack.triton.adapter import child_error

    status = getattr(exc, "status", None)
    msg = getattr(exc, "message", None) or str(exc)
    queued = prio.queue_error(model, msg, level)
    if queued:
        return Unavailable(queued)
    if status == 400:
        return InvalidInput(msg)
    if status == 503:
        return Unavailable(f"model '{model}' cannot serve now ({msg}); retry shortly")
    return child_error(model, msg)


def _path(model: str, version: int, endpoint: str) -> str:
    return f"/v2/models/{model}" + (f"/versions/{int(version)}" if version and version > 0 else "") + f"/{endpoint}"


def _parameters(parameters: dict) -> dict:
    """What a BLS child would carry (the parent's forwarded headers minus the client's key, and the server's
    internal proof), as request parameters: strings, integers and booleans."""
    from ragstack.governance.access import child_parameters

    return {k: v for k, v in child_parameters(parameters).items() if isinstance(v, (str, int, bool))}


def _exchange(model: str, path: str, body: bytes, headers: dict, timeout_s: float):
    """Send one request on a kept connection (a new one if the kept one turns out closed) and return the connection
    and its answer, whose status is 200, or raise LoopbackError with the server's message."""
    for attempt in (0, 1):
        conn = _connection()
        reused = conn.sock is not None
        try:
            response = conn.post(path, body, headers, timeout_s)
        except socket.timeout:
            conn.close()
            raise Unavailable(f"model '{model}' sent nothing for {timeout_s:.0f} s; retry shortly") from None
        except (_Closed, BrokenPipeError, ConnectionResetError) as e:
            conn.close()
            if reused and attempt == 0:
                continue             # the server closed a kept connection while it was idle: retry on a new one
            raise Unavailable(f"model '{model}': the server closed the connection ({e}); retry shortly") from None
        except OSError as e:
            conn.close()
            raise Unavailable(f"model '{model}': cannot reach the server's HTTP endpoint ({e}); retry shortly") \
                from None
        if response.status != 200:
            try:
                text = response.read()
            except OSError:
                conn.close()
                text = b""
            else:
                _release(conn, not response.will_close)
            raise LoopbackError(response.status, _error_text(text) or f"HTTP {response.status}")
        return conn, response
    raise AssertionError("unreachable")


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", "")) or body.decode("utf-8", "replace")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- infer
def _bytes_payload(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _bytes_array(raw: bytes, shape) -> np.ndarray:
    out, at = [], 0
    while at < len(raw):
        (n,) = struct.unpack_from("<I", raw, at)
        out.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    arr = np.empty(len(out), dtype=np.object_)
    arr[:] = out
    return arr.reshape(shape)


def _input_arrays(model: str, inputs: dict) -> dict:
    """{name: array} of a request to ``model``, converted by its contract (``Contract.input_arrays``: dtype, BYTES
    encoding, a plain value's batch dimension; None left out); a model without a contract: the arrays as given."""
    contract = contracts.ALL.get(model)
    if contract is None:
        return {name: np.asarray(value) for name, value in inputs.items() if value is not None}
    return contract.input_arrays(inputs)


def _infer_body(model: str, inputs: dict, outputs, parameters: dict, level: int) -> tuple:
    """The request of the binary tensor extension: a JSON header, then each input's bytes."""
    header_inputs, blobs = [], []
    for name, arr in _input_arrays(model, inputs).items():
        if arr.dtype == np.object_:
            datatype, blob = "BYTES", _bytes_payload(arr)
        else:
            datatype = _DATATYPES.get(arr.dtype.str)
            if datatype is None:
                raise InvalidInput(f"{model}: input '{name}' has a dtype the loopback does not send ({arr.dtype})")
            blob = np.ascontiguousarray(arr).tobytes()
        header_inputs.append({"name": name, "shape": list(arr.shape), "datatype": datatype,
                              "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = {"inputs": header_inputs,
              "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
              "parameters": {**_parameters(parameters), "priority": int(level)}}
    head = json.dumps(header).encode()
    return head, b"".join([head, *blobs])


def _infer_outputs(body: bytes, header_length: Optional[str], names) -> dict:
    size = int(header_length) if header_length else len(body)
    header = json.loads(body[:size])
    at, out = size, {}
    for o in header.get("outputs", []):
        shape, datatype = o.get("shape", []), o.get("datatype")
        n = (o.get("parameters") or {}).get("binary_data_size")
        if n is not None:
            raw, at = body[at:at + n], at + n
            arr = _bytes_array(raw, shape) if datatype == "BYTES" else \
                np.frombuffer(raw, dtype=_NP[datatype]).reshape(shape)
        else:
            data = o.get("data", [])
            arr = np.array([d.encode("utf-8") for d in data], dtype=np.object_).reshape(shape) \
                if datatype == "BYTES" else np.array(data, dtype=_NP[datatype]).reshape(shape)
        if o["name"] in names:
            out[o["name"]] = arr
    return out


def infer(model: str, inputs: dict, outputs, parameters: dict, level: int, version: int = -1) -> dict:
    """One blocking call to ``model`` at Triton priority ``level``: {name: array} in, {name: array} out."""
    outputs = list(outputs)
    head, body = _infer_body(model, inputs, outputs, parameters, level)
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    try:
        conn, response = _exchange(model, _path(model, version, "infer"), body, headers, CLIENT_TIMEOUT_S)
    except LoopbackError as e:
        raise error(model, e, level) from None
    try:
        data = response.read()
    except OSError as e:             # socket.timeout included
        conn.close()
        raise Unavailable(f"model '{model}': the answer was cut off ({e}); retry shortly") from None
    _release(conn, not response.will_close)
    return _infer_outputs(data, response.getheader("Inference-Header-Content-Length"), set(outputs))


# ------------------------------------------------------------------------------------------ stream
def _fits(arr: np.ndarray) -> bool:
    """Whether the generate extension can carry this input: one value or one row, BYTES as UTF-8 text."""
    if arr.ndim and int(np.prod(arr.shape[:-1])) != 1:
        return False
    if arr.dtype == np.object_:
        try:
            for v in arr.reshape(-1):
                if isinstance(v, bytes):
                    v.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _field(arr: np.ndarray):
    """An input that :func:`_fits` as a generate-extension field: a scalar for one element, else a list."""
    flat = arr.reshape(-1)
    if arr.dtype == np.object_:
        values = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
    else:
        values = flat.tolist()
    return values[0] if len(values) == 1 else values


def streamable(model: str, inputs: dict) -> bool:
    """Whether :func:`stream` can carry these inputs (one value or one row each; BYTES as UTF-8 text)."""
    return all(value is None or _fits(np.asarray(value)) for value in inputs.values())


def _stream_body(model: str, inputs: dict, parameters: dict) -> bytes:
    fields = dict(_parameters(parameters))
    for name, arr in _input_arrays(model, inputs).items():
        if not _fits(arr):
            raise InvalidInput(f"{model}: input '{name}' of shape {list(arr.shape)} cannot go through the "
                               "generate extension (one value or one row per request)")
        fields[name] = _field(arr)
    return json.dumps(fields).encode()


def _output_array(model: str, name: str, value) -> np.ndarray:
    """An output of the generate extension (flattened JSON) as the array a BLS child would have returned."""
    contract = contracts.ALL.get(model)
    tensor = None
    if contract is not None:
        try:
            tensor = contract.output(name)
        except KeyError:
            tensor = None
    values = value if isinstance(value, list) else [value]
    if tensor is not None and tensor.dtype == "TYPE_STRING":
        arr = np.empty(len(values), dtype=np.object_)
        arr[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
    else:
        arr = np.array(values, dtype=tensor.np_dtype if tensor is not None else None)
    rank = len(tensor.dims) if tensor is not None else 1
    batch = (1,) if contract is None or contract.max_batch_size else ()
    return arr.reshape(batch + (1,) * (rank - 1) + (-1,))


def _events(response) -> Iterator[dict]:
    """The JSON objects of a server-sent-event stream (one per ``data:`` event)."""
    data: list = []
    while True:
        line = response.readline()
        if not line:
            if data:
                yield json.loads("".join(data))
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield json.loads("".join(data))
                data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip().decode("utf-8"))


def stream(model: str, inputs: dict, outputs, parameters: dict, level: Optional[int] = None,
           version: int = -1, timeout_s: float = CLIENT_TIMEOUT_S) -> Iterator[dict]:
    """One call to the decoupled ``model`` over an HTTP stream of its own: yields {name: array} per response that
    carries outputs, returns after the last one. ``level`` only names the level in error messages (the stream's
    level is the ``x-priority`` parameter). Closing the generator before the end closes the connection, which
    cancels the request in Triton (a BLS child cannot be cancelled in 24.10).

    The decoupled children of the pipeline (``generate``) go this way rather than ``exec(decoupled=True)``: the 24.10
    stub can deadlock on that path (see README "When a Python stub dies")."""
    body = _stream_body(model, inputs, parameters)
    names = list(outputs)
    try:
        conn, response = _exchange(model, _path(model, version, "generate_stream"), body,
                                   {"Content-Type": "application/json", "Accept": "text/event-stream"}, timeout_s)
    except LoopbackError as e:
        raise error(model, e, level) from None
    finished = False
    try:
        try:
            for event in _events(response):
                if "error" in event:
                    raise error(model, LoopbackError(0, str(event["error"])), level)
                arrays = {n: _output_array(model, n, event[n]) for n in names if n in event}
                if arrays:
                    yield arrays
        except socket.timeout:
            raise Unavailable(f"model '{model}' sent nothing for {timeout_s:.0f} s; retry shortly") from None
        except (OSError, ValueError) as e:
            raise Unavailable(f"model '{model}': its stream broke off ({e}); retry shortly") from None
        finished = True
    finally:
        # a stream read to its end leaves the connection reusable; closing one mid-stream cancels the request
        _release(conn, finished and response.done and not response.will_close)
