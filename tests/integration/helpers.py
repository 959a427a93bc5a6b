"""Small client-side helpers shared by the integration tests (both protocols)."""
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def make_input(protocol, name, array, dtype=None):
    array = np.asarray(array)
    if dtype is None:
        dtype = "BYTES" if array.dtype == object else {
            np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL",
            np.dtype(np.uint64): "UINT64", np.dtype(np.int64): "INT64"}[array.dtype]
    mod = httpclient if protocol == "http" else grpcclient
    tensor = mod.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def infer(client_pair, model, inputs: dict, outputs=None):
    """inputs: {name: numpy array}; returns {output name: numpy array}."""
    protocol, client = client_pair
    result = client.infer(model, [make_input(protocol, k, v) for k, v in inputs.items()])
    names = outputs or [o["name"] for o in (result.get_response()["outputs"] if protocol == "http"
                                              else [{"name": o.name} for o in result.get_response().outputs])]
    return {n: result.as_numpy(n) for n in names}


def strings(values):
    return np.array([v.encode() if isinstance(v, str) else v for v in values], dtype=object)


def is_invalid_arg(exc: InferenceServerException) -> bool:
    """HTTP 400 or gRPC INVALID_ARGUMENT: Triton's INVALID_ARG class."""
    status = str(exc.status() or "")
    return status in ("400", "StatusCode.INVALID_ARGUMENT") or "INVALID_ARG" in status
