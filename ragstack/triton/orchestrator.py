"""The RAG orchestrator's Triton face (shared by rag_orchestrator and its streaming twin).

The model.py files subclass :class:`OrchestratorModel` and set ``pb``. It wires the pipeline of
:mod:`ragstack.pipeline.rag` to the engines through BLS and runs every request of an ``execute`` batch on its own
thread, so a batch is served concurrently (TensorRT-LLM's own BLS model handles a batch one request after
another). Every request is answered through its response sender (the Python backend allows that in the
default, non-decoupled mode since 24.07), so a request never waits for the slowest of its batch, and
``execute`` returns once every request of the batch has been answered: a request in flight on a stub that
dies then gets Triton's error within a second or two instead of waiting forever, and Triton's trace of each
request outlives its child requests (tritonserver 2.51 crashes on a child started with the trace of a
released request). Concurrency across batches comes from the instance count. Non-decoupled: one response
per request; decoupled:
answer text deltas stream as tokens arrive, then one final response with the answer, contexts and usage.
"""
from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from ragstack.governance import access
from ragstack.triton import bls, loopback
from ragstack.contracts import tensors as contracts
from ragstack.pipeline import rag
from ragstack import settings as rs
from ragstack.governance import priority as prio
from ragstack.triton import adapter as ta
from ragstack.triton.activity import ActivityBoard
from ragstack.tokenization.generation import GeneratorTokenizer
from ragstack.contracts.errors import InvalidInput
from ragstack.governance.events import EventLog
from ragstack.governance.identity import check_identity, request_headers
from ragstack.governance.manifest import MANIFEST_FILE, read_manifest
from ragstack.triton.metrics import StackMetrics
from ragstack.governance.policy import BudgetError, RuntimePolicy
from ragstack.tokenization.retrieval import EmbedTokenizer, RerankTokenizer

C = contracts.RAG_ORCHESTRATOR
log = logging.getLogger(__name__)
DEFAULTS = {"task": "answer", "top_k": 8, "top_n": 3, "collection": "default"}


