"""model_manager_loader: runs the Model Loading API calls for model_manager, in a stub of its own.

Not a model of the repository: model_manager creates it at run time with ``pb.load_model(..., files=...)`` from
this file. ``pb.load_model`` holds the calling stub's GIL until the load is done; doing it here keeps the
manager answering while an engine loads. Self-contained (numpy and pb only) so it starts in a second.

ops: load {config: JSON or ""} | unload | ready {version}
"""
import hashlib
import hmac
import json
import os

import numpy as np
import triton_python_backend_utils as pb


def _string(request, name, default=""):
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class BadRequest(ValueError):
    """The request itself is wrong (unknown op, payload not a JSON object): INVALID_ARG, not INTERNAL."""


def _payload(request) -> dict:
    text = _string(request, "payload", "{}") or "{}"
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as e:   # self-contained: no ragstack.contracts.json_input here
        raise BadRequest(f"payload is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest("payload must be a JSON object")
    return payload


def _check_internal(request):
    """Only model_manager (a BLS parent of this server) may call: the same proof as ragstack.governance.access, inline."""
    path = os.environ.get("RAG_INTERNAL_SECRET_FILE")
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
        got = json.loads(request.parameters() or "{}").get("x-ragstack-internal", "")
    except (OSError, ValueError):
        secret, got = "\0", ""
    if not isinstance(got, str) or not hmac.compare_digest(hashlib.sha256(got.encode()).digest(),
                                                           hashlib.sha256(secret.encode()).digest()):
        raise BadRequest("permission denied: model 'model_manager_loader' is internal to this server")


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                _check_internal(request)
                op, model = _string(request, "op"), _string(request, "model")
                payload = _payload(request)
                if op == "load":
                    pb.load_model(model_name=model, config=payload.get("config", ""))
                    if not pb.is_model_ready(model_name=model):
                        raise RuntimeError(f"{model} is not ready after load")
                    result = {"loaded": model}
                elif op == "unload":
                    pb.unload_model(model_name=model, unload_dependents=False)
                    result = {"unloaded": model}
                elif op == "ready":
                    result = {"ready": bool(pb.is_model_ready(model_name=model,
                                                              model_version=str(payload.get("version", ""))))}
                else:
                    raise BadRequest(f"unknown op {op[:100]!r}; expected load, unload or ready")
                out = np.array([json.dumps(result).encode()], dtype=np.object_)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("result", out)]))
            except (BadRequest, UnicodeDecodeError) as e:   # the same marker as ragstack.triton.adapter.INVALID_MARK
                responses.append(pb.InferenceResponse(error=pb.TritonError(
                    f"invalid input: model_manager_loader: {e}"[:2000], pb.TritonError.INVALID_ARG)))
            except Exception as e:  # noqa: BLE001 - the manager reads the message
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(e).__name__}: {e}")))
        return responses
