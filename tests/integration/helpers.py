"""Small client-side helpers shared by the integration tests (both protocols)."""
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ragstack.contracts import client as client_io
from ragstack.contracts.tensors import bytes_array as strings  # noqa: F401 - the tests' BYTES arrays


def make_input(protocol, name, array, dtype=None):
    """An input as given: no contract applies (the tests send wrong shapes and dtypes on purpose)."""
    return client_io.infer_input(protocol, name, array, dtype)


def infer(client_pair, model, inputs: dict, outputs=None, headers=None, auth=True):
    """inputs: {name: numpy array}; returns {output name: numpy array}."""
    protocol, client = client_pair
    result = client.infer(model, client_io.inputs_as_given(protocol, inputs), headers=wire_headers(protocol, headers, auth))
    return client_io.outputs(result, outputs)


def auth_headers() -> dict:
    """The operator's headers for the servers the tests start: admin key and internal proof (ragstack_dev.server)."""
    from ragstack_dev.server import access_keys

    return access_keys().headers()


def admin_headers() -> dict:
    """Triton's restricted APIs (repository, config, statistics) over HTTP."""
    from ragstack_dev.server import access_keys

    return {"admin-key": access_keys().admin_key}


def wire_headers(protocol, headers, auth=True):
    """A fresh dict per call (the HTTP client adds to it); gRPC metadata keys must be lower case.
    ``auth``: add the operator's key and internal proof under the given headers (False: send only these)."""
    if auth:
        headers = {**auth_headers(), **(headers or {})}
    if not headers:
        return None
    return {k.lower(): v for k, v in headers.items()} if protocol == "grpc" else dict(headers)


def is_invalid_arg(exc: InferenceServerException) -> bool:
    """HTTP 400 or gRPC INVALID_ARGUMENT: Triton's INVALID_ARG class."""
    status = str(exc.status() or "")
    return status in ("400", "StatusCode.INVALID_ARGUMENT") or "INVALID_ARG" in status


def stream(grpc_url, model, inputs: dict, timeout=120.0, cancel_after=None, headers=None, auth=True):
    """All responses of one request over a gRPC stream, as [{output name: array}]; errors raise.
    ``cancel_after``: stop (cancelling the request) after that many responses."""
    import queue

    client = grpcclient.InferenceServerClient(grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)),
                        headers=wire_headers("grpc", headers, auth))
    try:
        client.async_stream_infer(model, client_io.inputs_as_given("grpc", inputs),
                                  enable_empty_final_response=True)
        out = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            response = result.get_response()
            arrays = client_io.outputs(result)
            if arrays:
                out.append(arrays)
            if response.parameters["triton_final_response"].bool_param:
                return out
            if cancel_after is not None and len(out) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                return out
    finally:
        client.stop_stream()
        client.close()


def generate_json(http_url, model, body: dict, headers=None, auth=True) -> tuple:
    """POST /v2/models/{model}/generate: (status, parsed JSON). ``auth``: the operator's key and internal proof go
    in the body (Triton forwards no headers on /generate; body fields become request parameters)."""
    import json
    import urllib.error
    import urllib.request

    if auth:
        body = {**auth_headers(), **body}
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/generate", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
