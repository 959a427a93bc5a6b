"""rerank_text: a query and its candidate documents in, one relevance score per document out."""
import numpy as np
import triton_python_backend_utils as pb

from ragstack import contracts
from ragstack import triton_adapter as ta
from ragstack.text import RerankTokenizer

C = contracts.RERANK_TEXT
ENGINE_BATCH = contracts.RERANK.max_batch_size


class TritonPythonModel:
    def initialize(self, args):
        params = ta.model_parameters(args)
        self.tokenizer = RerankTokenizer(ta.resolve_engine_dir(params["engine_dir"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                query = ta.input_string(pb, request, C, "query")
                documents = ta.input_strings(pb, request, C, "documents")
                task = ta.input_string(pb, request, C, "task")
                ids, mask = self.tokenizer.encode_pairs(query, documents, task)
                scores = np.concatenate([
                    ta.bls_infer(pb, "rerank", {"input_ids": ids[s:s + ENGINE_BATCH].astype(np.int32),
                                                "attention_mask": mask[s:s + ENGINE_BATCH].astype(np.int32)},
                                 ["score"])["score"].reshape(-1)
                    for s in range(0, len(ids), ENGINE_BATCH)])
                responses.append(pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, {"scores": scores})))
            except Exception as e:  # noqa: BLE001
                responses.append(ta.error_response(pb, e))
        return responses
