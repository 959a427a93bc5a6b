"""generate_text: text in, text out over the `generate` engine (reference or TensorRT-LLM alike).

Decoupled: each request runs on its own worker thread (a blocking BLS stream to `generate`), so requests are
served concurrently and decode together in the engine's in-flight batch. With `stream` true, text deltas are
sent as tokens arrive; the final response carries finish_reason and token counts.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb

from ragstack import contracts
from ragstack import triton_adapter as ta
from ragstack.chat import GeneratorTokenizer
from ragstack.trtllm_io import GUIDE_TYPES, finish_reason, generate_inputs, output_tokens

C = contracts.GENERATE_TEXT
FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 256
ENGINE_OUTPUTS = ["output_ids", "sequence_length", "num_input_tokens", "num_output_tokens"]


class TritonPythonModel:
    def initialize(self, args):
        params = ta.model_parameters(args)
        tokenizer_dir = os.environ.get(ta.TOKENIZER_DIR_ENV)
        self.tokenizer = GeneratorTokenizer(ta.resolve_engine_dir(params["engine_dir"]),
                                            Path(tokenizer_dir) if tokenizer_dir else None)
        self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_concurrency", "32")),
                                       thread_name_prefix="generate_text")

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._serve, request, request.get_response_sender())
        return None

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _serve(self, request, sender):
        try:
            self._generate(request, sender)
        except Exception as e:  # noqa: BLE001 - bad input or an engine error ends this request only
            sender.send(ta.error_response(pb, e), flags=FINAL)

    def _generate(self, request, sender):
        get = lambda name, default=None: ta.input_scalar(pb, request, C, name, default)  # noqa: E731
        prompt = ta.input_string(pb, request, C, "prompt")
        system = ta.input_string(pb, request, C, "system")
        guide_type = ta.input_string(pb, request, C, "guide_type")
        guide = ta.input_string(pb, request, C, "guide")
        if guide_type is not None and guide_type not in GUIDE_TYPES:
            raise ta.InvalidInput(f"unknown guide_type {guide_type!r}; expected one of {', '.join(GUIDE_TYPES)}")
        max_tokens = int(get("max_tokens", DEFAULT_MAX_TOKENS))
        stream = bool(get("stream", False))
        ids = self.tokenizer.prompt_ids(prompt, system, raw=bool(get("raw_prompt", False)))
        self.tokenizer.check_budget(len(ids), max_tokens)
        inputs = generate_inputs(ids, max_tokens, self.tokenizer.end_id, self.tokenizer.pad_id,
                                 temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 0)),
                                 top_p=float(get("top_p", 1.0)), seed=get("seed"), streaming=stream,
                                 guide_type=guide_type, guide=guide)
        detok = self.tokenizer.detokenizer()
        n_in = n_out = 0
        for arrays in ta.bls_stream(pb, "generate", inputs, ENGINE_OUTPUTS):
            if request.is_cancelled():
                sender.send(flags=FINAL)
                return
            delta = detok.push(output_tokens(arrays))
            n_in = int(arrays["num_input_tokens"].reshape(-1)[0])
            n_out = int(arrays["num_output_tokens"].reshape(-1)[0])
            if stream and delta:
                sender.send(self._response({"text": [delta]}))
        # Streaming: the final response carries only what is left; otherwise the whole text.
        text = detok.flush() if stream else self.tokenizer.decode(detok.ids)
        final = {"text": [text], "finish_reason": [finish_reason(n_out, max_tokens)],
                 "num_input_tokens": [n_in], "num_output_tokens": [n_out]}
        sender.send(self._response(final), flags=FINAL)

    @staticmethod
    def _response(values):
        return pb.InferenceResponse(output_tensors=ta.output_tensors(
            pb, C, {k: np.asarray(v, dtype=np.object_ if k in ("text", "finish_reason") else np.int32)
                    for k, v in values.items()}))
