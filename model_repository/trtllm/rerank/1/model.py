"""trtllm profile rerank engine: the TensorRT plan run by the container's TensorRT Python runtime (ragstack/engines/trt_plan.py).

The trtllm image has no tensorrt_plan platform, so this Python-backend model deserializes the plan itself and binds
torch CUDA buffers; same tensors and dynamic batching as ragstack.contracts.tensors.RERANK.
"""
import triton_python_backend_utils as pb

from ragstack.contracts import tensors as contracts
from ragstack.triton import adapter as ta
from ragstack.engines.trt_plan import TritonPlanModel


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        self.model = TritonPlanModel(args, contracts.RERANK, "score")
        ta.freeze_startup_heap()

    def execute(self, requests):
        return self.model.execute(pb, requests)
