"""What a generation request carries, what comes back, and the checks a request must pass before it queues.

Field names and conventions follow TensorRT-LLM's Triton backend inputs, so the serving layer maps tensors onto
them one to one. Validation happens at submission, on the caller's thread, so a bad request fails
synchronously (INVALID_ARG) instead of surfacing later from the engine thread.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:          # only for annotations: unguided generation runs without xgrammar installed
    import xgrammar

from ragstack.contracts.errors import InvalidInput
from ragstack.engines.generation.guided import GuideCompiler
from ragstack.engines.generation.sampling import check_penalty_params, check_sampling_params

FINISH_REASONS = ("end_id", "stop_word", "grammar_terminated", "length", "cancelled", "error")
KV_BLOCK_TOKENS = 64  # block size the reported KV-cache block counts are expressed in, as TensorRT-LLM's default
NO_END_ID = -1  # TensorRT-LLM's "never stop on an end token" (trtllm-bench uses it to ignore EOS)


@dataclasses.dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    end_id: Optional[int] = None          # None: the engine's end id (engine.json); -1: no end token
    pad_id: Optional[int] = None          # carried for the serving layer, which pads output tensors with it
    temperature: float = 1.0              # 0 = greedy
    top_k: int = 0                        # 0 = off
    top_p: float = 1.0                    # 1 (or 0) = off
    seed: Optional[int] = None
    repetition_penalty: float = 1.0       # 1 = off; > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0         # 0 = off; subtracted once from every token already seen
    frequency_penalty: float = 0.0        # 0 = off; subtracted per occurrence
    min_tokens: int = 0                   # 0 = off; the end token cannot come before this many tokens
    len_penalty: float = 0.0              # beam-search length penalty: no effect at beam width 1 (TensorRT-LLM)
    stop_words: list[list[int]] = dataclasses.field(default_factory=list)
    guide_type: Optional[str] = None      # one of guided.GUIDE_TYPES
    guide: Optional[str] = None
    streaming: bool = False
    exclude_input_in_output: bool = False
    return_perf_metrics: bool = False     # the engine always measures; this tells the serving layer to return them
    # Triton priority level (ragstack/governance/priority.py: 1 urgent, 2 background), from the request's x-priority
    # parameter: waiting requests are admitted most urgent first, in arrival order within a level.
    priority: int = 1


@dataclasses.dataclass
class GenerationResult:
    output_ids: list[int]                 # generated ids, after the input ids unless exclude_input_in_output
    finish_reason: str                    # one of FINISH_REASONS
    num_input_tokens: int
    num_output_tokens: int                # generated ids only; a final end id is neither returned nor counted
    arrival_time_ns: int = 0              # time.time_ns(); 0 = never happened
    first_scheduled_time_ns: int = 0
    first_token_time_ns: int = 0
    last_token_time_ns: int = 0
    kv_cache_alloc_total_blocks: int = 0
    kv_cache_alloc_new_blocks: int = 0
    kv_cache_reused_blocks: int = 0       # no prefix reuse on CPU
    # Speculative decoding (TensorRT-LLM's perf outputs): the CPU engine drafts nothing, so these stay 0 as the
    # real backend reports them for a non-speculative engine.
    acceptance_rate: float = 0.0
    total_accepted_draft_tokens: int = 0
    total_draft_tokens: int = 0
    error: Optional[str] = None           # set when finish_reason is "error"


def _token_id(value, what: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"{what} must be an integer token id, got {value!r}")
    if not 0 <= value < vocab_size:
        raise InvalidInput(f"{what} {int(value)} is out of the vocabulary range [0, {vocab_size})")
    return int(value)


def validate_request(request: GenerationRequest, *, vocab_size: int, max_input_len: int, max_seq_len: int,
                     guides: GuideCompiler) -> Optional[xgrammar.CompiledGrammar]:
    """Raise InvalidInput naming the first problem; return the request's compiled grammar (None if unguided).

    The guide is compiled here, eagerly, so that a bad schema fails the request before it is queued.
    """
    if len(request.input_ids) == 0:
        raise InvalidInput("input_ids is empty")
    for token in request.input_ids:
        _token_id(token, "input token id", vocab_size)
    if len(request.input_ids) > max_input_len:
        raise InvalidInput(f"input has {len(request.input_ids)} tokens, more than max_input_len {max_input_len}")
    if isinstance(request.max_new_tokens, bool) or not isinstance(request.max_new_tokens, numbers.Integral) \
            or request.max_new_tokens < 1:
        raise InvalidInput(f"max_new_tokens must be an integer >= 1, got {request.max_new_tokens!r}")
    if len(request.input_ids) + request.max_new_tokens > max_seq_len:
        raise InvalidInput(f"input tokens ({len(request.input_ids)}) + max_new_tokens ({request.max_new_tokens}) "
                           f"exceed max_seq_len {max_seq_len}")
    if request.end_id is not None and request.end_id != NO_END_ID:
        _token_id(request.end_id, "end_id", vocab_size)
    if request.pad_id is not None:
        _token_id(request.pad_id, "pad_id", vocab_size)
    check_sampling_params(request.temperature, request.top_k, request.top_p, request.seed)
    check_penalty_params(request.repetition_penalty, request.presence_penalty, request.frequency_penalty,
                         request.min_tokens, request.len_penalty)
    for word in request.stop_words:
        if len(word) == 0:
            raise InvalidInput("a stop word has no tokens")
        for token in word:
            _token_id(token, "stop word token id", vocab_size)
    if request.guide_type is None:
        if request.guide is not None:
            raise InvalidInput("a guide was given without guide_type")
        return None
    return guides.compile(request.guide_type, request.guide)
