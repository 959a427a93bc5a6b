"""acquire_lease: a load that failed because the server was not reachable yet is waited out, a real failure is not."""
import pytest

from ragstack.contracts.errors import Unavailable
from ragstack.lifecycle.leasing import acquire_lease

REFUSED = ("RuntimeError: failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:36029: "
           "Failed to connect to remote host: Connection refused")


def _manager(answers):
    answers = iter(answers)
    return lambda op, model, payload: next(answers)


def test_a_refused_connection_is_waited_out():
    call = _manager([{"status": "failed", "detail": REFUSED}] * 3 + [{"status": "ready", "version": 1, "lease": 7}])
    lease = acquire_lease(call, "embed", sleep=lambda s: None)
    assert lease.lease_id == 7 and lease.version == 1


def test_a_real_load_failure_is_unavailable_at_once():
    call = _manager([{"status": "failed", "detail": "InferenceServerException: model 'embed' has no version 1"}])
    with pytest.raises(Unavailable, match="cannot be loaded"):
        acquire_lease(call, "embed", sleep=lambda s: None)


def test_an_unreachable_server_still_times_out():
    t = [0.0]

    def clock():
        t[0] += 1.0
        return t[0]
    call = _manager([{"status": "failed", "detail": REFUSED}] * 100)
    with pytest.raises(Unavailable, match="not available after waiting"):
        acquire_lease(call, "embed", timeout_s=10, sleep=lambda s: None, clock=clock)
