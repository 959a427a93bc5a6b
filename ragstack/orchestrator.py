"""The RAG orchestrator's Triton face (shared by rag_orchestrator and its streaming twin).

The model.py files subclass :class:`OrchestratorModel` and set ``pb``. It wires the pipeline of
:mod:`ragstack.rag` to the engines through BLS and runs every request of an ``execute`` batch on its own
thread, so a batch is served concurrently (TensorRT-LLM's own BLS model handles a batch one request after
another). Non-decoupled: responses are returned together; decoupled: answer text deltas stream as tokens
arrive, then one final response with the answer, contexts and usage.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ragstack import bls, contracts, rag
from ragstack import triton_adapter as ta
from ragstack.chat import GeneratorTokenizer
from ragstack.policy import RuntimePolicy
from ragstack.text import EmbedTokenizer, RerankTokenizer

C = contracts.RAG_ORCHESTRATOR
DEFAULTS = {"task": "answer", "top_k": 8, "top_n": 3, "collection": "default"}


def _strings(value: str):
    return np.array([value.encode("utf-8")], dtype=np.object_)


class OrchestratorModel:
    pb = None  # triton_python_backend_utils, set by the model.py subclass

    def initialize(self, args):
        pb = self.pb
        params = ta.model_parameters(args)
        self.decoupled = pb.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        self.embed_tok = EmbedTokenizer(ta.resolve_engine_dir(params["embed_dir"]))
        self.rerank_tok = RerankTokenizer(ta.resolve_engine_dir(params["rerank_dir"]))
        tokenizer_dir = os.environ.get(ta.TOKENIZER_DIR_ENV)
        self.gen_tok = GeneratorTokenizer(ta.resolve_engine_dir(params["generate_dir"]),
                                          Path(tokenizer_dir) if tokenizer_dir else None)
        self.policy = RuntimePolicy.load(os.environ.get(ta.POLICY_FILE_ENV) or ta.DEFAULT_POLICY_FILE)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "16")),
                                       thread_name_prefix="rag")

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    # -------------------------------------------------------------------------------------------- Triton
    def execute(self, requests):
        pb = self.pb
        if self.decoupled:
            for request in requests:
                self.pool.submit(self._serve_stream, request, request.get_response_sender())
            return None
        futures = [self.pool.submit(self._respond, request) for request in requests]
        return [f.result() for f in futures]

    def _respond(self, request):
        pb = self.pb
        try:
            result = rag.run(self._parse(request), self._engines(request), self.policy)
            return pb.InferenceResponse(output_tensors=self._outputs(result.outputs()))
        except Exception as e:  # noqa: BLE001 - every failure is this request's error response
            return ta.error_response(pb, e)

    def _serve_stream(self, request, sender):
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            def on_delta(text):
                sender.send(pb.InferenceResponse(output_tensors=self._outputs({"answer": text})))
            result = rag.run(self._parse(request), self._engines(request), self.policy, on_delta=on_delta)
            sender.send(pb.InferenceResponse(output_tensors=self._outputs(result.outputs())), flags=final)
        except Exception as e:  # noqa: BLE001
            sender.send(ta.error_response(pb, e), flags=final)

    def _outputs(self, values: dict) -> list:
        return ta.output_tensors(self.pb, C, {k: _strings(v) for k, v in values.items()})

    # ---------------------------------------------------------------------------------------- pipeline
    def _parse(self, request) -> rag.RagRequest:
        pb = self.pb

        def string(name):
            return ta.input_string(pb, request, C, name, DEFAULTS.get(name))

        def integer(name):
            value = ta.input_scalar(pb, request, C, name, DEFAULTS.get(name))
            return None if value is None else int(value)
        documents = ta.input_strings(pb, request, C, "documents")
        req = rag.RagRequest(
            query=string("query"), task=string("task"), schema=rag.parse_schema(string("schema")),
            documents=rag.parse_documents(documents) if documents else None,
            top_k=integer("top_k"), top_n=integer("top_n"), max_tokens=integer("max_tokens"),
            collection=string("collection"))
        return rag.validate_request(req)

    def _engines(self, request) -> rag.Engines:
        pb = self.pb

        def embed_query(query, timer):
            with timer.stage("tokenize"):
                ids, mask, lengths = self.embed_tok.encode([query], "query")
            return bls.embed_tokens(pb, ids, mask)[0], int(lengths[0])

        def search(collection, vector, top_k):
            inputs = {"op": _strings("search"), "collection": _strings(collection),
                      "query_vector": np.asarray(vector, dtype=np.float32), "top_k": np.array([top_k], np.int32)}
            out = ta.bls_infer(pb, "vector_index", inputs, ["result"])["result"].reshape(-1)[0]
            return [rag.Context(text=h["text"], doc_id=h["doc_id"], chunk_id=h["chunk_id"], score=float(h["score"]),
                                metadata=h.get("metadata") or {})
                    for h in json.loads(out)["hits"]]

        def rerank(query, texts, timer):
            with timer.stage("tokenize"):
                ids, mask = self.rerank_tok.encode_pairs(query, texts)
            return bls.rerank_tokens(pb, ids, mask)

        def generate(system, user, schema, policy, max_tokens, on_delta, timer):
            return bls.generate(pb, self.gen_tok, user, system=system, max_tokens=max_tokens,
                                temperature=policy.temperature, top_p=policy.top_p, guide_type="json_schema",
                                guide=json.dumps(schema), on_delta=on_delta, is_cancelled=request.is_cancelled,
                                timer=timer)

        def count_tokens(system, user):
            return len(self.gen_tok.prompt_ids(user, system or None))

        def prompt_limit(max_tokens):
            spec = self.gen_tok.spec
            return min(spec.max_input_len or spec.max_seq_len, spec.max_seq_len - max_tokens)

        return rag.Engines(embed_query=embed_query, search=search, rerank=rerank, generate=generate,
                           count_tokens=count_tokens, prompt_limit=prompt_limit)
