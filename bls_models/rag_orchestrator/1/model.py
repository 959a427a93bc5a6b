"""The RAG orchestrator (BLS): all of its logic is in ragstack/orchestrator.py and ragstack/rag.py."""
import triton_python_backend_utils as pb

from ragstack.orchestrator import OrchestratorModel


class TritonPythonModel(OrchestratorModel):
    pb = pb
