"""The tensor contracts: the one source of truth for every model's inputs and outputs.

Every ``config.pbtxt`` in ``model_repository/`` and ``bls_models/`` is generated from these definitions by
``tools/gen_model_configs.py`` (and a test regenerates them and fails on any drift); the Triton adapters read and
write tensors through them, so a name or dtype can only ever be spelt here.

The engine contracts are those of the production engines:
* ``embed`` / ``rerank``: the TensorRT plans exported by ``engine_builds/`` (pooling, Matryoshka truncation and
  normalisation, or the yes/no score, inside the graph; token ids in, final values out).
* ``generate``: TensorRT-LLM's ``tensorrt_llm`` model as shipped in the pinned NGC container
  (``TRTLLM_CONTAINER``), restricted to the tensors this stack uses or the reference engine implements. A BLS
  caller cannot tell the reference ``generate`` from the real one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# The NGC container the production profile pins: Triton 25.10 with TensorRT-LLM 1.0.0, the first line whose
# tensorrt_llm model has per-request guided decoding (backend >= 0.19) and names the seed input `seed`.
TRTLLM_CONTAINER = "nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3"
TRTLLM_VERSION = "1.0.0"
# The TensorRT that container carries (Triton's compatibility matrix for trtllm-python-py3 25.10: TensorRT 10.11.0.33,
# CUDA 12.9.1) and the TensorRT container of the same TensorRT, where the embed/rerank plans are built: the trtllm
# image has no trtexec (server r25.10 build.py drops TensorRT's bin/ from trtllm images), and a plan only
# deserializes in the TensorRT release that built it. tools/build_plans.sh checks the two versions agree.
TRTLLM_TENSORRT_VERSION = "10.11.0.33"
TENSORRT_CONTAINER = "nvcr.io/nvidia/tensorrt:25.06-py3"

NP_DTYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_UINT64": np.uint64,
    "TYPE_FP32": np.float32,
    "TYPE_STRING": np.object_,
}
# tritonclient's names for the same types
CLIENT_DTYPES = {"TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
                 "TYPE_UINT64": "UINT64", "TYPE_FP32": "FP32", "TYPE_STRING": "BYTES"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                        # Triton config name, e.g. TYPE_INT32
    dims: tuple                       # without the batch dimension when the model batches
    optional: bool = False
    reshape: Optional[tuple] = None   # e.g. () to drop a [1] dim inside the model, as TRT-LLM does
    ragged: bool = False              # allow_ragged_batch
    doc: str = ""

    @property
    def np_dtype(self):
        return NP_DTYPES[self.dtype]

    @property
    def client_dtype(self) -> str:
        return CLIENT_DTYPES[self.dtype]

    def array(self, value) -> np.ndarray:
        """``value`` as this tensor's numpy array: BYTES as UTF-8 (bytes kept as they are), others cast to the
        dtype. A numpy array keeps its shape; a plain value is one request's: a scalar becomes ``[1]``."""
        if isinstance(value, np.ndarray):
            return bytes_array(value) if self.dtype == "TYPE_STRING" else value.astype(self.np_dtype, copy=False)
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        return bytes_array(values) if self.dtype == "TYPE_STRING" else np.array(values, dtype=self.np_dtype)


@dataclasses.dataclass(frozen=True)
class Contract:
    name: str
    inputs: tuple
    outputs: tuple
    max_batch_size: int = 0
    decoupled: bool = False
    doc: str = ""                     # its one-line purpose (the generated README.md of its folder opens with it)
    # Who sends it requests: ((who, how), ...), who being a model name, "clients" or "operators" (in the README).
    callers: tuple = ()

    def input(self, name: str) -> Tensor:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> Tensor:
        return _find(self.outputs, name, self.name, "output")

    def input_arrays(self, values: dict) -> dict:
        """{input name: numpy array} for a request to this model, from plain values or arrays (``Tensor.array``);
        ``None`` values are left out (an absent optional input). A plain value is one request's: where the model
        batches, it gets the batch dimension of 1 (``"q"`` -> ``[[b"q"]]``); an array is taken as shaped."""
        out = {}
        for name, value in values.items():
            if value is None:
                continue
            arr = self.input(name).array(value)
            out[name] = arr if isinstance(value, np.ndarray) or not self.max_batch_size else arr.reshape(1, -1)
        return out


def _find(tensors, name, model, what) -> Tensor:
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(f"{model} has no {what} named {name!r}")


