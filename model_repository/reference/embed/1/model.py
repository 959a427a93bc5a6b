"""Reference embed engine: the Qwen3-Embedding TensorRT plan's contract, run by PyTorch on CPU."""
import triton_python_backend_utils as pb

from ragstack.contracts import tensors as contracts
from ragstack.triton import adapter as ta
from ragstack.engines.embedding import EmbeddingEngine
from ragstack.triton.metrics import PriorityMetrics


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        ta.set_threads(params)
        self.engine = EmbeddingEngine(ta.resolve_engine_dir(params["engine_dir"]))
        self.levels = PriorityMetrics(pb, "embed")
        ta.freeze_startup_heap()

    def finalize(self):
        self.levels.close()

    def execute(self, requests):
        self.levels.count(requests)
        return ta.execute_token_batch(pb, requests, contracts.EMBED, self.engine,
                                      self.engine.spec.padding_side, "embedding")
