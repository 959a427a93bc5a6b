"""The one place that turns Triton Python-backend objects into plain values and back.

Every ``model.py`` is a thin adapter over the core; the conversions they share live here. ``pb`` is the
``triton_python_backend_utils`` module, passed in so this file imports nothing from Triton (the unit tests pass
a fake).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ragstack.contracts import Contract
from ragstack.errors import InvalidInput

log = logging.getLogger("ragstack")

# Where relative engine_dir parameters point: the engines' folder (the reference profile's model set).
ENGINE_PATH_ENV = "ENGINE_PATH"
TOKENIZER_DIR_ENV = "TOKENIZER_DIR"
# The runtime policy file (per-task sampling, budgets, thresholds).
POLICY_FILE_ENV = "RAG_POLICY_FILE"
DEFAULT_POLICY_FILE = Path(__file__).resolve().parent.parent / "config" / "runtime_policy.json"
# Where relative data folders (the vector index) live.
DATA_PATH_ENV = "RAG_DATA_PATH"


def model_parameters(args: dict) -> dict:
    """The ``parameters`` of the model config as {key: string}."""
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def _under(value: str, env: str, what: str) -> Path:
    """``value`` if absolute, else relative to the folder the environment variable ``env`` names."""
    path = Path(value)
    if path.is_absolute():
        return path
    base = os.environ.get(env)
    if not base:
        raise RuntimeError(f"{what} {value!r} is relative and {env} is not set "
                           "(start the server with tools/serve_triton.sh)")
    return Path(base) / path


def resolve_engine_dir(value: str) -> Path:
    """An engine folder: absolute, or relative to $ENGINE_PATH; it must exist."""
    path = _under(value, ENGINE_PATH_ENV, "engine_dir")
    if not path.is_dir():
        raise RuntimeError(f"engine folder {path} does not exist: build it (tools/build_models.py)")
    return path


def resolve_data_dir(value: str) -> Path:
    """A data folder (created if missing): absolute, or relative to $RAG_DATA_PATH."""
    path = _under(value, DATA_PATH_ENV, "data folder")
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
        spec = contract.output(name)
        arr = np.asarray(value, dtype=spec.np_dtype) if spec.dtype != "TYPE_STRING" else \
            np.asarray([v.encode("utf-8") if isinstance(v, str) else v for v in np.asarray(value).reshape(-1)],
                       dtype=np.object_).reshape(np.asarray(value).shape)
        tensors.append(pb.Tensor(name, arr))
    return tensors


# Triton 2.51 hands a BLS parent every child error as INTERNAL, so the class travels in the message too:
# every INVALID_ARG message starts with this marker, and a parent re-raises such a child error as InvalidInput.
INVALID_MARK = "invalid input: "


def error_response(pb, exc: BaseException):
    """INVALID_ARG for bad input with its message; INTERNAL with a short message (no traceback) otherwise."""
    if isinstance(exc, InvalidInput):
        msg = str(exc)
        return pb.InferenceResponse(error=pb.TritonError(msg if msg.startswith(INVALID_MARK) else INVALID_MARK + msg,
                                                         pb.TritonError.INVALID_ARG))
    log.exception("internal error")
    return pb.InferenceResponse(error=pb.TritonError(f"internal error: {type(exc).__name__}: {exc}",
                                                     pb.TritonError.INTERNAL))


def raise_for_error(response) -> None:
    """Turn a BLS child's error response into an exception that keeps INVALID_ARG as InvalidInput."""
    if not response.has_error():
        return
    msg = response.error().message()
    if msg.startswith(INVALID_MARK):
        raise InvalidInput(msg)
    raise RuntimeError(msg)


def pad_to(arr: np.ndarray, length: int, side: str) -> np.ndarray:
    """Pad [b, l] int32 rows with zeros to ``length`` on ``side`` (masked positions: the value is never read)."""
    extra = length - arr.shape[1]
    if extra <= 0:
        return arr
    pad = ((0, 0), (extra, 0)) if side == "left" else ((0, 0), (0, extra))
    return np.pad(arr, pad)


def execute_token_batch(pb, requests, contract: Contract, engine, padding_side: str, output_name: str) -> list:
    """Run a token-id engine (embed, rerank) once over all the requests the dynamic batcher gave us.

    Triton hands the Python backend a list of requests (each [b_i, L_i]); they are padded to one length on
    the engine's padding side and run as a single forward pass, then split back. A request whose tensors are
    malformed gets its own INVALID_ARG; the others still run.
    """
    responses = [None] * len(requests)
    batch = []
    for i, request in enumerate(requests):
        try:
            ids = input_array(pb, request, contract, "input_ids")
            mask = input_array(pb, request, contract, "attention_mask")
            if ids.shape != mask.shape:
                raise InvalidInput(f"{contract.name}: input_ids {list(ids.shape)} and attention_mask "
                                   f"{list(mask.shape)} must have the same shape")
            batch.append((i, ids, mask))
        except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
            responses[i] = error_response(pb, e)
    if batch:
        length = max(ids.shape[1] for _, ids, _ in batch)
        ids = np.concatenate([pad_to(x, length, padding_side) for _, x, _ in batch])
        mask = np.concatenate([pad_to(m, length, padding_side) for _, _, m in batch])
        try:
            values = engine(ids, mask)
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                responses[batch[0][0]] = error_response(pb, e)
                return responses
            # Find out which request is bad rather than failing all of them.
            for i, x, m in batch:
                try:
                    responses[i] = _ok(pb, contract, output_name, engine(x, m))
                except Exception as e1:  # noqa: BLE001
                    responses[i] = error_response(pb, e1)
            return responses
        start = 0
        for i, x, _ in batch:
            rows = values[start:start + x.shape[0]]
            start += x.shape[0]
            responses[i] = _ok(pb, contract, output_name, rows)
    return responses


def _ok(pb, contract: Contract, output_name: str, rows):
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 1:
        rows = rows.reshape(-1, 1)
    return pb.InferenceResponse(output_tensors=output_tensors(pb, contract, {output_name: rows}))


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
        from ragstack.identity import forward_headers

        return cls(forward_headers(request.parameters()), request.trace() if trace else None)

    def kwargs(self) -> dict:
        out = {}
        if self.parameters:
            out["parameters"] = self.parameters
        if self.trace is not None:
            out["trace"] = self.trace
        return out


def _bls_request(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None):
    return pb.InferenceRequest(model_name=model, inputs=[pb.Tensor(k, v) for k, v in inputs.items()],
                               requested_output_names=list(outputs), **(hop.kwargs() if hop else {}))


def _response_arrays(pb, response, outputs) -> dict:
    raise_for_error(response)
    out = {}
    for name in outputs:
        t = pb.get_output_tensor_by_name(response, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out


def bls_infer(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None) -> dict:
    """One blocking BLS call: {input name: array} in, {output name: array} out; child errors re-raised."""
    response = _bls_request(pb, model, inputs, outputs, hop).exec()
    return _response_arrays(pb, response, outputs)


def bls_stream(pb, model: str, inputs: dict, outputs, hop: Optional[Hop] = None,
               on_started: Optional[Callable] = None):
    """A BLS call to a decoupled model: yields {output name: array} per response that carries outputs.
    ``on_started()`` is called when ``exec`` returns, which the Python backend does at the first response."""
    responses = _bls_request(pb, model, inputs, outputs, hop).exec(decoupled=True)
    if on_started is not None:
        on_started()
    for response in responses:
        arrays = _response_arrays(pb, response, outputs)
        if arrays:
            yield arrays
