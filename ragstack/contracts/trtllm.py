"""Both sides of the TensorRT-LLM ``tensorrt_llm`` tensor contract, as plain Python.

* ``generate_inputs``: what a BLS caller sends (numpy arrays keyed by the contract's input names).
* ``parse_generate_inputs``: what the reference engine reads back, validated, as keyword arguments for a
  :class:`ragstack.engines.generation.GenerationRequest`.
* ``generate_outputs``: the engine's response tensors, named and shaped as TensorRT-LLM's.
* ``finish_reason``: what a caller can tell from those outputs alone (so it works against either engine).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ragstack.contracts.tensors import GENERATE, PERF_METRIC_OUTPUTS
from ragstack.contracts.errors import InvalidInput

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
# The penalty inputs and their neutral values (the engine's defaults when a request omits them).
PENALTY_INPUTS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0,
                  "len_penalty": 0.0}


def _scalar(name: str, value) -> np.ndarray:
    return np.array([[value]], dtype=GENERATE.input(name).np_dtype)


def generate_inputs(input_ids, max_tokens: int, end_id: int, pad_id: int, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, streaming: bool = False,
                    guide_type: Optional[str] = None, guide: Optional[str] = None,
                    stop_words_list: Optional[np.ndarray] = None, return_perf_metrics: bool = True,
                    penalties: Optional[dict] = None) -> dict:
    """The request tensors for one prompt (batch of 1), generated tokens only in the output. ``penalties``:
    any of PENALTY_INPUTS by name; a neutral value is not sent (the engine's default is the same)."""
    ids = np.asarray(input_ids, dtype=np.int32).reshape(1, -1)
    inputs = {
        "input_ids": ids,
        "input_lengths": _scalar("input_lengths", ids.shape[1]),
        "request_output_len": _scalar("request_output_len", max_tokens),
        "end_id": _scalar("end_id", end_id),
        "pad_id": _scalar("pad_id", pad_id),
        "temperature": _scalar("temperature", temperature),
        "runtime_top_k": _scalar("runtime_top_k", top_k),
        "runtime_top_p": _scalar("runtime_top_p", top_p),
        "streaming": _scalar("streaming", streaming),
        "exclude_input_in_output": _scalar("exclude_input_in_output", True),
        "return_perf_metrics": _scalar("return_perf_metrics", return_perf_metrics),
        "return_num_input_tokens": _scalar("return_num_input_tokens", True),
        "return_num_output_tokens": _scalar("return_num_output_tokens", True),
    }
    if seed is not None:
        inputs["seed"] = _scalar("seed", seed)
    if guide_type is not None:
        inputs["guided_decoding_guide_type"] = np.array([[guide_type.encode()]], dtype=np.object_)
        inputs["guided_decoding_guide"] = np.array([[(guide or "").encode()]], dtype=np.object_)
    for name, value in (penalties or {}).items():
        if name not in PENALTY_INPUTS:
            raise InvalidInput(f"unknown penalty {name!r}; expected one of {', '.join(PENALTY_INPUTS)}")
        if value is not None and value != PENALTY_INPUTS[name]:
            inputs[name] = _scalar(name, value)
    if stop_words_list is not None:
        inputs["stop_words_list"] = np.asarray(stop_words_list, dtype=np.int32).reshape(1, 2, -1)
    return inputs


def _one(arrays: dict, name: str, default=None):
    arr = arrays.get(name)
    if arr is None:
        return default
    arr = np.asarray(arr)
    if arr.size != 1:
        raise InvalidInput(f"generate: input '{name}' must hold one value per request, got shape {list(arr.shape)}")
    value = arr.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"generate: input '{name}' is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return value.item()


def parse_generate_inputs(arrays: dict) -> dict:
    """Validate one request's tensors (batch dimension 1) and map them to GenerationRequest fields."""
    ids = arrays.get("input_ids")
    if ids is None:
        raise InvalidInput("generate: input 'input_ids' is required")
    ids = np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise InvalidInput(f"generate: one prompt per request (batch 1), got input_ids shape {list(ids.shape)}")
    ids = ids.reshape(-1)
    length = _one(arrays, "input_lengths")
    if length is None or length != ids.size:
        raise InvalidInput(f"generate: input_lengths ({length}) must equal the number of input_ids ({ids.size})")
    beam = _one(arrays, "beam_width", 1)
    if beam != 1:
        raise InvalidInput(f"generate: beam_width {beam} is not supported (only 1)")
    if _one(arrays, "return_log_probs", False):
        raise InvalidInput("generate: return_log_probs is not supported by the reference engine")
    if arrays.get("bad_words_list") is not None and np.asarray(arrays["bad_words_list"]).size:
        raise InvalidInput("generate: bad_words_list is not supported by the reference engine")
    guide_type = _one(arrays, "guided_decoding_guide_type")
    guide = _one(arrays, "guided_decoding_guide")
    if guide_type in ("", None):
        if guide:
            raise InvalidInput("generate: guided_decoding_guide given without guided_decoding_guide_type")
        guide_type = None
    stop = arrays.get("stop_words_list")
    stop_words = None
    if stop is not None:
        from ragstack.engines.generation import decode_word_list

        stop = np.asarray(stop)
        stop_words = decode_word_list(stop.reshape(stop.shape[-2:]) if stop.ndim == 3 else stop)
    seed = _one(arrays, "seed")
    return dict(
        input_ids=[int(x) for x in ids],
        max_new_tokens=int(_one(arrays, "request_output_len")),
        end_id=_one(arrays, "end_id"),
        pad_id=_one(arrays, "pad_id"),
        temperature=float(_one(arrays, "temperature", 1.0)),
        top_k=int(_one(arrays, "runtime_top_k", 0)),
        top_p=float(_one(arrays, "runtime_top_p", 1.0)),
        seed=None if seed is None else int(seed),
        repetition_penalty=float(_one(arrays, "repetition_penalty", 1.0)),
        presence_penalty=float(_one(arrays, "presence_penalty", 0.0)),
        frequency_penalty=float(_one(arrays, "frequency_penalty", 0.0)),
        min_tokens=int(_one(arrays, "min_tokens", 0)),
        len_penalty=float(_one(arrays, "len_penalty", 0.0)),
        stop_words=stop_words or [],
        guide_type=guide_type,
        guide=guide,
        streaming=bool(_one(arrays, "streaming", False)),
        exclude_input_in_output=bool(_one(arrays, "exclude_input_in_output", False)),
        return_perf_metrics=bool(_one(arrays, "return_perf_metrics", False)),
    )


def generate_outputs(token_ids, *, num_input_tokens: int, num_output_tokens: int,
                     perf: Optional[dict] = None) -> dict:
    """Response tensors for one request, one beam: output_ids [1, 1, n], sequence_length [1, 1]."""
    ids = np.asarray(token_ids, dtype=np.int32).reshape(1, 1, -1)
    out = {
        "output_ids": ids,
        "sequence_length": np.array([[ids.shape[-1]]], dtype=np.int32),
        "num_input_tokens": np.array([[num_input_tokens]], dtype=np.int32),
        "num_output_tokens": np.array([[num_output_tokens]], dtype=np.int32),
        "batch_index": np.zeros((1, 1), dtype=np.int32),
        "sequence_index": np.zeros((1, 1), dtype=np.int32),
    }
    for name in PERF_METRIC_OUTPUTS if perf else ():
        out[name] = np.array([[perf[name]]], dtype=GENERATE.output(name).np_dtype)
    return out


def output_tokens(outputs: dict) -> list:
    """The generated token ids of beam 0 from one response's output_ids / sequence_length."""
    output_ids = np.asarray(outputs["output_ids"])
    n = int(np.asarray(outputs["sequence_length"]).reshape(-1)[0])
    if output_ids.size == 0 or n <= 0:   # a streamed final response with no new token: [1, 1, 0]
        return []
    ids = output_ids.reshape(-1, output_ids.shape[-1])[0]
    return [int(t) for t in ids[:n]]


def finish_reason(num_output_tokens: int, max_tokens: int) -> str:
    """'length' when the generation used its whole token budget (it may have been cut short), else 'stop'."""
    return "length" if num_output_tokens >= max_tokens else "stop"
