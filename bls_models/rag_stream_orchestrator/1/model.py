"""The RAG orchestrator (BLS): all of its logic is in ragstack/triton/orchestrator.py and ragstack/pipeline/rag.py."""
import triton_python_backend_utils as pb

from ragstack.triton.orchestrator import OrchestratorModel


class TritonPythonModel(OrchestratorModel):
    pb = pb
