"""A fake of ``triton_python_backend_utils`` (``pb``) for the unit tests of code that takes it as an argument:
tensors, responses, errors, requests carrying this server's internal proof, and BLS calls answered by a function."""
import json

from ragstack.governance.access import child_parameters


class Tensor:
    def __init__(self, name, arr):
        self.name, self.arr = name, arr

    def as_numpy(self):
        return self.arr


class Response:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error

    def has_error(self):
        return self.error is not None


class Request(dict):
    """A request from a BLS parent of this server: its input arrays by name, and the parameters with the proof."""

    def parameters(self):
        return json.dumps(child_parameters())


class FakePb:
    Tensor = Tensor
    InferenceResponse = Response

    class TritonError:
        INVALID_ARG, INTERNAL, UNAVAILABLE = 3, 13, 14

        def __init__(self, msg, code=13):
            self.msg, self.code = msg, code

    def __init__(self, serve=None):
        """``serve(model, {name: array}) -> {name: array}`` answers the BLS requests made through this fake."""
        pb = self
        self.requests = []

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names, **kwargs):
                self.model, self.inputs = model_name, {t.name: t.arr for t in inputs}
                pb.requests.append(self)

            def exec(self):
                return Response([Tensor(k, v) for k, v in serve(self.model, self.inputs).items()])
        self.InferenceRequest = InferenceRequest

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return Tensor(name, request[name]) if name in request else None

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors if t.name == name), None)
