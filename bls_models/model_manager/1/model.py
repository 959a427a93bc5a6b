"""model_manager: the one authority for engine loads and unloads (ragstack/lifecycle).

Thin adapter: each request is an op over ragstack.lifecycle.service.ManagerService; the manager's worker
thread (started in initialize) performs the loads and unloads. Single instance by design: the budget, the
leases and the canary counters live in this one process.
"""
import json

import triton_python_backend_utils as pb

from ragstack.governance import access
from ragstack.contracts import tensors as contracts
from ragstack.contracts import json_input
from ragstack.triton import adapter as ta
from ragstack.lifecycle.triton_io import build_manager

C = contracts.MODEL_MANAGER


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        self.manager, self.service, self.events = build_manager(pb, args)
        ta.freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                op = ta.input_string(pb, request, C, "op")
                if op != "status":       # checked first: a caller without the key learns nothing of the payload
                    access.require_role(request.parameters(), "admin", f"model_manager op {str(op)[:40]!r}")
                payload = ta.input_string(pb, request, C, "payload")
                payload = json_input.loads(payload, "model_manager: payload", expect=dict) if payload else {}
                result = self.service.handle(op,
                                             ta.input_string(pb, request, C, "model"), payload)
                out = {"result": contracts.one_string(json.dumps(result, default=str))}
                responses.append(pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, out)))
            except Exception as e:  # noqa: BLE001 - every failure is this request's error response
                responses.append(ta.error_response(pb, e))
        return responses

    def finalize(self):
        if self.service.watchdog is not None:
            self.service.watchdog.stop()
        self.manager.stop()
        self.events.close()
