"""The reference profile's embed and rerank engines: PyTorch (CPU by default) behind the TensorRT plans' contract.

Like the plans, an engine takes ``input_ids`` and ``attention_mask`` (int32 ``[B, L]``, 1 = real token) as
numpy and returns numpy: float32 ``[B, dim]`` embeddings or float32 ``[B]`` scores. The tokenization that
produces those ids lives in :mod:`ragstack.text`. What both engines share (loading, checking a token batch,
running a model to pooled hidden states) is in :mod:`ragstack.engines.common`.

The engines run on CPU in float32 unless told otherwise: ``device`` and ``dtype`` put the model, and every tensor
these helpers create, on another device or in a lower precision (bfloat16 on a GPU); inputs and outputs stay
numpy on the host either way.
"""
from ragstack.engines.common import place_model, resolve_device, resolve_dtype
from ragstack.engines.embedding import EmbeddingEngine
from ragstack.engines.reranking import RerankEngine

__all__ = ["EmbeddingEngine", "RerankEngine", "place_model", "resolve_device", "resolve_dtype"]
