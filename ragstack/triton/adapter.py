"""The one place that turns Triton Python-backend objects into plain values and back.

Every ``model.py`` is a thin adapter over the core; the conversions they share live here. ``pb`` is the
``triton_python_backend_utils`` module, passed in so this file imports nothing from Triton (the unit tests pass
a fake).
"""
from __future__ import annotations

import collections
import functools
import gc
import json
import logging
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ragstack import settings as rs
from ragstack.governance.access import child_parameters, require_internal
from ragstack.contracts.tensors import Contract
from ragstack.contracts.errors import NOT_SERVING_MARKERS, InvalidInput, Unavailable  # noqa: F401 - re-exported

log = logging.getLogger("ragstack")

# The variables' names, for messages; their values come from ragstack.settings.
ENGINE_PATH_ENV = "ENGINE_PATH"
DATA_PATH_ENV = "RAG_DATA_PATH"
DEFAULT_POLICY_FILE = rs.Settings().policy_file      # the default policy, for scripts that load it directly


def model_parameters(args: dict) -> dict:
    """The ``parameters`` of the model config as {key: string}."""
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


# A stub that outlives its server. Triton 2.51's stub checks every 300 ms that tritonserver is alive and exits
# when it is not, but that exit first joins the stub-to-parent thread; when tritonserver dies while a thread of
# the stub waits for the parent's answer to a round trip (a request's is_cancelled(), a response send, a custom
# metric's set()), the join never returns and the stub stays forever with its memory. Seen with gdb on orphaned
# generate and model_manager stubs: the health thread blocked in TerminateStubToParentQueueMonitor, one thread in
# SendIsCancelled or Metric::SendSetValueRequest, the latter holding the GIL, so no Python thread of the stub can
# act either. The fallback is therefore outside the interpreter: a small shell process per stub that kills the
# stub PARENT_GRACE_S after tritonserver is gone (which leaves the stub's own check time to work when it can)
# and ends by itself when the stub ends.
PARENT_CHECK_S = 1.0
PARENT_GRACE_S = 5.0
_WATCH_SCRIPT = r"""
server=$1 stub=$2 check=$3 grace=$4
server_alive() { [ -r /proc/$server/stat ] && ! grep -q ') [ZX] ' /proc/$server/stat; }
while kill -0 "$stub" 2>/dev/null; do
    if ! server_alive; then
        sleep "$grace"
        kill -9 "$stub" 2>/dev/null
        exit 0
    fi
    sleep "$check"
done
"""
_watcher: Optional["subprocess.Popen"] = None
_watcher_lock = threading.Lock()