def bytes_array(values) -> np.ndarray:
    """A BYTES tensor's array: each value UTF-8 encoded if it is a str, kept if it is bytes; the shape of
    ``values`` (a list gives ``[n]``)."""
    arr = np.asarray(values, dtype=np.object_)
    out = np.empty(arr.shape, dtype=np.object_)
    out.reshape(-1)[:] = [v.encode("utf-8") if isinstance(v, str) else v for v in arr.reshape(-1)]
    return out


def one_string(value) -> np.ndarray:
    """A one-string BYTES tensor, ``[1]``: an op name, a collection, a JSON payload."""
    return bytes_array([value])


def scalar(name, dtype, optional=True, doc="") -> Tensor:
    """A per-request scalar the way TensorRT-LLM declares it: dims [1], reshaped to [] inside the model."""
    return Tensor(name, dtype, (1,), optional=optional, reshape=(), doc=doc)


# ---------------------------------------------------------------------------------------------- engines
EMBED = Contract(
    name="embed", max_batch_size=32,
    doc="Embedding engine (Qwen3-Embedding in production): token ids in, final embeddings out.",
    inputs=(
        Tensor("input_ids", "TYPE_INT32", (-1,), doc="token ids, padded per engine.json padding_side"),
        Tensor("attention_mask", "TYPE_INT32", (-1,), doc="1 for real tokens, 0 for padding"),
    ),
    outputs=(Tensor("embedding", "TYPE_FP32", (-1,), doc="pooled, Matryoshka-truncated, L2-normalised"),),
    callers=(("embed_text", "the texts of a direct call, tokenized, under a `model_manager` lease"),
             ("ingest", "the chunks of a batch, under one lease for the whole embed phase"),
             ("rag_orchestrator", "the query, under a lease"),
             ("rag_stream_orchestrator", "the query, under a lease"),
             ("model_manager", "one warm-up request after each load")),
)

RERANK = Contract(
    name="rerank", max_batch_size=16,
    doc="Reranker engine (Qwen3-Reranker in production): one formatted (query, document) prompt per row.",
    inputs=(
        Tensor("input_ids", "TYPE_INT32", (-1,)),
        Tensor("attention_mask", "TYPE_INT32", (-1,)),
    ),
    outputs=(Tensor("score", "TYPE_FP32", (1,), doc="relevance in [0, 1]: sigmoid(logit_yes - logit_no)"),),
    callers=(("rerank_text", "the (query, document) pairs of a direct call, under a `model_manager` lease"),
             ("rag_orchestrator", "the retrieved contexts, under a lease"),
             ("rag_stream_orchestrator", "the retrieved contexts, under a lease"),
             ("model_manager", "one warm-up request after each load")),
)

