"""ragstack.triton.loopback.stream (the pipeline's decoupled child calls over the server's own gRPC endpoint) against a
fake tritonclient.grpc client that calls back the way the real one does (keyword arguments, from its own thread)."""
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from ragstack.governance import access
from ragstack.triton import loopback
from ragstack.contracts.errors import InvalidInput, Unavailable


class _Flag:
    def __init__(self, value):
        self.bool_param = value


class _Response:
    def __init__(self, final):
        self.parameters = {"triton_final_response": _Flag(final)}


class _Result:
    def __init__(self, arrays, final):
        self.arrays, self.final = arrays, final

    def get_response(self):
        return _Response(self.final)

    def as_numpy(self, name):
        return self.arrays.get(name)


class FakeClient:
    """Plays back ``script``: [(arrays, final)] responses, or an InferenceServerException, after the request."""
    made = []

    def __init__(self, url, channel_args=None):
        self.url, self.calls, self.closed = url, [], False
        FakeClient.made.append(self)

    def start_stream(self, callback, **kw):
        self.callback = callback

    def async_stream_infer(self, model, inputs, **kw):
        self.calls.append(("infer", model, [i.name() for i in inputs], kw))

        def play():
            for item in self.script:
                if isinstance(item, Exception):
                    self.callback(result=None, error=item)
                else:
                    self.callback(result=_Result(*item), error=None)
        threading.Thread(target=play, daemon=True).start()

    def stop_stream(self, cancel_requests=False):
        self.calls.append(("stop", cancel_requests))

    def close(self):
        self.closed = True


@pytest.fixture
def fake(monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    monkeypatch.setenv(access.SECRET_FILE_ENV, str(secret))
    monkeypatch.setenv(loopback.PORT_ENV, "18001")
    monkeypatch.setattr(grpcclient, "InferenceServerClient", FakeClient)
    monkeypatch.setattr(loopback, "_idle_streams", [])
    FakeClient.made.clear()

    def with_script(script):
        FakeClient.script = script
        return FakeClient
    return with_script


INPUTS = {"input_ids": np.array([[1, 2, 3]], np.int32)}


def test_a_stream_yields_each_response_with_outputs_and_ends_at_the_final_one(fake):
    fake([({"output_ids": np.array([[7]])}, False), ({"output_ids": np.array([[8]])}, False), ({}, True)])
    got = list(loopback.stream("generate", INPUTS, ["output_ids"], {"x-engine-hash": "abc", "x-api-key": "k"},
                               level=2, version=3, timeout_s=5))
    assert [a["output_ids"].item() for a in got] == [7, 8]          # the empty final response yields nothing
    client = FakeClient.made[0]
    (_, model, names, kw), stop = client.calls
    assert model == "generate" and names == ["input_ids"]
    assert kw["priority"] == 2 and kw["model_version"] == "3" and kw["enable_empty_final_response"]
    # what a BLS child carries: forwarded headers and the internal proof, never the client's key
    assert kw["parameters"]["x-engine-hash"] == "abc" and access.is_internal(kw["parameters"])
    assert "x-api-key" not in kw["parameters"]
    assert stop == ("stop", False) and not client.closed and loopback._idle_streams == [client]   # kept for reuse


def test_a_finished_streams_client_and_channel_serve_the_next_stream(fake):
    fake([({"output_ids": np.array([[1]])}, True)])
    for _ in range(3):
        assert len(list(loopback.stream("generate", INPUTS, ["output_ids"], {}, timeout_s=5))) == 1
    assert len(FakeClient.made) == 1 and len(FakeClient.made[0].calls) == 6
    # at most IDLE_STREAMS_MAX idle clients are kept; more are closed
    extra = [loopback._stream_client() for _ in range(loopback.IDLE_STREAMS_MAX + 2)]
    for client in extra:
        loopback._release_stream_client(client, True)
    assert len(loopback._idle_streams) == loopback.IDLE_STREAMS_MAX
    assert sum(c.closed for c in extra) == 2


def test_no_level_is_the_models_default_and_no_version_is_whichever_is_served(fake):
    fake([({"output_ids": np.array([[1]])}, True)])
    assert len(list(loopback.stream("generate", INPUTS, ["output_ids"], {}, timeout_s=5))) == 1
    kw = FakeClient.made[0].calls[0][3]
    assert kw["priority"] == 0 and kw["model_version"] == ""


def test_closing_the_stream_early_cancels_the_request(fake):
    fake([({"output_ids": np.array([[i]])}, False) for i in range(5)])
    gen = loopback.stream("generate", INPUTS, ["output_ids"], {}, timeout_s=5)
    next(gen)
    gen.close()
    client = FakeClient.made[0]
    assert client.calls[-1] == ("stop", True) and client.closed and not loopback._idle_streams


def test_an_error_keeps_its_class(fake):
    fake([InferenceServerException("invalid input: the regex does not compile")])
    with pytest.raises(InvalidInput, match="regex"):
        list(loopback.stream("generate", INPUTS, ["output_ids"], {}, timeout_s=5))
    assert FakeClient.made[0].calls[-1] == ("stop", True) and FakeClient.made[0].closed
    assert not loopback._idle_streams


def test_silence_past_the_timeout_is_unavailable(fake):
    fake([])
    with pytest.raises(Unavailable, match="sent nothing"):
        list(loopback.stream("generate", INPUTS, ["output_ids"], {}, timeout_s=0.2))


def test_only_a_traced_child_with_tracing_on_keeps_the_bls_path(monkeypatch):
    from ragstack.triton import adapter as ta

    traced, untraced = ta.Hop({}, trace=object()), ta.Hop({})
    monkeypatch.delenv(ta.TRACE_ENV, raising=False)
    assert not ta._traced(traced) and not ta._traced(untraced) and not ta._traced(None)
    monkeypatch.setenv(ta.TRACE_ENV, "/tmp/trace.json")
    assert ta._traced(traced) and not ta._traced(untraced) and not ta._traced(None)
