"""Engine calls made from BLS models, shared by the text-level models and the RAG orchestrator.

``pb`` is ``triton_python_backend_utils`` (passed in); the engines are reached by model name, so the same
code drives the reference engines and the TensorRT / TensorRT-LLM ones.
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Callable, Optional

import numpy as np

from ragstack import settings
from ragstack.contracts import tensors as contracts
from ragstack.triton import adapter as ta
from ragstack.tokenization.generation import GeneratorTokenizer
from ragstack.contracts.errors import InvalidInput
from ragstack.triton.polling import Throttled
from ragstack.contracts.trtllm import GUIDE_TYPES, finish_reason, generate_inputs, output_tokens

ENGINE_OUTPUTS = ["output_ids", "sequence_length", "num_input_tokens", "num_output_tokens", "arrival_time_ns",
                  "first_scheduled_time_ns"]
EMBED_BATCH = contracts.EMBED.max_batch_size
RERANK_BATCH = contracts.RERANK.max_batch_size


_phases = threading.local()          # the leases a thread holds for a whole phase (see phase())


def _lease_timeout_s() -> float:
    """How long a pipeline call waits for the lifecycle manager to load an engine before failing UNAVAILABLE."""
    return settings.current().lease_timeout_s


def leased(pb, model: str, fn: Callable, retry_if: Optional[Callable] = None):
    """``fn(version)`` under one engine lease from ``model_manager`` (a no-op lease when the manager is not
    loaded): the engine is loaded on demand and kept while ``fn`` runs, ``version`` is the one the lease names
    (-1: whichever Triton serves), the outcome feeds the manager's canary, and a call that met a dead stub is
    retried once after the manager's reload. One lease covers a whole call (every chunk of a batch); inside
    :func:`phase` the phase's lease covers it."""
    from ragstack.lifecycle.bls_client import call_with_lease

    held = getattr(_phases, "leases", {}).get(model)
    if held is not None:
        return fn(held.version)
    return call_with_lease(pb, model, lambda lease: fn(lease.version), timeout_s=_lease_timeout_s(),
                           retry_if=retry_if)


@contextlib.contextmanager
def phase(pb, model: str):
    """One lease on ``model`` for a phase made of several calls (an ingest's embed calls, 256 texts each): the
    calls inside reuse it instead of taking one each, so the engine cannot be retired between them. No dead-stub
    retry inside: the phase fails UNAVAILABLE, and its release tells the manager, which reloads the engine."""
    from ragstack.lifecycle.bls_client import engine_lease

    held = _phases.__dict__.setdefault("leases", {})
    if model in held:                  # nested: the outer phase's lease
        yield held[model]
        return
    with engine_lease(pb, model, timeout_s=_lease_timeout_s()) as lease:
        held[model] = lease
        try:
            yield lease
        finally:
            del held[model]


def _stage(timer, name):
    return timer.stage(name) if timer is not None else contextlib.nullcontext()


def embed_tokens(pb, ids: np.ndarray, mask: np.ndarray, hop: Optional[ta.Hop] = None) -> np.ndarray:
    """[B, L] token ids through the `embed` engine, in chunks of its max batch size, under one lease."""
    return leased(pb, "embed", lambda version: np.concatenate([
        ta.bls_infer(pb, "embed", {"input_ids": ids[s:s + EMBED_BATCH].astype(np.int32),
                                   "attention_mask": mask[s:s + EMBED_BATCH].astype(np.int32)},
                     ["embedding"], hop, version)["embedding"]
        for s in range(0, len(ids), EMBED_BATCH)]))


def rerank_tokens(pb, ids: np.ndarray, mask: np.ndarray, hop: Optional[ta.Hop] = None) -> np.ndarray:
    """Pair token ids through the `rerank` engine, in chunks, under one lease."""
    return leased(pb, "rerank", lambda version: np.concatenate([
        ta.bls_infer(pb, "rerank", {"input_ids": ids[s:s + RERANK_BATCH].astype(np.int32),
                                    "attention_mask": mask[s:s + RERANK_BATCH].astype(np.int32)},
                     ["score"], hop, version)["score"].reshape(-1)
        for s in range(0, len(ids), RERANK_BATCH)]))


def index_op(pb, op: str, collection: str, hop: Optional[ta.Hop] = None, *, query_vector=None,
             top_k: Optional[int] = None, vectors=None, payload: Optional[dict] = None) -> dict:
    """One op of the `vector_index` model, the store's one owner (not an engine: no lease): its JSON result."""
    inputs = contracts.VECTOR_INDEX.input_arrays({
        "op": op, "collection": collection, "query_vector": query_vector, "top_k": top_k, "vectors": vectors,
        "payload": None if payload is None else json.dumps(payload)})
    return json.loads(ta.bls_infer(pb, "vector_index", inputs, ["result"], hop)["result"].reshape(-1)[0])