GENERATE = Contract(
    name="generate", max_batch_size=8, decoupled=True,
    doc=f"TensorRT-LLM tensorrt_llm model contract (TensorRT-LLM {TRTLLM_VERSION}, {TRTLLM_CONTAINER}).",
    inputs=(
        Tensor("input_ids", "TYPE_INT32", (-1,), optional=True, ragged=True),
        scalar("input_lengths", "TYPE_INT32", optional=False),
        scalar("request_output_len", "TYPE_INT32", optional=False),
        scalar("end_id", "TYPE_INT32"),
        scalar("pad_id", "TYPE_INT32"),
        Tensor("stop_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
        Tensor("bad_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
        scalar("beam_width", "TYPE_INT32"),
        scalar("temperature", "TYPE_FP32"),
        scalar("runtime_top_k", "TYPE_INT32"),
        scalar("runtime_top_p", "TYPE_FP32"),
        scalar("seed", "TYPE_UINT64"),
        # Penalties, named and typed as in the pinned tensorrt_llm config.pbtxt (`min_tokens`, once `min_length`;
        # `len_penalty` only rescores beams, so it has no effect at beam width 1; that model has no
        # `no_repeat_ngram_size` input).
        scalar("repetition_penalty", "TYPE_FP32"),
        scalar("presence_penalty", "TYPE_FP32"),
        scalar("frequency_penalty", "TYPE_FP32"),
        scalar("min_tokens", "TYPE_INT32"),
        scalar("len_penalty", "TYPE_FP32"),
        scalar("return_log_probs", "TYPE_BOOL"),
        scalar("return_perf_metrics", "TYPE_BOOL"),
        scalar("return_num_input_tokens", "TYPE_BOOL"),
        scalar("return_num_output_tokens", "TYPE_BOOL"),
        scalar("exclude_input_in_output", "TYPE_BOOL"),
        scalar("streaming", "TYPE_BOOL"),
        Tensor("guided_decoding_guide_type", "TYPE_STRING", (1,), optional=True, ragged=True),
        Tensor("guided_decoding_guide", "TYPE_STRING", (1,), optional=True, ragged=True),
    ),
    outputs=(
        Tensor("output_ids", "TYPE_INT32", (-1, -1), doc="[beam, tokens]"),
        Tensor("sequence_length", "TYPE_INT32", (-1,), doc="[beam]"),
        Tensor("cum_log_probs", "TYPE_FP32", (-1,)),
        Tensor("output_log_probs", "TYPE_FP32", (-1, -1)),
        Tensor("batch_index", "TYPE_INT32", (1,)),
        Tensor("sequence_index", "TYPE_INT32", (1,)),
        Tensor("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,)),
        Tensor("kv_cache_reused_blocks", "TYPE_INT32", (1,)),
        Tensor("kv_cache_alloc_total_blocks", "TYPE_INT32", (1,)),
        Tensor("arrival_time_ns", "TYPE_INT64", (1,)),
        Tensor("first_scheduled_time_ns", "TYPE_INT64", (1,)),
        Tensor("first_token_time_ns", "TYPE_INT64", (1,)),
        Tensor("last_token_time_ns", "TYPE_INT64", (1,)),
        # Speculative-decoding figures: with return_perf_metrics the v1.0.0 backend adds them to every response,
        # speculative or not, and Triton core rejects a response carrying an output the config does not declare.
        Tensor("acceptance_rate", "TYPE_FP32", (1,)),
        Tensor("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
        Tensor("total_draft_tokens", "TYPE_INT32", (1,)),
        Tensor("num_input_tokens", "TYPE_INT32", (1,)),
        Tensor("num_output_tokens", "TYPE_INT32", (1,)),
    ),
    callers=(("generate_text", "one BLS stream per request, under a `model_manager` lease"),
             ("rag_orchestrator", "the answer, guided by the task's JSON Schema, under a lease"),
             ("rag_stream_orchestrator", "the answer, streamed token by token, under a lease"),
             ("model_manager", "one warm-up request after each load")),
)
# Everything the backend adds to a response when the request sets return_perf_metrics (tests/unit/test_contracts.py
# holds the list documented for the pinned backend version and compares).
PERF_METRIC_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
                       "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns",
                       "acceptance_rate", "total_accepted_draft_tokens", "total_draft_tokens")

# ------------------------------------------------------------------------------- BLS (text-level) models
# Internal models take no direct calls unless the operator opens them (ragstack/governance/access.py).
DIRECT_CALLS = "direct calls, only where the operator opens it (RAG_DIRECT_MODELS): benchmarks, debugging"

EMBED_TEXT = Contract(
    name="embed_text", max_batch_size=64,
    doc="Tokenizes texts (Qwen3-Embedding conventions) and calls the embed engine.",
    inputs=(
        Tensor("text", "TYPE_STRING", (1,)),
        Tensor("input_type", "TYPE_STRING", (1,), optional=True, doc="'query' or 'document' (default)"),
        Tensor("task", "TYPE_STRING", (1,), optional=True, doc="instruction for queries"),
    ),
    outputs=(
        Tensor("embedding", "TYPE_FP32", (-1,)),
        Tensor("num_tokens", "TYPE_INT32", (1,)),
    ),
    callers=(("clients", DIRECT_CALLS),),
)

RERANK_TEXT = Contract(
    name="rerank_text", max_batch_size=0,
    doc="Scores documents against a query: formats the reranker prompt, tokenizes, calls the rerank engine.",
    inputs=(
        Tensor("query", "TYPE_STRING", (1,)),
        Tensor("documents", "TYPE_STRING", (-1,)),
        Tensor("task", "TYPE_STRING", (1,), optional=True),
    ),
    outputs=(Tensor("scores", "TYPE_FP32", (-1,)),),
    callers=(("clients", DIRECT_CALLS),),
)

GENERATE_TEXT = Contract(
    name="generate_text", max_batch_size=0, decoupled=True,
    doc="Text in, text out over the generate engine: chat template, tokenization, guided decoding, streaming.",
    inputs=(
        Tensor("prompt", "TYPE_STRING", (1,)),
        Tensor("system", "TYPE_STRING", (1,), optional=True),
        Tensor("max_tokens", "TYPE_INT32", (1,), optional=True),
        Tensor("temperature", "TYPE_FP32", (1,), optional=True),
        Tensor("top_p", "TYPE_FP32", (1,), optional=True),
        Tensor("top_k", "TYPE_INT32", (1,), optional=True),
        Tensor("seed", "TYPE_UINT64", (1,), optional=True),
        Tensor("guide_type", "TYPE_STRING", (1,), optional=True, doc="json | json_schema | regex | ebnf_grammar"),
        Tensor("guide", "TYPE_STRING", (1,), optional=True),
        Tensor("stream", "TYPE_BOOL", (1,), optional=True),
        Tensor("raw_prompt", "TYPE_BOOL", (1,), optional=True, doc="true: no chat template"),
    ),
    outputs=(
        Tensor("text", "TYPE_STRING", (1,)),
        Tensor("finish_reason", "TYPE_STRING", (1,), doc="stop | length | cancelled"),
        Tensor("num_input_tokens", "TYPE_INT32", (1,)),
        Tensor("num_output_tokens", "TYPE_INT32", (1,)),
    ),
    callers=(("clients", DIRECT_CALLS),),
)

# ------------------------------------------------------------------------------------------- RAG models
VECTOR_INDEX = Contract(
    name="vector_index", max_batch_size=0,
    doc="The one process that owns the vector store: op = search | upsert | delete | stats.",
    inputs=(
        Tensor("op", "TYPE_STRING", (1,)),
        Tensor("collection", "TYPE_STRING", (1,), optional=True),
        Tensor("query_vector", "TYPE_FP32", (-1,), optional=True),
        Tensor("top_k", "TYPE_INT32", (1,), optional=True),
        Tensor("vectors", "TYPE_FP32", (-1, -1), optional=True),
        Tensor("payload", "TYPE_STRING", (1,), optional=True, doc="JSON: doc_id, chunks, metadata, hash"),
    ),
    outputs=(Tensor("result", "TYPE_STRING", (1,), doc="JSON"),),
    callers=(("rag_orchestrator", "search, at the request's priority"),
             ("rag_stream_orchestrator", "search, at the request's priority"),
             ("ingest", "upsert and delete, at the ingest request's priority (background by default)"),
             ("clients", DIRECT_CALLS)),
)

INGEST = Contract(
    name="ingest", max_batch_size=0,
    doc="Chunks documents token-aware, embeds the chunks through `embed`, upserts them into a collection.",
    inputs=(
        Tensor("doc_ids", "TYPE_STRING", (-1,)),
        Tensor("texts", "TYPE_STRING", (-1,), optional=True, doc="required for upsert"),
        Tensor("metadata", "TYPE_STRING", (-1,), optional=True, doc="a JSON object per document"),
        Tensor("collection", "TYPE_STRING", (1,), optional=True),
        Tensor("op", "TYPE_STRING", (1,), optional=True, doc="upsert (default) | delete"),
        Tensor("chunk_tokens", "TYPE_INT32", (1,), optional=True),
        Tensor("overlap_tokens", "TYPE_INT32", (1,), optional=True),
        Tensor("files", "TYPE_STRING", (-1,), optional=True,
               doc="raw file bytes per doc_id (instead of texts): PDF, DOCX, PPTX, XLSX, HTML, Markdown, text"),
        Tensor("file_names", "TYPE_STRING", (-1,), optional=True, doc="one per file: its type from the suffix"),
        Tensor("mime_types", "TYPE_STRING", (-1,), optional=True, doc="one per file (or empty): wins over names"),
    ),
    outputs=(Tensor("report", "TYPE_STRING", (1,), doc="JSON: per document, chunks and status"),),
    callers=(("clients", "a writer key: tools/rag_client.py ingest and delete, the benchmarks' corpus loads"),),
)

DOCLING = Contract(
    name="docling", max_batch_size=0,
    doc="Docling conversion: file bytes + name or MIME type → the DoclingDocument (JSON) and its Markdown.",
    inputs=(
        Tensor("data", "TYPE_STRING", (1,), doc="the file's bytes"),
        Tensor("file_name", "TYPE_STRING", (1,), optional=True),
        Tensor("mime_type", "TYPE_STRING", (1,), optional=True),
    ),
    outputs=(
        Tensor("document", "TYPE_STRING", (1,), doc="DoclingDocument as JSON"),
        Tensor("markdown", "TYPE_STRING", (1,)),
    ),
    callers=(("ingest", "the files of a request that are not plain text"),),
)

_RAG_INPUTS = (
    Tensor("query", "TYPE_STRING", (1,)),
    Tensor("task", "TYPE_STRING", (1,), optional=True, doc="answer | generate_json | rank_candidates | judge"),
    Tensor("schema", "TYPE_STRING", (1,), optional=True, doc="a JSON Schema for the answer"),
    Tensor("documents", "TYPE_STRING", (-1,), optional=True, doc="caller documents: bypass the index"),
    Tensor("top_k", "TYPE_INT32", (1,), optional=True),
    Tensor("top_n", "TYPE_INT32", (1,), optional=True),
    Tensor("max_tokens", "TYPE_INT32", (1,), optional=True),
    Tensor("collection", "TYPE_STRING", (1,), optional=True),
)
_RAG_OUTPUTS = (
    Tensor("answer", "TYPE_STRING", (1,), doc="JSON valid under the task's schema"),
    Tensor("contexts", "TYPE_STRING", (1,), doc="JSON list: id, doc_id, text, score, rerank_score"),
    Tensor("usage", "TYPE_STRING", (1,), doc="JSON: tokens in/out, per-stage timings, schema id"),
)
RAG_ORCHESTRATOR = Contract(
    name="rag_orchestrator", max_batch_size=8, inputs=_RAG_INPUTS, outputs=_RAG_OUTPUTS,
    doc="The BLS orchestrator: embed → search → rerank → guided generate; requests of a batch run concurrently.",
    callers=(("rag", "its ensemble's one step, tensors mapped by name"),))
RAG = Contract(name="rag", max_batch_size=8, inputs=_RAG_INPUTS, outputs=_RAG_OUTPUTS,
               doc="The public endpoint (ensemble over rag_orchestrator): HTTP, gRPC and /generate.",
               callers=(("clients", "a reader key: HTTP /infer, gRPC, /generate (tools/rag_client.py ask)"),))
# Triton 2.51 serves a decoupled model only over gRPC streams and /generate_stream (HTTP /infer and gRPC
# ModelInfer refuse it, /generate wants exactly one response), so token streaming has its own twin.
RAG_STREAM_ORCHESTRATOR = dataclasses.replace(
    RAG_ORCHESTRATOR, name="rag_stream_orchestrator", decoupled=True,
    doc="Streaming twin of rag_orchestrator: answer text deltas as tokens decode, then the final outputs.",
    callers=(("rag_stream", "its ensemble's one step, tensors mapped by name"),))
RAG_STREAM = dataclasses.replace(
    RAG, name="rag_stream", decoupled=True, doc="Streaming twin of rag: answer text deltas, then the final outputs.",
    callers=(("clients", "a reader key: gRPC stream, /generate_stream (tools/rag_client.py ask --stream)"),))

ENGINES = {c.name: c for c in (EMBED, RERANK, GENERATE)}
BLS_MODELS = {c.name: c for c in (EMBED_TEXT, RERANK_TEXT, GENERATE_TEXT, VECTOR_INDEX, INGEST, DOCLING,
                                  RAG_ORCHESTRATOR, RAG_STREAM_ORCHESTRATOR)}
ENSEMBLES = {c.name: (c, orch) for c, orch in ((RAG, RAG_ORCHESTRATOR), (RAG_STREAM, RAG_STREAM_ORCHESTRATOR))}
ALL = {**ENGINES, **BLS_MODELS, **{name: c for name, (c, _) in ENSEMBLES.items()}}

# ------------------------------------------------------------------------------------- model lifecycle
MODEL_MANAGER = Contract(
    name="model_manager", max_batch_size=0,
    doc="The one authority for engine loads and unloads: memory budget, LRU, cooldown, pre-warm, self-healing, "
        "canary rollout and rollback (ragstack/lifecycle).",
    inputs=(
        Tensor("op", "TYPE_STRING", (1,), doc="acquire | release | prewarm | unload | status | set_mode | "
                                              "configure | canary_start | canary_route | canary_report | "
                                              "canary_status | rollback | heal | history"),
        Tensor("model", "TYPE_STRING", (1,), optional=True, doc="the engine the op is about"),
        Tensor("payload", "TYPE_STRING", (1,), optional=True, doc="JSON object: the op's arguments"),
    ),
    outputs=(Tensor("result", "TYPE_STRING", (1,), doc="JSON"),),
    callers=tuple((name, "acquire and release engine leases (ragstack/lifecycle/bls_client.py)")
                  for name in ("embed_text", "rerank_text", "generate_text", "ingest", "rag_orchestrator",
                               "rag_stream_orchestrator"))
    + (("operators", "an admin key for every op but status: tools/lifecycle.py (ragstack/lifecycle/client.py)"),),
)
BLS_MODELS[MODEL_MANAGER.name] = MODEL_MANAGER
ALL[MODEL_MANAGER.name] = MODEL_MANAGER
