"""CPU generation engine: TensorRT-LLM's request semantics and in-flight batching on a transformers model.

The reference profile serves generation with this package in place of a TensorRT-LLM engine; it takes the same
inputs (sampling settings, stop words, guided decoding by xgrammar) and reports the same finish reasons and
perf metrics. Plain Python, torch, numpy and xgrammar: nothing here imports Triton.
"""
from ragstack.engines.generation.engine import GenerationHandle, InflightBatchingEngine
from ragstack.engines.generation.guided import GUIDE_TYPES, GuideCompiler
from ragstack.engines.generation.request import FINISH_REASONS, GenerationRequest, GenerationResult, validate_request
from ragstack.engines.generation.word_lists import decode_word_list, encode_word_list

__all__ = [
    "FINISH_REASONS",
    "GUIDE_TYPES",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "GuideCompiler",
    "InflightBatchingEngine",
    "decode_word_list",
    "encode_word_list",
    "validate_request",
]
