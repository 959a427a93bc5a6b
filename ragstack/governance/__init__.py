"""Governance: runtime policy, identity, events, engine manifests and specs, access control, priorities and adaptive
batching. Plain Python: nothing here imports Triton."""
