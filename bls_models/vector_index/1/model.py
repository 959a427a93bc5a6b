"""vector_index: the single process that owns the vector store (reads and writes never disagree)."""
import json

import triton_python_backend_utils as pb

from ragstack.governance import access
from ragstack.contracts import tensors as contracts
from ragstack.index import ops as index_ops
from ragstack.contracts import json_input
from ragstack.triton import adapter as ta
from ragstack.index.config import open_store

C = contracts.VECTOR_INDEX


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.store = open_store(ta.resolve_data_dir(params["index_dir"]), params)
        ta.freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                access.require_internal(request.parameters(), C.name)
                payload = ta.input_string(pb, request, C, "payload")
                result = index_ops.handle(
                    self.store, ta.input_string(pb, request, C, "op"),
                    ta.input_string(pb, request, C, "collection", "default"),
                    query_vector=ta.input_array(pb, request, C, "query_vector"),
                    top_k=ta.input_scalar(pb, request, C, "top_k"),
                    vectors=ta.input_array(pb, request, C, "vectors"),
                    payload=None if payload is None else
                    json_input.loads(payload, "vector_index: payload", expect=dict))
                out = {"result": contracts.one_string(json.dumps(result))}
                responses.append(pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, out)))
            except Exception as e:  # noqa: BLE001
                responses.append(ta.error_response(pb, e))
        return responses
