"""The client half of the lease protocol, shared by BLS models (bls_client) and HTTP clients (client).

``call(op, model, payload) -> dict`` is whatever reaches the manager. Acquiring polls: the manager never
blocks, it answers ``loading``/``waiting`` until the engine is resident, then ``ready`` with a lease.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional

from ragstack.contracts.errors import Unavailable

Call = Callable[[str, Optional[str], dict], dict]


class EngineUnavailable(Unavailable):
    """The manager could not give the engine (it does not fit, it fails to load, or time ran out): UNAVAILABLE
    to the caller (``triton.adapter.error_response``), the message naming the engine."""


@dataclasses.dataclass
class EngineLease:
    model: str
    version: int = -1                  # -1: whichever version Triton serves
    lease_id: Optional[str] = None
    managed: bool = False              # False: no manager, or it does not manage this model
    waited_s: float = 0.0              # time spent waiting for the engine to be loaded
    ok: bool = True
    error: Optional[str] = None

    def request_kwargs(self) -> dict:
        """Keyword arguments for ``pb.InferenceRequest`` so the request goes to the leased version."""
        return {"model_version": self.version} if self.version > 0 else {}

    def mark_failed(self, error: str) -> None:
        """Report the request as failed on release without raising (e.g. a stream that ended in error)."""
        self.ok, self.error = False, error


# Polling backs off from 5 ms to 200 ms (reached after about 0.6 s of waiting): a wait that lasts is a load
# (seconds), and every poll is a request to the one-instance manager: 24 requests waiting for a phase's engine
# at the former 50 ms cap sent it ~480 requests a second, on the same CPU as the load they wait for.
POLL_S, MAX_POLL_S = 0.005, 0.2


# A load that failed because the manager could not reach the server's repository API (the server starts its
# gRPC/HTTP services only after every start-up model is loaded, and the manager may try before that) says
# nothing about the engine: the lease keeps waiting, within its timeout, for the manager's next attempt.
SERVER_UNREACHABLE_MARKERS = ("failed to connect to all addresses", "Connection refused", "Socket closed",
                              "StatusCode.UNAVAILABLE")


def _server_unreachable(detail) -> bool:
    return bool(detail) and any(marker in detail for marker in SERVER_UNREACHABLE_MARKERS)


def acquire_lease(call: Call, model: str, timeout_s: float = 300.0, poll_s: float = POLL_S,
                  max_poll_s: float = MAX_POLL_S, sleep=time.sleep, clock=time.monotonic) -> EngineLease:
    start = clock()
    delay = poll_s
    last = {}
    while True:
        last = call("acquire", model, {})
        status = last.get("status")
        if status == "ready":
            return EngineLease(model, int(last.get("version", -1)), last["lease"], True, clock() - start)
        if status == "unmanaged":
            return EngineLease(model)
        if status == "failed" and not _server_unreachable(last.get("detail")):
            raise EngineUnavailable(f"engine '{model}' cannot be loaded: {last.get('detail') or 'load failed'}")
        if clock() - start > timeout_s:
            raise EngineUnavailable(f"engine '{model}' not available after waiting {timeout_s:.0f} s for the "
                                    f"lifecycle manager to load it ({last.get('detail')}); retry later")
        sleep(delay)
        delay = min(max_poll_s, delay * 1.5)


def release_lease(call: Call, lease: EngineLease, latency_s: Optional[float] = None) -> None:
    if not lease.managed or lease.lease_id is None:
        return
    payload = {"lease": lease.lease_id, "ok": lease.ok}
    if latency_s is not None:
        payload["latency_ms"] = latency_s * 1000.0
    if lease.error:
        payload["error"] = lease.error[:2000]
    call("release", lease.model, payload)


@contextlib.contextmanager
def holding(lease: EngineLease, release: Callable[[EngineLease, float], None], clock=time.monotonic):
    """Hold ``lease`` for a ``with`` block: an exception in the block marks the request failed (and is re-raised),
    and ``release(lease, latency_s)`` reports the outcome whatever happened."""
    t0 = clock()
    try:
        yield lease
    except BaseException as e:
        lease.mark_failed(f"{type(e).__name__}: {e}")
        raise
    finally:
        release(lease, clock() - t0)
