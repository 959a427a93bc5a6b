"""The client side of the tensor contracts: tritonclient inputs built from a model's contract, outputs read back.

Scripts, benchmarks and tests talk to the server with ``tritonclient.http`` or ``tritonclient.grpc`` (the stubs'
own loopback calls, ``ragstack/triton/loopback.py``, use neither: it writes the few HTTP exchanges it needs
itself); both modules have the same ``InferInput`` and result API, so every function here takes the module (or its
protocol name, ``"http"`` / ``"grpc"``). The names, dtypes and shapes
come from ``ragstack/contracts/tensors.py`` (``Contract.input_arrays``, ``Tensor.client_dtype``), as the server's do.
"""
from __future__ import annotations

import json
from typing import Iterable, Optional

import numpy as np

from ragstack.contracts import tensors as contracts


def client_module(protocol):
    """``tritonclient.http`` or ``tritonclient.grpc`` for "http" / "grpc"; a module is returned as it is."""
    if not isinstance(protocol, str):
        return protocol
    if protocol == "grpc":
        import tritonclient.grpc as mod
    elif protocol == "http":
        import tritonclient.http as mod
    else:
        raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
    return mod


def datatype(array: np.ndarray) -> str:
    """Triton's name for a numpy array's dtype (INT32, FP32, BYTES for object arrays…)."""
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def infer_input(protocol, name: str, array, datatype_: Optional[str] = None):
    """One ``InferInput`` holding ``array`` as shaped; ``datatype_`` (Triton's name: INT32, BYTES…) defaults to the
    array's own (:func:`datatype`). No contract is consulted: for test-only models, or inputs that are meant to be
    wrong."""
    mod = client_module(protocol)
    array = np.asarray(array)
    tensor = mod.InferInput(name, list(array.shape), datatype_ or datatype(array))
    tensor.set_data_from_numpy(array)
    return tensor


def inputs_as_given(protocol, arrays: dict) -> list:
    """An ``InferInput`` per {name: array}, each as given (:func:`infer_input`)."""
    return [infer_input(protocol, name, arr) for name, arr in arrays.items()]


def infer_inputs(protocol, model: str, values: dict) -> list:
    """The ``InferInput`` list of one request to ``model``: plain values or arrays by input name, converted by the
    model's contract (dtype, BYTES encoding, the batch dimension of a batching model; ``None`` leaves an optional
    input out). A model without a contract in ``contracts.ALL`` takes numpy arrays as they are."""
    contract = contracts.ALL.get(model)
    if contract is None:
        return inputs_as_given(protocol, {name: value for name, value in values.items() if value is not None})
    arrays = contract.input_arrays(values)
    return [infer_input(protocol, name, arr, contract.input(name).client_dtype) for name, arr in arrays.items()]


def requested_outputs(protocol, names: Iterable[str]) -> list:
    mod = client_module(protocol)
    return [mod.InferRequestedOutput(n) for n in names]


def output_names(result) -> list:
    """The names of the outputs a result carries (an HTTP result's JSON, a gRPC result's protobuf)."""
    response = result.get_response()
    if isinstance(response, dict):
        return [o["name"] for o in response.get("outputs", [])]
    return [o.name for o in response.outputs]


def outputs(result, names: Optional[Iterable[str]] = None) -> dict:
    """{output name: numpy array} of a result: the ``names`` it carries (all of its outputs when None)."""
    out = {}
    for name in (output_names(result) if names is None else names):
        arr = result.as_numpy(name)
        if arr is not None:
            out[name] = arr
    return out


def output_string(result, name: str) -> Optional[str]:
    """The first string of a BYTES output, decoded (None when the result does not carry it)."""
    arr = result.as_numpy(name)
    if arr is None:
        return None
    value = arr.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def output_json(result, name: str):
    """A one-string JSON output (``report``, ``result``, ``usage``…), parsed."""
    return json.loads(output_string(result, name))
