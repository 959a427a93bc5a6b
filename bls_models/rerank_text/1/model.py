"""rerank_text: a query and its candidate documents in, one relevance score per document out."""
import triton_python_backend_utils as pb

from ragstack.governance import access
from ragstack.triton import bls
from ragstack.contracts import tensors as contracts
from ragstack.governance import priority as prio
from ragstack.triton import adapter as ta
from ragstack.tokenization.retrieval import RerankTokenizer

C = contracts.RERANK_TEXT


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.tokenizer = RerankTokenizer(ta.resolve_engine_dir(params["engine_dir"]))
        ta.freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                access.require_internal(request.parameters(), C.name)
                query = ta.input_string(pb, request, C, "query")
                documents = ta.input_strings(pb, request, C, "documents")
                task = ta.input_string(pb, request, C, "task")
                ids, mask = self.tokenizer.encode_pairs(query, documents, task)
                level = prio.for_request(request.parameters())   # urgent unless the caller lowers it
                scores = bls.rerank_tokens(pb, ids, mask, ta.Hop(prio.with_level({}, level)))
                responses.append(pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, {"scores": scores})))
            except Exception as e:  # noqa: BLE001
                responses.append(ta.error_response(pb, e))
        return responses
