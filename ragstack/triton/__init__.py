"""The Triton layer: the only part of ragstack that deals with ``triton_python_backend_utils`` (passed in as ``pb``
by the models' model.py files): tensor conversion and errors (adapter.py), BLS clients (bls.py), the RAG orchestrator
model (orchestrator.py), metrics, tracing, loopback, polling and activity."""
