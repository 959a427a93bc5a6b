"""The engines: the reference profile's embed and rerank engines (PyTorch, CPU by default) behind the TensorRT
plans' contract (embedding.py, reranking.py, sharing common.py), the CPU generation engine (the generation
package) and the trtllm profile's TensorRT plan runner (trt_plan.py).

Like the plans, an embed or rerank engine takes ``input_ids`` and ``attention_mask`` (int32 ``[B, L]``, 1 = real
token) as numpy and returns numpy: float32 ``[B, dim]`` embeddings or float32 ``[B]`` scores. The tokenization that
produces those ids lives in :mod:`ragstack.tokenization.retrieval`. What both engines share (loading, checking a
token batch, running a model to pooled hidden states) is in :mod:`ragstack.engines.common`.

The engines run on CPU in float32 unless told otherwise: ``device`` and ``dtype`` put the model, and every tensor
these helpers create, on another device or in a lower precision (bfloat16 on a GPU); inputs and outputs stay
numpy on the host either way.

This package imports none of its modules: import from the defining module (``ragstack.engines.embedding``,
``ragstack.engines.common``, ...), so that importing ``ragstack.engines.trt_plan`` or
``ragstack.engines.generation`` does not load the PyTorch engines too.
"""
