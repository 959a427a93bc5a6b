"""Engine leases for BLS models: ``with engine_lease(pb, "embed") as lease: ...call embed...``.

Inside the block the engine is loaded and cannot be unloaded (the manager holds a reference for the lease);
the request goes to the version the lease names (``lease.request_kwargs()``: a canary or the stable one); on
exit the outcome and latency go back to the manager (an exception in the block counts as a failed request
and is re-raised).

When ``model_manager`` is not loaded, or stops answering, the lease is a no-op (``lease.managed`` is False)
and the engine is called as before: the stack keeps working without the manager.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

from ragstack.triton import adapter as ta
from ragstack.contracts.tensors import MODEL_MANAGER
from ragstack.contracts.errors import InvalidInput
from ragstack.lifecycle.leasing import EngineLease, EngineUnavailable, acquire_lease, holding, release_lease
from ragstack.lifecycle.state import DEAD_STUB_MARKERS

log = logging.getLogger("ragstack.lifecycle")

MANAGER = "model_manager"
CHECK_EVERY_S = 5.0
_available = {}
_lock = threading.Lock()


def manager_available(pb, manager: str = MANAGER, ttl_s: float = CHECK_EVERY_S) -> bool:
    """Whether the manager model is loaded (asked at most every ``ttl_s`` seconds)."""
    now = time.monotonic()
    with _lock:
        known = _available.get(manager)
        if known is not None and now - known[1] < ttl_s:
            return known[0]
    try:
        ready = bool(pb.is_model_ready(model_name=manager))
    except Exception:  # noqa: BLE001 - cannot tell: go without it
        ready = False
    with _lock:
        _available[manager] = (ready, now)
    return ready


def _mark_unavailable(manager: str) -> None:
    with _lock:
        _available[manager] = (False, time.monotonic())


def manager_call(pb):
    def call(op, model, payload):
        inputs = MODEL_MANAGER.input_arrays({"op": op, "payload": json.dumps(payload), "model": model or None})
        out = ta.bls_infer(pb, "model_manager", inputs, ["result"])
        return json.loads(out["result"].reshape(-1)[0])
    return call


@contextlib.contextmanager
def engine_lease(pb, model: str, *, timeout_s: float = 300.0):
    manager = MANAGER
    if not manager_available(pb, manager):
        yield EngineLease(model)
        return
    call = manager_call(pb)
    try:
        lease = acquire_lease(call, model, timeout_s)
    except (EngineUnavailable, InvalidInput):
        raise
    except Exception as e:  # noqa: BLE001 - the manager itself failed: serve without it
        log.error("model_manager did not answer (%s): calling %s without a lease", e, model)
        _mark_unavailable(manager)
        lease = EngineLease(model)

    def release(held, latency_s):
        try:
            release_lease(call, held, latency_s)
        except Exception as e:  # noqa: BLE001 - the lease expires on its own (lease_ttl_s)
            log.error("releasing %s on %s failed: %s", held.lease_id, model, e)
    with holding(lease, release):
        yield lease


def is_dead_stub_error(exc: BaseException) -> bool:
    """Triton 2.51's answer from a model whose stub process died (it keeps reporting the model ready)."""
    return any(marker in str(exc) for marker in DEAD_STUB_MARKERS)


def call_with_lease(pb, model: str, fn, *, retries: int = 1, timeout_s: float = 300.0, retry_if=None):
    """``fn(lease)`` inside :func:`engine_lease`. A request that failed because the engine's stub had died is
    retried: its release told the manager, which marks the model dead at once, so the retry waits for the
    reload instead of failing again. ``retry_if()`` (if given) must also say yes (a stream that already sent
    text to its caller cannot be started again)."""
    for attempt in range(retries + 1):
        lease = None
        try:
            with engine_lease(pb, model, timeout_s=timeout_s) as lease:
                return fn(lease)
        except Exception as e:
            if (attempt < retries and lease is not None and lease.managed and is_dead_stub_error(e)
                    and (retry_if is None or retry_if())):
                log.warning("%s: stub died under a request; retrying after the manager's reload", model)
                continue
            raise
