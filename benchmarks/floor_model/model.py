"""A Python-backend model that does no work: benchmarks/rag.py serves it behind an ensemble with `rag`'s contract and
measures it side by side with `rag`, so the overhead it reports splits into Triton's part (gRPC, the ensemble
hop, the Python stub's request and response IPC, the client) and the stack's own. Like the orchestrator it
answers every request on a pool thread through its response sender; its outputs have the sizes of a typical
`rag` answer. Not part of the stack: it lives in a model repository the benchmark writes to a temporary folder.
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb

ANSWER = json.dumps({"answer": "a" * 80, "citations": ["ctx-1"]})
CONTEXTS = json.dumps([{"id": f"ctx-{i}", "doc_id": "doc", "chunk_id": f"doc#{i}", "text": "t" * 900,
                        "score": 0.5, "metadata": {}} for i in range(1, 4)])
USAGE = json.dumps({"timings_ms": {k: 1.0 for k in ("tokenize", "embed", "search", "rerank", "generate", "total")},
                    "tokens_in": 100, "tokens_out": 20, "notes": "u" * 600})
INPUTS = ("query", "task", "schema", "documents", "top_k", "top_n", "max_tokens", "collection")


class TritonPythonModel:
    def initialize(self, args):
        self.pool = ThreadPoolExecutor(max_workers=16)

    def finalize(self):
        self.pool.shutdown(wait=True)

    def _serve(self, request, sender):
        for name in INPUTS:
            tensor = pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensor.as_numpy()
        outputs = [pb.Tensor(name, np.array([value.encode()], dtype=np.object_))
                   for name, value in (("answer", ANSWER), ("contexts", CONTEXTS), ("usage", USAGE))]
        sender.send(pb.InferenceResponse(output_tensors=outputs), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        served = [self.pool.submit(self._serve, r, r.get_response_sender()) for r in requests]
        for future in served:
            future.result()
        return None