def watch_server(server_pid: int, stub_pid: int, check_s: float = PARENT_CHECK_S,
                 grace_s: float = PARENT_GRACE_S) -> "subprocess.Popen":
    """Start the shell process that kills ``stub_pid`` ``grace_s`` after ``server_pid`` is gone."""
    return subprocess.Popen(["/bin/sh", "-c", _WATCH_SCRIPT, "ragstack-watch", str(server_pid), str(stub_pid),
                             str(check_s), str(grace_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True)


def exit_with_server() -> "subprocess.Popen":
    """Every Python model calls this in ``initialize``: once per stub process, a watcher that ends this stub when
    the tritonserver that started it (its parent) is gone."""
    global _watcher
    with _watcher_lock:
        if _watcher is None or _watcher.poll() is not None:
            _watcher = watch_server(os.getppid(), os.getpid())
        return _watcher


def freeze_startup_heap() -> None:
    """Every Python model calls this last in ``initialize``: what loading built (modules, tokenizers, engines,
    policies) is collected once and then left out of the cyclic garbage collector's scans (``gc.freeze``, as
    vLLM's server does after start-up). Without it a full collection scans all of it: 13-14 ms in the
    orchestrator's stub, measured with gc callbacks, two of them inside the response time of each long answer;
    after it a collection scans only what requests made."""
    gc.collect()
    gc.freeze()


def _under(value: str, base: Optional[Path], env: str, what: str) -> Path:
    """``value`` if absolute, else relative to ``base`` (the folder the environment variable ``env`` names)."""
    path = Path(value)
    if path.is_absolute():
        return path
    if base is None:
        raise RuntimeError(f"{what} {value!r} is relative and {env} is not set "
                           "(start the server with tools/serve_triton.sh)")
    return Path(base) / path


def engine_dir_path(value: str) -> Path:
    """Where an ``engine_dir`` parameter points: ``value`` if absolute, else under $ENGINE_PATH (RuntimeError when
    that is not set). The one resolver of engine folders; it does not check that the folder exists."""
    return _under(value, rs.current().engine_path, ENGINE_PATH_ENV, "engine_dir")


def resolve_engine_dir(value: str) -> Path:
    """An engine folder (:func:`engine_dir_path`) that must exist."""
    path = engine_dir_path(value)
    if not path.is_dir():
        raise RuntimeError(f"engine folder {path} does not exist: build it (tools/build_models.py)")
    return path


def resolve_data_dir(value: str) -> Path:
    """A data folder (created if missing): absolute, or relative to $RAG_DATA_PATH."""
    path = _under(value, rs.current().data_path, DATA_PATH_ENV, "data folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_threads(params: dict) -> None:
    n = params.get("num_threads")
    if n:
        import torch

        torch.set_num_threads(int(n))


def input_array(pb, request, contract: Contract, name: str, default=None) -> Optional[np.ndarray]:
    """The named input as a numpy array, or ``default`` when an optional input is absent."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        if not contract.input(name).optional:
            raise InvalidInput(f"{contract.name}: required input '{name}' is missing")
        return default
    return tensor.as_numpy()


def _decode(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"input '{name}' is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return str(value)


def input_strings(pb, request, contract: Contract, name: str, default=None) -> Optional[list]:
    """A BYTES input as a flat list of str (UTF-8 checked)."""
    arr = input_array(pb, request, contract, name)
    if arr is None:
        return default
    return [_decode(v, name) for v in arr.reshape(-1)]


def input_string(pb, request, contract: Contract, name: str, default=None) -> Optional[str]:
    values = input_strings(pb, request, contract, name)
    if values is None:
        return default
    if len(values) != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one string, got {len(values)}")
    return values[0]


def input_scalar(pb, request, contract: Contract, name: str, default=None):
    arr = input_array(pb, request, contract, name)
    if arr is None:
        return default
    if arr.size != 1:
        raise InvalidInput(f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()


def requested_outputs(request) -> Optional[frozenset]:
    """The output names the caller asked for (None: all of them, as Triton fills the list when none is named).
    Asked in ``execute``, on the stub's main thread, and handed to the worker that answers: a threaded stub's
    workers touch the request object as little as they can (the 24.10 Python backend is not thread-safe)."""
    try:
        names = request.requested_output_names()
    except Exception:  # noqa: BLE001 - an older backend, or a fake request: send everything
        return None
    return frozenset(names) if names else None


def output_tensors(pb, contract: Contract, values: dict, requested: Optional[frozenset] = None) -> list:
    """pb.Tensor objects for the given {name: value}, cast to the contract's dtype; only the ``requested`` ones
    when given (see :func:`requested_outputs`).

    Sending only what was asked for is not an optimisation: the Python backend of Triton 2.51 (24.10) drops the
    outputs a caller did not request *without holding the GIL*, so their numpy arrays are freed while other
    threads of the stub run Python. In a stub that answers from several threads (the orchestrator, the
    generate engine's batcher) that corrupts reference counts and, in the end, aborts the whole server
    (``Reference count error detected ... dtype 5``, ``double free``; fixed upstream in python_backend #390).
    """
    tensors = []
    for name, value in values.items():
        if requested is not None and name not in requested:
            continue
        tensors.append(pb.Tensor(name, contract.output(name).array(value)))
    return tensors


# Triton 2.51 hands a BLS parent every child error as INTERNAL, so the class travels in the message too:
# every INVALID_ARG message starts with this marker, and a parent re-raises such a child error as InvalidInput;
# likewise UNAVAILABLE.
INVALID_MARK = "invalid input: "
UNAVAILABLE_MARK = "unavailable: "
# An error message travels in a gRPC status (trailing metadata: 16 KiB at most on the client, or the caller gets
# RESOURCE_EXHAUSTED instead of the error) and in an ensemble's or a BLS parent's own message: messages that echo
# a huge input are cut to this many characters.
MAX_ERROR_CHARS = 2000


def clip_message(msg: str, limit: int = MAX_ERROR_CHARS) -> str:
    if len(msg) <= limit:
        return msg
    return f"{msg[:limit]}... [{len(msg) - limit} more characters]"


def error_response(pb, exc: BaseException):
    """INVALID_ARG for bad input with its message; UNAVAILABLE when a model the request needs cannot serve it
    now; INTERNAL with a short message (no traceback) otherwise."""
    if isinstance(exc, InvalidInput):
        msg = clip_message(str(exc))
        return pb.InferenceResponse(error=pb.TritonError(msg if msg.startswith(INVALID_MARK) else INVALID_MARK + msg,
                                                         pb.TritonError.INVALID_ARG))
    if isinstance(exc, Unavailable):
        msg = clip_message(str(exc))
        return pb.InferenceResponse(error=pb.TritonError(
            msg if msg.startswith(UNAVAILABLE_MARK) else UNAVAILABLE_MARK + msg, pb.TritonError.UNAVAILABLE))
    log.exception("internal error")
    return pb.InferenceResponse(error=pb.TritonError(clip_message(f"internal error: {type(exc).__name__}: {exc}"),
                                                     pb.TritonError.INTERNAL))


def child_error(model: str, msg: str) -> Exception:
    """The exception a BLS parent raises for its child's error message: the class survives the hop."""
    if msg.startswith(INVALID_MARK):
        return InvalidInput(msg)
    if msg.startswith(UNAVAILABLE_MARK):
        return Unavailable(msg)
    from ragstack.governance.priority import queue_error

    queued = queue_error(model, msg)           # the child's queue policy turned it away
    if queued:
        return Unavailable(queued)
    if any(marker in msg for marker in NOT_SERVING_MARKERS):
        return Unavailable(f"model '{model}' cannot serve now ({msg.strip()}); retry shortly")
    return RuntimeError(msg)


def raise_for_error(response, model: str = "?") -> None:
    """Turn a BLS child's error response into an exception that keeps INVALID_ARG / UNAVAILABLE."""
    if not response.has_error():
        return
    raise child_error(model, response.error().message())


def pad_to(arr: np.ndarray, length: int, side: str) -> np.ndarray:
    """Pad [b, l] int32 rows with zeros to ``length`` on ``side`` (masked positions: the value is never read)."""
    extra = length - arr.shape[1]
    if extra <= 0:
        return arr
    pad = ((0, 0), (extra, 0)) if side == "left" else ((0, 0), (0, extra))
    return np.pad(arr, pad)


def token_inputs(pb, request, contract: Contract) -> tuple:
    """A token-id engine request's ``(input_ids, attention_mask, None)``, checked to have the same shape."""
    ids = input_array(pb, request, contract, "input_ids")
    mask = input_array(pb, request, contract, "attention_mask")
    if ids.shape != mask.shape:
        raise InvalidInput(f"{contract.name}: input_ids {list(ids.shape)} and attention_mask "
                           f"{list(mask.shape)} must have the same shape")
    return ids, mask, None


def execute_token_batch(pb, requests, contract: Contract, engine, padding_side: str, output_name: str = "",
                        *, read: Callable = token_inputs, outputs: Optional[Callable] = None,
                        isolate: bool = True) -> list:
    """Run a token-id engine (embed, rerank) once over all the requests the dynamic batcher gave us.

    Triton hands the Python backend a list of requests; ``read(pb, request, contract)`` gives each one's
    ``(ids [b_i, L_i], mask, extra)`` (by default its ``input_ids`` and ``attention_mask``; a text model
    tokenizes here). They are padded to one length on the engine's padding side and run as a single call,
    ``engine(ids, mask)``, then split back: ``outputs(rows, extra)`` gives a request's {output: value} (by
    default ``{output_name: rows}``). A request that cannot be read gets its own error; the others still run.
    When the batch call fails, ``isolate`` runs each request alone to find the bad one (an engine's own input
    checks); otherwise every request of the batch gets the error (an engine call that is UNAVAILABLE).
    """
    responses = [None] * len(requests)
    batch = []
    for i, request in enumerate(requests):
        try:
            require_internal(request.parameters(), contract.name)
            ids, mask, extra = read(pb, request, contract)
            batch.append((i, ids, mask, extra))
        except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
            responses[i] = error_response(pb, e)
    if not batch:
        return responses

    def respond(i, rows, extra):
        values = outputs(rows, extra) if outputs is not None else {output_name: _rows(rows)}
        return pb.InferenceResponse(output_tensors=output_tensors(pb, contract, values,
                                                                  requested_outputs(requests[i])))
    length = max(ids.shape[1] for _, ids, _, _ in batch)
    ids = np.concatenate([pad_to(x, length, padding_side) for _, x, _, _ in batch])
    mask = np.concatenate([pad_to(m, length, padding_side) for _, _, m, _ in batch])
    try:
        values = engine(ids, mask)
    except Exception as e:  # noqa: BLE001
        if len(batch) == 1 or not isolate:
            for i, *_ in batch:
                responses[i] = error_response(pb, e)
            return responses
        # Find out which request is bad rather than failing all of them.
        for i, x, m, extra in batch:
            try:
                responses[i] = respond(i, engine(x, m), extra)
            except Exception as e1:  # noqa: BLE001
                responses[i] = error_response(pb, e1)
        return responses
    start = 0
    for i, x, _, extra in batch:
        rows = values[start:start + x.shape[0]]
        start += x.shape[0]
        responses[i] = respond(i, rows, extra)
    return responses


def _rows(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows.reshape(-1, 1) if rows.ndim == 1 else rows


class Hop:
    """What a BLS child request must carry from its parent: the forwarded x-* headers (a child does not
    inherit them by itself) and the trace, so Triton's trace shows the child as a span of the parent."""

    def __init__(self, parameters: Optional[dict] = None, trace=None):
        self.parameters = parameters or {}
        self.trace = trace

    @classmethod
    def of(cls, request, trace: bool = True) -> "Hop":
        """``trace=False`` where the parent's execute() has already returned (decoupled models answering
        from a worker thread): Triton 2.51 crashes the server on a child started with a released trace."""
        from ragstack.governance.identity import forward_headers

        return cls(forward_headers(request.parameters()), request.trace() if trace else None)

    def kwargs(self) -> dict:
        out = {}
        # the client's key and any forged internal proof stay here; the server's proof goes with every child
        parameters = child_parameters(self.parameters)
        if parameters:
            out["parameters"] = parameters
        if self.trace is not None:
            out["trace"] = self.trace
        return out


def _bls_request(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None, version: int = -1):
    """``version`` > 0: that version of ``model`` (the one an engine lease names), else whichever Triton serves.
    Every child request proves it comes from this server (ragstack.governance.access): with or without a hop."""
    kwargs = dict((hop or Hop()).kwargs())
    if version is not None and version > 0:
        kwargs["model_version"] = int(version)
    return pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(k, v) for k, v in inputs.items()],
                               requested_output_names=list(outputs), **kwargs)


def _response_arrays(pb, response, outputs, model: str = "?") -> dict:
    raise_for_error(response, model)
    out = {}
    for name in outputs:
        t = pb.get_output_tensor_by_name(response, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out


def _loopback_level(model: str, hop: Optional[Hop]) -> Optional[int]:
    """The level of a child that must leave the BLS path to get it (None: plain BLS). A BLS child cannot carry a
    priority in 24.10 and lands on its model's default level; a child of work at another level (the ``x-priority``
    its parent set) goes through the server's HTTP endpoint instead (ragstack/triton/loopback.py)."""
    if hop is None or not hop.parameters:
        return None
    from ragstack.triton import loopback
    from ragstack.governance import priority

    level = priority.of_parameters(hop.parameters)
    return level if level != priority.default_level(model) and loopback.available() else None


def bls_infer(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None, version: int = -1) -> dict:
    """One blocking BLS call: {input name: array} in, {output name: array} out; child errors re-raised."""
    level = _loopback_level(model, hop)
    if level is not None:
        from ragstack.triton import loopback

        return loopback.infer(model, inputs, outputs, hop.parameters, level, version)
    request = _bls_request(pb, model, inputs, outputs, hop, version)
    try:
        response = request.exec()
    except Exception as e:  # noqa: BLE001 - the Python backend raises for a model it cannot reach
        raise child_error(model, str(e)) from None
    return _response_arrays(pb, response, outputs, model)


class DetachedSender:
    """A response sender whose ``send`` never blocks the caller: responses go out in order on a thread of their
    own, one per request (started at the first send, ended by the final flag).

    For an engine that answers many requests from one batching thread. In Triton 2.51's Python backend,
    ``send`` waits until the server has delivered the response, and when the request came from a BLS parent
    whose stub has died, that delivery waits forever for the dead stub (``SendBLSDecoupledResponse``). A batcher
    that sent itself would then stop for every request (seen: one killed orchestrator froze all generation);
    with this, only the dead parent's own request stays stuck.
    """

    _END = object()

    def __init__(self, sender, final_flag: int):
        self._sender, self._final = sender, final_flag
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def send(self, response=None, flags: int = 0) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="response-sender", daemon=True)
            self._thread.start()
        self._queue.put((response, flags))

    def _run(self) -> None:
        while True:
            response, flags = self._queue.get()
            try:
                if response is None:
                    self._sender.send(flags=flags)
                else:
                    self._sender.send(response, flags=flags)
            except Exception:  # noqa: BLE001 - the client went away: nothing more to send to it
                log.debug("sending a response failed", exc_info=True)
                return
            del response
            if flags & self._final:
                return


# ------------------------------------------------------------------------ decoupled BLS streams and the GIL
# A decoupled BLS call (``exec(decoupled=True)``) returns a ``ResponseIterator``. In the 24.10 Python backend the
# stub keeps a second reference to it (``Stub::response_iterator_map_``), and the iterator keeps every response
# it streamed, with their numpy arrays. When Python reads the final response, the iterator queues a cleanup
# message; the stub's stub-to-parent thread then erases the map entry *without holding the GIL*. If Python has
# already dropped its own reference, that erase destroys the iterator, its responses and their numpy arrays on a
# C++ thread while other Python threads run: heap corruption that crashes the stub (or the server) later and
# elsewhere (upstream python_backend fixed ``~PbTensor`` in 24.12; the pinned 2.51 server has 24.10).
# So Python always holds the last reference until the cleanup has been processed:
#  * a finished stream whose parent request is still in flight: one synchronous stub->parent round trip on the
#    same FIFO queue as the cleanup (the parent request's ``is_cancelled()``), then the iterator is dropped here,
#    on a Python thread with the GIL;
#  * no parent to ask (the lifecycle manager's warm-up), or the round trip failed: the iterator is kept for
#    ``HOLD_S`` seconds (the cleanup takes milliseconds) and dropped by a later call;
#  * a stream abandoned before its final response (the caller went away, a consumer raised): a daemon thread
#    reads it to the end (``next()`` releases the GIL while it waits), which also ends the map entry that would
#    otherwise stay for the stub's lifetime (24.10 cannot cancel a BLS child), then holds it as above.
HOLD_S = 30.0
_held: "collections.deque" = collections.deque()        # (release after, iterator), oldest first
_held_lock = threading.Lock()


def _hold(iterator, clock: Callable[[], float] = time.monotonic) -> None:
    """Keep ``iterator`` alive for ``HOLD_S`` seconds; drop the ones whose time is up (on this Python thread)."""
    now = clock()
    with _held_lock:
        if iterator is not None:
            _held.append((now + HOLD_S, iterator))
        expired = []
        while _held and _held[0][0] <= now:
            expired.append(_held.popleft())
    del expired                      # the last references, dropped here with the GIL held


def held_streams() -> int:
    """How many finished streams are being kept alive (tests, diagnostics)."""
    with _held_lock:
        return len(_held)


def _release(iterator, barrier: Optional[Callable]) -> None:
    """A finished stream's iterator: barrier then drop (``barrier`` given), else hold."""
    if barrier is not None:
        try:
            barrier()
        except Exception:  # noqa: BLE001 - the parent may be gone: fall back to holding
            log.debug("stream barrier failed; holding the iterator instead", exc_info=True)
        else:
            del iterator             # the cleanup is processed: this is the last reference, GIL held
            _hold(None)              # and let any held ones whose time is up go
            return
    _hold(iterator)


class _StubPids:
    """The live Python-backend stub PIDs of each model under this server, read from /proc (at most once every
    ``refresh_s`` unless asked fresh). A C++ backend's model (the trtllm profile's generate) has none."""

    def __init__(self, refresh_s: float = 1.0):
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._pids: dict = {}

    def of(self, model: str, fresh: bool = False) -> frozenset:
        with self._lock:
            now = time.monotonic()
            if fresh or now - self._at > self.refresh_s:
                try:
                    from ragstack.lifecycle.procmem import stub_processes

                    pids: dict = {}
                    for stub in stub_processes(os.getppid()):
                        pids.setdefault(stub.model, set()).add(stub.pid)
                    self._pids = {m: frozenset(v) for m, v in pids.items()}
                except Exception:  # noqa: BLE001 - no /proc: no liveness watch
                    self._pids = {}
                self._at = now
            return self._pids.get(model, frozenset())


STUB_PIDS = _StubPids()
# How long a stream waits for its child's next response before it checks that the child's stubs are alive.
# A decoupled child answers from its own threads after its execute() returned, so when its stub dies nothing in
# Triton 2.51 ever answers the requests it held: without this check the parent (and its client) would wait
# forever.
STREAM_CHECK_S = 1.0
_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stream:
    """One decoupled BLS stream, read on its own daemon thread into a queue. The reader always reads to the end
    (a stream abandoned by its consumer is drained, which ends the stub's map entry), and whoever sees the
    stream finished last decides how the iterator is let go (see the comment above)."""

    def __init__(self, start: Callable, model: str, bls: bool = True):
        self.iterator = None
        self.bls = bls               # False: a loopback HTTP stream (ragstack.triton.loopback.stream), no BLS iterator
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done = self._abandoned = False
        threading.Thread(target=self._read, args=(start, model), name="bls-stream", daemon=True).start()

    def _read(self, start: Callable, model: str) -> None:
        try:
            # exec() itself waits for the child's first response, so it runs here too, under the watch;
            # the Python backend raises for a model it cannot reach (classed below like any child error)
            self.iterator = start()
            for response in self.iterator:
                self.queue.put(response)
                del response
                if not self.bls and self._abandoned:
                    self.iterator.close()        # an HTTP stream can be cancelled: no need to read it to the end
                    break
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            if not isinstance(e, (InvalidInput, Unavailable)):
                e = child_error(model, str(e))
            self.queue.put(_Failed(e))
        with self._lock:
            self._done = True
            abandoned = self._abandoned
        if abandoned:
            iterator, self.iterator = self.iterator, None
            self._let_go(iterator)
        else:
            self.queue.put(_END)

    def _let_go(self, iterator) -> None:
        if self.bls:
            _hold(iterator)

    def abandon(self) -> None:
        """The consumer stopped before the end: the reader lets the iterator go when it is done reading."""
        with self._lock:
            self._abandoned = True
            done = self._done
        if done:                     # the reader finished first: it left the iterator to us
            iterator, self.iterator = self.iterator, None
            self._let_go(iterator)

    def finish(self, barrier: Optional[Callable]) -> None:
        """The consumer read to the end (the reader is done): barrier, then let go (a BLS iterator)."""
        iterator, self.iterator = self.iterator, None
        if self.bls:
            _release(iterator, barrier)


TRACE_ENV = "TRITON_TRACE_FILE"     # tools/serve_triton.sh turns Triton's tracing on with it (settings.trace_file)


def _traced(hop: Optional[Hop]) -> bool:
    """A child that must show in Triton's trace as a span of its parent: only a BLS child can (the trace goes with
    the in-process request). With tracing on, such streams keep the BLS path and its safeguards (a diagnostic
    mode: the 24.10 decoupled-BLS deadlock of ragstack/triton/loopback.py is possible there)."""
    return hop is not None and hop.trace is not None and bool(rs.current().trace_file)


def bls_stream(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None,
               on_started: Optional[Callable] = None, barrier: Optional[Callable] = None, version: int = -1):
    """A BLS call to a decoupled model: yields {output name: array} per response that carries outputs.

    ``on_started()`` is called at the first response (when the Python backend's ``exec`` returns).
    ``barrier`` is the parent request's ``is_cancelled`` (unthrottled) while that request is in flight, None
    where there is no parent request: see the comment above for why every stream ends through it.
    If a stub of ``model`` that was alive when the call began dies before the stream ends, this raises
    :class:`Unavailable` within about ``STREAM_CHECK_S`` instead of waiting forever.
    """
    pids = STUB_PIDS.of(model)
    from ragstack.triton import loopback
    from ragstack.governance import priority

    # the server's own HTTP stream (see ragstack/triton/loopback.py) for what the generate extension can carry
    if loopback.available() and not _traced(hop) and loopback.streamable(model, inputs):
        parameters = (hop or Hop()).parameters or {}
        stream = _Stream(functools.partial(loopback.stream, model, inputs, outputs, parameters,
                                           priority.of_parameters(parameters, default=0), version), model, bls=False)
    else:
        stream = _Stream(functools.partial(_bls_request(pb, model, inputs, outputs, hop, version).exec,
                                           decoupled=True), model)
    finished = False
    try:
        while True:
            try:
                item = stream.queue.get(timeout=STREAM_CHECK_S)
            except queue.Empty:
                gone = pids - STUB_PIDS.of(model, fresh=True)
                if gone:
                    raise Unavailable(f"model '{model}' died while serving this request (stub process "
                                      f"{', '.join(map(str, sorted(gone)))} exited); retry shortly") from None
                continue
            if on_started is not None:
                on_started()
                on_started = None
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.exc
            arrays = item if not stream.bls else _response_arrays(pb, item, outputs, model)
            del item
            if arrays:
                yield arrays
        finished = True
    finally:
        if finished:
            stream.finish(barrier)
        else:                        # the consumer stopped early or raised, or the child died
            stream.abandon()
