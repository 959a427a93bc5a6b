"""Child requests through the server's own gRPC endpoint instead of BLS, for two reasons.

1. Decoupled children (``generate``), always: :func:`stream`. The 24.10 stub can deadlock when two threads of one
   stub use decoupled BLS at once (three locks taken in a cycle; README "When a Python stub dies"), and its
   response iterators are what freed numpy arrays without the GIL (issue 11). A gRPC stream has neither, and
   it can be cancelled. Without ``$TRITON_GRPC_PORT`` the caller falls back to ``exec(decoupled=True)``.
2. A non-decoupled child at a priority level other than its model's default: :func:`infer`.

In Triton 2.51 (python_backend r24.10) ``pb_utils.InferenceRequest`` has no priority argument, and the request
executor sets none on the child it builds (``request_executor.cc``: id, correlation id, flags, timeout,
parameters): a BLS child always has priority 0, which Triton maps to the target's ``default_priority_level``.
The only way for a Python model to give a child another level is to send it through a protocol endpoint, where
the ``priority`` parameter is Triton's own (``grpc/infer_handler.cc``). This module does that for the
non-decoupled children of background work (:func:`ragstack.triton.adapter.bls_infer` decides); the cost is a
local gRPC round trip (serialising the tensors), small next to an engine batch. What a child loses on this path:
the parent's trace (Triton's BLS trace linkage exists only in-process).

The server's gRPC port is ``$TRITON_GRPC_PORT`` (set by tools/serve_triton.sh and ragstack_dev/server.py), reached on
the address the server binds (``ragstack.lifecycle.triton_io.local_host``); without it :func:`available` is False
and children keep the plain BLS path (the model's default level). A loopback child carries what a BLS child
carries (``ragstack.governance.access.child_parameters``): the parent's forwarded headers and the server's internal proof.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Iterator, Optional

from ragstack.contracts import client as client_io
from ragstack.governance import priority as prio
from ragstack.contracts.errors import InvalidInput, Unavailable
from ragstack.settings import current

log = logging.getLogger(__name__)
PORT_ENV = "TRITON_GRPC_PORT"
# An engine call of background work waits at most this long for its answer (the background queue's own timeout,
# 60 s, rejects it earlier when it cannot even start).
CLIENT_TIMEOUT_S = 600.0

_MAX_MESSAGE = 2 ** 31 - 1       # tritonclient.grpc.MAX_GRPC_MESSAGE_SIZE
_CHANNEL_ARGS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE),
                 ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
_client = None
_lock = threading.Lock()
# Stream clients whose last stream ended with its final response: the next stream reuses one and its open channel
# (a new client is a new channel: a TCP connection and an HTTP/2 handshake with the server, per call).
_idle_streams: list = []
IDLE_STREAMS_MAX = 8


def prepare() -> None:
    """Import the gRPC client and make one stream client (its channel connects on first use) now, in a model's
    initialize before ``ta.freeze_startup_heap``, rather than in the first call."""
    import tritonclient.utils  # noqa: F401

    if available():
        _release_stream_client(_stream_client(), True)


def _stream_client():
    with _lock:
        if _idle_streams:
            return _idle_streams.pop()
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(_address(), channel_args=_CHANNEL_ARGS)


def _release_stream_client(client, reusable: bool) -> None:
    if reusable:
        with _lock:
            if len(_idle_streams) < IDLE_STREAMS_MAX:
                _idle_streams.append(client)
                return
    client.close()


def available() -> bool:
    return current().grpc_port is not None


def _c():
    global _client
    with _lock:
        if _client is None:
            import tritonclient.grpc as grpcclient

            _client = grpcclient.InferenceServerClient(_address(), channel_args=_CHANNEL_ARGS)
        return _client


def _address() -> str:
    from ragstack.lifecycle.triton_io import local_host

    return f"{local_host()}:{current().grpc_port}"


def error(model: str, exc: Exception, level: Optional[int]) -> Exception:
    """The exception a parent raises for a failed loopback child, classed like a BLS child's error."""
    from ragstack.triton.adapter import child_error

    status = (exc.status() if callable(getattr(exc, "status", None)) else None) or ""
    msg = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    queued = prio.queue_error(model, msg, level)
    if queued:
        return Unavailable(queued)
    if status.endswith("INVALID_ARGUMENT"):
        return InvalidInput(msg)
    if status.endswith("UNAVAILABLE"):
        return Unavailable(f"model '{model}' cannot serve now ({msg}); retry shortly")
    return child_error(model, msg)


def _request(model: str, inputs: dict, outputs, parameters: dict) -> tuple:
    """Client-side tensors (by ``model``'s contract), requested outputs and the child's parameters: what a BLS
    child would carry (the parent's forwarded headers minus the client's key, and the server's internal proof)."""
    from ragstack.governance.access import child_parameters

    tensors = client_io.infer_inputs("grpc", model, inputs)
    requested = client_io.requested_outputs("grpc", outputs)
    params = {k: v for k, v in child_parameters(parameters).items() if isinstance(v, (str, int, bool))}
    return tensors, requested, params or None


def _version(version: int) -> str:
    return str(version) if version and version > 0 else ""


def infer(model: str, inputs: dict, outputs, parameters: dict, level: int, version: int = -1) -> dict:
    """One blocking call to ``model`` at Triton priority ``level``: {name: array} in, {name: array} out."""
    from tritonclient.utils import InferenceServerException

    tensors, requested, params = _request(model, inputs, outputs, parameters)
    try:
        result = _c().infer(model, tensors, model_version=_version(version), outputs=requested,
                            priority=int(level), parameters=params, client_timeout=CLIENT_TIMEOUT_S)
    except InferenceServerException as e:
        raise error(model, e, level) from None
    return client_io.outputs(result, outputs)


def stream(model: str, inputs: dict, outputs, parameters: dict, level: Optional[int] = None,
           version: int = -1, timeout_s: float = CLIENT_TIMEOUT_S) -> Iterator[dict]:
    """One call to the decoupled ``model`` over a gRPC stream of its own: yields {name: array} per response that
    carries outputs, returns after the final one. ``level`` None: the model's default priority. Closing the
    generator before the end cancels the request in Triton (a BLS child cannot be cancelled in 24.10).

    The decoupled children of the pipeline (``generate``) go this way rather than ``exec(decoupled=True)``: the 24.10
    stub can deadlock on that path (see README "When a Python stub dies")."""
    tensors, requested, params = _request(model, inputs, outputs, parameters)
    responses: "queue.SimpleQueue" = queue.SimpleQueue()
    client = _stream_client()
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, tensors, model_version=_version(version), outputs=requested,
                                  enable_empty_final_response=True, priority=int(level or 0), parameters=params)
        while True:
            try:
                result, err = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise Unavailable(f"model '{model}' sent nothing for {timeout_s:.0f} s; retry shortly") from None
            if err is not None:
                raise error(model, err, level)
            arrays = client_io.outputs(result, outputs)
            final = result.get_response().parameters["triton_final_response"].bool_param
            del result
            if arrays:
                yield arrays
            if final:
                finished = True
                return
    finally:
        reusable = False
        try:
            client.stop_stream(cancel_requests=not finished)
            reusable = finished      # a cancelled or failed stream's client is not reused
        finally:
            _release_stream_client(client, reusable)
