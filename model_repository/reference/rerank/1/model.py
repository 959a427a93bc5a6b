"""Reference rerank engine: the Qwen3-Reranker TensorRT plan's contract (yes/no score), on CPU."""
import triton_python_backend_utils as pb

from ragstack.contracts import tensors as contracts
from ragstack.triton import adapter as ta
from ragstack.engines.reranking import RerankEngine
from ragstack.triton.metrics import PriorityMetrics


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        ta.set_threads(params)
        self.engine = RerankEngine(ta.resolve_engine_dir(params["engine_dir"]))
        self.levels = PriorityMetrics(pb, "rerank")
        ta.freeze_startup_heap()

    def finalize(self):
        self.levels.close()

    def execute(self, requests):
        self.levels.count(requests)
        return ta.execute_token_batch(pb, requests, contracts.RERANK, self.engine,
                                      self.engine.spec.padding_side, "score")
