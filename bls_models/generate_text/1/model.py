"""generate_text: text in, text out over the `generate` engine (reference or TensorRT-LLM alike).

Decoupled: each request runs on a worker thread (a blocking BLS stream to `generate`) and execute() returns when
it is answered; the instances serve requests concurrently, and they decode together in the engine's in-flight
batch. With `stream` true, text deltas are
sent as tokens arrive; the final response carries finish_reason and token counts.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb

from ragstack import settings
from ragstack.governance import access
from ragstack.triton import bls, loopback
from ragstack.contracts import tensors as contracts
from ragstack.governance import priority as prio
from ragstack.triton import adapter as ta
from ragstack.tokenization.generation import GeneratorTokenizer

C = contracts.GENERATE_TEXT
FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 256


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.tokenizer = GeneratorTokenizer(ta.resolve_engine_dir(params["engine_dir"]),
                                            settings.current().tokenizer_dir)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "32")),
                                       thread_name_prefix="generate_text")
        loopback.prepare()
        ta.freeze_startup_heap()

    def execute(self, requests):
        served = [self.pool.submit(self._serve, request, request.get_response_sender(), ta.requested_outputs(request))
                  for request in requests]
        # Return only when every request is answered: if this stub dies meanwhile, Triton (still waiting on this
        # execute) fails the unanswered requests at once; one answered after execute() returned would hang.
        for future in served:
            future.result()
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _serve(self, request, sender, requested):
        try:
            self._generate(request, sender, requested)
        except Exception as e:  # noqa: BLE001 - bad input or an engine error ends this request only
            sender.send(ta.error_response(pb, e), flags=FINAL)

    def _generate(self, request, sender, requested):
        def get(name, default=None):
            return ta.input_scalar(pb, request, C, name, default)

        access.require_internal(request.parameters(), C.name)
        stream = bool(get("stream", False))
        # urgent unless the caller lowers it (x-priority); the engine admits by it
        hop = ta.Hop.of(request, trace=False)
        hop.parameters = prio.with_level(hop.parameters, prio.for_request(request.parameters()))
        result = bls.generate(
            pb, self.tokenizer, ta.input_string(pb, request, C, "prompt"),
            system=ta.input_string(pb, request, C, "system"), raw=bool(get("raw_prompt", False)),
            max_tokens=int(get("max_tokens", DEFAULT_MAX_TOKENS)), temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)), top_k=int(get("top_k", 0)), seed=get("seed"),
            guide_type=ta.input_string(pb, request, C, "guide_type"), guide=ta.input_string(pb, request, C, "guide"),
            on_delta=(lambda text: sender.send(_response({"text": [text]}, requested))) if stream else None,
            is_cancelled=request.is_cancelled, hop=hop)
        if result["finish_reason"] == "cancelled":
            sender.send(flags=FINAL)
            return
        final = {"text": [result["text"] if not stream else ""], "finish_reason": [result["finish_reason"]],
                 "num_input_tokens": [result["num_input_tokens"]], "num_output_tokens": [result["num_output_tokens"]]}
        sender.send(_response(final, requested), flags=FINAL)


def _response(values, requested):
    """Only the outputs the caller asked for (this stub answers from pool threads: see ta.output_tensors)."""
    return pb.InferenceResponse(output_tensors=ta.output_tensors(
        pb, C, {k: np.asarray(v, dtype=np.object_ if k in ("text", "finish_reason") else np.int32)
                for k, v in values.items()}, requested))
