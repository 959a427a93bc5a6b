"""The manager over HTTP (tritonclient): the CLI, the integration tests and the benchmark use this."""
from __future__ import annotations

import contextlib
import json
import time
from typing import Optional

from ragstack.contracts import client as client_io
from ragstack.lifecycle.leasing import EngineLease, acquire_lease, holding, release_lease

MANAGER = "model_manager"


def env_key(var: str) -> Optional[str]:
    """A key from the environment: ``$VAR``, else the first line of the file ``$VAR_FILE`` (None if neither)."""
    import os

    if os.environ.get(var):
        return os.environ[var].strip()
    path = os.environ.get(var + "_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and not line.startswith("#"):
                    return line.strip()
    return None


class ManagerClient:
    def __init__(self, url: str, manager: str = MANAGER, timeout_s: float = 300.0, client=None,
                 api_key: Optional[str] = None):
        """``api_key``: the admin key (every op but status needs it); default $RAG_ADMIN_KEY, else the first
        line of $RAG_ADMIN_KEY_FILE."""
        import tritonclient.http as httpclient

        self.api_key = api_key if api_key is not None else env_key("RAG_ADMIN_KEY")
        self._http = httpclient
        self.manager = manager
        self.client = client or httpclient.InferenceServerClient(url, network_timeout=timeout_s,
                                                                 connection_timeout=timeout_s)

    def call(self, op: str, model: Optional[str] = None, payload: Optional[dict] = None) -> dict:
        values = {"op": op, "payload": json.dumps(payload or {}), "model": model or None}
        inputs = client_io.infer_inputs(self._http, MANAGER, values)   # the manager's contract
        headers = {"x-api-key": self.api_key} if self.api_key else None
        return client_io.output_json(self.client.infer(self.manager, inputs, headers=headers), "result")

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def status(self) -> dict:
        return self.call("status")

    def model(self, name: str) -> dict:
        return self.status()["models"][name]

    def acquire(self, model: str, timeout_s: float = 300.0) -> EngineLease:
        return acquire_lease(self.call, model, timeout_s)

    def release(self, lease: EngineLease, latency_s: Optional[float] = None) -> None:
        release_lease(self.call, lease, latency_s)

    @contextlib.contextmanager
    def lease(self, model: str, timeout_s: float = 300.0):
        with holding(self.acquire(model, timeout_s), self.release) as lease:
            yield lease

    def wait(self, predicate, timeout_s: float = 120.0, poll_s: float = 0.2) -> dict:
        """Poll status until ``predicate(status)`` holds; returns that status (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"manager state not reached in {timeout_s:.0f} s: "
                                   f"{json.dumps({k: v['state'] for k, v in status['models'].items()})}")
            time.sleep(poll_s)

    def wait_state(self, model: str, state: str, timeout_s: float = 120.0) -> dict:
        return self.wait(lambda s: s["models"][model]["state"] == state, timeout_s)
