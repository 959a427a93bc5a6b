"""Reference generate engine: TensorRT-LLM's tensorrt_llm tensor contract over the CPU in-flight batcher.

Decoupled like the real engine: execute() validates and enqueues each request, then returns at once; the
batcher's thread builds the responses (one per step when streaming, one at the end otherwise) and a per-request
sender thread sends them.
"""
import triton_python_backend_utils as pb

from ragstack.governance import access
from ragstack.contracts import tensors as contracts
from ragstack.governance import priority
from ragstack.triton import adapter as ta
from ragstack.governance.engine_spec import EngineSpec
from ragstack.governance.identity import check_identity, request_headers
from ragstack.governance.manifest import MANIFEST_FILE, read_manifest
from ragstack.triton.metrics import PriorityMetrics
from ragstack.engines.generation import GenerationRequest, InflightBatchingEngine
from ragstack.contracts.trtllm import generate_outputs, parse_generate_inputs

FINAL = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
C = contracts.GENERATE


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        ta.set_threads(params)
        engine_dir = ta.resolve_engine_dir(params["engine_dir"])
        spec = EngineSpec.read(engine_dir)
        self.engine = InflightBatchingEngine(engine_dir, max_batch_size=spec.max_batch_size or C.max_batch_size)
        manifest_path = engine_dir / MANIFEST_FILE
        self.identity = None
        if manifest_path.is_file():
            m = read_manifest(manifest_path)
            self.identity = ({"engine_hash": m.engine_hash, "quantisation": m.quantisation}, str(manifest_path))
        self.levels = PriorityMetrics(pb, "generate")
        ta.freeze_startup_heap()

    def execute(self, requests):
        self.levels.count(requests)
        for request in requests:
            sender = request.get_response_sender()
            try:
                access.require_internal(request.parameters(), C.name)
                self._check_identity(request)
                arrays = {t.name: ta.input_array(pb, request, C, t.name) for t in C.inputs}
                req = GenerationRequest(**parse_generate_inputs({k: v for k, v in arrays.items() if v is not None}),
                                        priority=priority.of_parameters(request_headers(request.parameters())))
                # The batcher's thread hands responses to a per-request sender thread and goes on at once
                # (see ta.DetachedSender: a send to a dead BLS parent never returns in Triton 2.51).
                self.engine.submit(req, on_update=_Responder(ta.DetachedSender(sender, FINAL), req,
                                                             ta.requested_outputs(request)),
                                   is_cancelled=request.is_cancelled)
            except Exception as e:  # noqa: BLE001 - bad input ends this request only
                sender.send(ta.error_response(pb, e), flags=FINAL)
        return None

    def _check_identity(self, request):
        """A caller that names the engine it expects (X-Engine-Hash / X-Quantisation, forwarded by Triton or
        passed on by a BLS parent) is refused when this engine is another one."""
        headers = request_headers(request.parameters())
        if self.identity and ("x-engine-hash" in headers or "x-quantisation" in headers):
            check_identity(headers, *self.identity)

    def finalize(self):
        self.engine.shutdown()
        self.levels.close()


class _Responder:
    """Called by the batcher's thread with each step's tokens; turns them into TRT-LLM shaped responses."""

    def __init__(self, sender, req, requested):
        self.sender = sender
        self.req = req
        self.requested = requested      # only these go out: see ta.output_tensors (the batcher is a thread)

    def __call__(self, new_tokens, done, result):
        if done and result is not None and result.finish_reason == "error":
            self.sender.send(ta.error_response(pb, RuntimeError(getattr(result, "error", "generation failed"))),
                             flags=FINAL)
            return
        if self.req.streaming:
            tokens = new_tokens
        elif done:
            tokens = result.output_ids
        else:
            return
        perf = None
        if done and result is not None and self.req.return_perf_metrics:
            perf = {name: getattr(result, name) for name in contracts.PERF_METRIC_OUTPUTS}
        n_in = result.num_input_tokens if result is not None else len(self.req.input_ids)
        n_out = result.num_output_tokens if result is not None else 0
        outputs = generate_outputs(tokens, num_input_tokens=n_in, num_output_tokens=n_out, perf=perf)
        response = pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, outputs, self.requested))
        self.sender.send(response, flags=FINAL if done else 0)