class OrchestratorModel:
    pb = None  # triton_python_backend_utils, set by the model.py subclass

    def initialize(self, args):
        pb = self.pb
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.decoupled = pb.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        self.embed_tok = EmbedTokenizer(ta.resolve_engine_dir(params["embed_dir"]))
        self.rerank_tok = RerankTokenizer(ta.resolve_engine_dir(params["rerank_dir"]))
        settings = rs.current()
        self.gen_tok = GeneratorTokenizer(ta.resolve_engine_dir(params["generate_dir"]), settings.tokenizer_dir)
        self.policy = RuntimePolicy.load(settings.policy_file)
        self.events = EventLog.from_settings(self.policy.events, base_dir=settings.data_base)
        self.metrics = StackMetrics(pb)
        # The served generator's identity (the engine hash and quantisation requests must name) and its prices
        # come from its build manifest.
        generate_dir = ta.resolve_engine_dir(params["generate_dir"])
        manifest_path = generate_dir / MANIFEST_FILE
        self.manifest = read_manifest(manifest_path) if manifest_path.is_file() else None
        self.manifest_source = f"manifest {manifest_path}"
        if self.policy.require_engine_identity and self.manifest is None:
            raise RuntimeError(f"{manifest_path} is missing: the policy requires engine identity headers "
                               "(rebuild the engines, or set require_engine_identity false)")
        self.model_name = self.gen_tok.spec.name
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "16")),
                                       thread_name_prefix="rag")
        # Urgent requests in flight, for background work to yield to (ragstack/triton/activity.py).
        try:
            self.activity = ActivityBoard()
        except OSError:
            log.warning("no activity board: background work will not yield to this model's requests", exc_info=True)
            self.activity = None
        self._warm_up()
        ta.freeze_startup_heap()

    def _warm_up(self):
        """The CPU side's first-use costs (jsonschema's import and a validator, the tokenizers' first calls:
        ~190 ms measured on a fresh instance; the chat template's first rendering; the loopback connection and the
        lease client's import, whose objects a full collection would otherwise scan: 10-25 ms on an instance's
        first long answer) are paid here, before the startup heap is frozen, not by the first request an instance
        serves."""
        self.embed_tok.encode(["warm-up"], "query")
        self.rerank_tok.encode_pairs("warm-up", ["warm-up"])
        self.gen_tok.count_texts(["warm-up"])
        self.gen_tok.prompt_ids("warm-up", "warm-up")
        loopback.prepare()
        import ragstack.lifecycle.bls_client  # noqa: F401 - the engine leases' client, imported by the first call
        schema = rag.answer_schema("answer", ["ctx-1"], None, 64)
        rag.check_answer(json.dumps({"answer": "ok", "citations": ["ctx-1"]}), schema, "stop", ["ctx-1"])

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.metrics.close()
        self.events.close()
        if self.activity is not None:
            self.activity.close()

    # -------------------------------------------------------------------------------------------- Triton
    def execute(self, requests):
        served = []
        for request in requests:
            # The request's accessors are asked here, on the stub's main thread (see ta.requested_outputs).
            served.append(self.pool.submit(self._serve, request, request.get_response_sender(),
                                           ta.requested_outputs(request)))
        # execute() returns when every request of the batch has been answered. Each is answered through its
        # sender as soon as it is done, so none waits for the slowest of its batch, but the instance takes its
        # next batch only then: if this stub dies, Triton is still waiting on this execute() and answers every
        # request that has no final response yet with an error within a second or two. A request answered
        # after execute() returned would wait forever instead (Triton 2.51 cannot answer for a dead stub).
        for future in served:
            future.result()
        return None

    def _serve(self, request, sender, requested=None):
        """One request, on a pool thread: the answer (streamed as deltas when decoupled), or its error, goes
        out through ``sender`` with the final flag."""
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            on_delta = None
            if self.decoupled:
                def on_delta(text):
                    sender.send(pb.InferenceResponse(output_tensors=self._outputs({"answer": text}, requested)))
            task, result = self._run(request, on_delta)
            response = pb.InferenceResponse(output_tensors=self._outputs(result.outputs(), requested))
        except Exception as e:  # noqa: BLE001 - every failure is this request's error response
            sender.send(ta.error_response(pb, e), flags=final)
            return
        sender.send(response, flags=final)
        # Metrics are IPC round trips to the server (about 1 ms for a request's ten): recorded on the registry's
        # own thread, after the response (a failure there is logged, the answer is out).
        self.metrics.later(self._observe, task, result.usage)

    def _run(self, request, on_delta=None) -> tuple:
        """Policies first (identity, then the request's own checks), then the pipeline: ``(task, result)``.
        Failures are counted here, and budget breaches written as events; successes are counted by the
        caller once the response is out."""
        task = "unknown"
        try:
            access.require_role(request.parameters(), "reader", C.name.replace("_orchestrator", ""))
            if self.policy.require_engine_identity:
                try:
                    check_identity(request_headers(request.parameters()), self._identity(), self.manifest_source)
                except InvalidInput:
                    self.metrics.request(task, "identity_rejected")
                    raise
            req = self._parse(request)
            task = req.task
            level = self._level(request, req.task)
            with self._urgent(level):
                result = rag.run(req, self._engines(request, level), self.policy, on_delta=on_delta,
                                 prices=self._prices(), on_alert=self._alert)
            result.usage["priority"] = prio.name(level)
        except BudgetError as e:
            self.metrics.request(task, e.flag)
            self.events.emit(e.flag, task=task, message=str(e), **e.details)
            raise
        except InvalidInput:
            self.metrics.request(task, "invalid_input")
            raise
        except Exception:
            self.metrics.request(task, "internal_error")
            raise
        return task, result

    def _level(self, request, task: str) -> int:
        """The task's level (runtime policy), lowered if the caller asks, capped by the caller's ceiling."""
        return prio.for_request(request.parameters(), self.policy.task(task).priority)

    def _urgent(self, level: int):
        if level == prio.URGENT and self.activity is not None:
            return self.activity.urgent()
        return contextlib.nullcontext()

    def _identity(self) -> dict:
        return {"engine_hash": self.manifest.engine_hash, "quantisation": self.manifest.quantisation}

    def _prices(self):
        return getattr(self.manifest, "pricing", None) if self.manifest else None

    def _alert(self, event: str, fields: dict) -> None:
        self.events.emit(event, **fields)

    def _observe(self, task: str, usage: dict) -> None:
        """A served request's metrics; the request count goes last, so a scrape that sees it sees the rest."""
        self.metrics.stages(usage["timings_ms"])
        self.metrics.tokens(self.model_name, task, usage["tokens_in"], usage["tokens_out"], usage["cost_usd"] or 0.0)
        delay = usage.get("queue_delay_us")
        if delay is not None:
            self.metrics.queue_delay(self.model_name, delay)
            if self.policy.queue_delay_exceeded(delay):
                self.events.emit("llm_observability_alert", alert="queue_delay", queue_delay_us=delay,
                                 threshold_us=self.policy.thresholds.max_queue_delay_us, task=task)
        self.metrics.request(task, "ok")

    def _outputs(self, values: dict, requested=None) -> list:
        return ta.output_tensors(self.pb, C, {k: contracts.one_string(v) for k, v in values.items()}, requested)

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
            documents=rag.parse_caller_documents(documents) if documents else None,
            top_k=integer("top_k"), top_n=integer("top_n"), max_tokens=integer("max_tokens"),
            collection=string("collection"))
        return rag.validate_rag_request(req)

    def _engines(self, request, level: int = prio.URGENT) -> rag.Engines:
        pb = self.pb
        hop = ta.Hop.of(request)
        # Every child carries the level: the engines see it, and a background one is queued at its level.
        hop.parameters = prio.with_level(hop.parameters, level)

        def generate(system, user, guide_type, guide, policy, max_tokens, on_delta, timer):
            return bls.generate(pb, self.gen_tok, user, system=system, max_tokens=max_tokens,
                                temperature=policy.temperature, top_p=policy.top_p, guide_type=guide_type,
                                guide=guide, on_delta=on_delta, is_cancelled=request.is_cancelled,
                                timer=timer, hop=hop, stream=True, penalties=policy.penalties())

        return rag.token_engines(
            self.embed_tok, self.rerank_tok, self.gen_tok, generate=generate,
            embed=lambda ids, mask: bls.embed_tokens(pb, ids, mask, hop),
            search=lambda collection, vector, top_k, query=None, search=None: bls.search(
                pb, collection, vector, top_k, hop, query=query, search=search),
            rerank=lambda ids, mask: bls.rerank_tokens(pb, ids, mask, hop))