def search(pb, collection: str, vector, top_k: int, hop: Optional[ta.Hop] = None, *, query: Optional[str] = None,
           search=None) -> list:
    """The ``top_k`` best chunks of ``collection``: vector_index's hits, best first. Nearest to ``vector``, unless
    ``search`` (a :class:`~ragstack.index.lexical.SearchSpec`) asks for a lexical or hybrid search: then the query's
    text and the spec go along in the payload."""
    payload = None
    if search is not None and search.mode != "dense":
        payload = {"query_text": query, "search": search.as_dict()}
    return index_op(pb, "search", collection, hop, query_vector=np.asarray(vector, dtype=np.float32),
                    top_k=top_k, payload=payload)["hits"]


def convert_document(pb, data: bytes, file_name: Optional[str], mime_type: Optional[str],
                     hop: Optional[ta.Hop] = None) -> str:
    """A file's bytes through the `docling` model: the DoclingDocument as JSON text."""
    inputs = contracts.DOCLING.input_arrays({"data": [data], "file_name": file_name or "",
                                             "mime_type": mime_type or ""})
    converted = ta.bls_infer(pb, "docling", inputs, ["document"], hop)["document"].reshape(-1)[0]
    return converted.decode("utf-8") if isinstance(converted, bytes) else converted


def generate(pb, tokenizer: GeneratorTokenizer, prompt: str, *, system: Optional[str] = None, raw: bool = False,
             max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: Optional[int] = None, guide_type: Optional[str] = None, guide: Optional[str] = None,
             on_delta: Optional[Callable] = None, is_cancelled: Optional[Callable] = None, timer=None,
             hop: Optional[ta.Hop] = None, on_started: Optional[Callable] = None, stream: bool = False,
             penalties: Optional[dict] = None) -> dict:
    """Prompt text → `generate` engine → text. ``on_delta(text)`` (if given) streams the text as it decodes.

    Returns {text, finish_reason, num_input_tokens, num_output_tokens, queue_delay_us}; finish_reason is
    'length' when the token budget ran out, 'cancelled' when the caller went away, else 'stop'; queue_delay_us
    is the engine's wait before scheduling (from its perf metrics), None when it reports none.
    ``is_cancelled`` is the parent request's (None outside a request); besides telling when the caller went away
    it is the barrier that ends the engine stream safely (see ``triton.adapter.bls_stream``).
    ``penalties``: TensorRT-LLM's penalty inputs by name (``contracts.trtllm.PENALTY_INPUTS``), e.g. a task policy's.
    ``on_started()`` (if given) is called once the generation has started. The engine streams when ``stream``,
    ``on_delta`` or ``on_started`` is given (``stream`` alone: so that a cancelled caller is noticed between
    tokens rather than at the end; ``on_started``: a non-streamed request only starts when it has finished).
    """
    if guide_type is not None and guide_type not in GUIDE_TYPES:
        raise InvalidInput(f"unknown guide_type {guide_type!r}; expected one of {', '.join(GUIDE_TYPES)}")
    with _stage(timer, "tokenize"):
        ids = tokenizer.prompt_ids(prompt, system, raw=raw)
    tokenizer.check_budget(len(ids), max_tokens)
    streaming = stream or on_delta is not None or on_started is not None
    inputs = generate_inputs(ids, max_tokens, tokenizer.end_id, tokenizer.pad_id, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, streaming=streaming,
                             guide_type=guide_type, guide=guide, penalties=penalties)
    n_in = len(ids)
    sent = []                        # whether text reached the caller: a stream that did cannot be retried

    def run(version):
        detok = tokenizer.detokenizer()
        n_out, queue_delay_us = 0, None
        # an IPC round trip: asked every CANCEL_POLL_S, not at every token
        cancelled = Throttled(is_cancelled) if is_cancelled is not None else (lambda: False)
        for arrays in ta.bls_stream(pb, "generate", inputs, ENGINE_OUTPUTS, hop, on_started, barrier=is_cancelled,
                                    version=version):
            if cancelled():
                return {"text": "", "finish_reason": "cancelled", "num_input_tokens": n_in,
                        "num_output_tokens": n_out}
            delta = detok.push(output_tokens(arrays))
            n_out = max(n_out, int(arrays["num_output_tokens"].reshape(-1)[0]), len(detok.ids))
            if on_delta is not None and delta:
                sent.append(True)
                on_delta(delta)
            if "first_scheduled_time_ns" in arrays:
                queue_delay_us = (int(arrays["first_scheduled_time_ns"].reshape(-1)[0]) -
                                  int(arrays["arrival_time_ns"].reshape(-1)[0])) / 1000.0
        tail = detok.flush()
        if on_delta is not None and tail:
            on_delta(tail)
        return {"text": tokenizer.decode(detok.ids), "finish_reason": finish_reason(n_out, max_tokens),
                "num_input_tokens": n_in, "num_output_tokens": n_out, "queue_delay_us": queue_delay_us}

    return leased(pb, "generate", run, retry_if=lambda: not sent)
