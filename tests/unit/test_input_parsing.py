"""Request parsing turns every malformed input into InvalidInput naming the input (INVALID_ARG to the caller),
and leaves real bugs alone (they stay internal errors). The plain-Python cores of the fixes the fuzz test
(tests/integration/test_fuzz.py) drove."""
import json
import math

import numpy as np
import pytest

from ragstack.index import ops as index_ops
from ragstack.pipeline import ingest
from ragstack.contracts import json_input
from ragstack.pipeline import rag
from ragstack.triton import adapter as ta
from ragstack.contracts.errors import InvalidInput
from ragstack.index import FlatFileStore
from ragstack.lifecycle.canary import CanaryRouter
from ragstack.lifecycle.service import ManagerService

DEEP = 100_000


# ------------------------------------------------------------------------------------------- json_input
@pytest.mark.parametrize("text, message", [
    ("[" * DEEP + "]" * DEEP, "payload nests JSON deeper than 64 levels"),
    ('{"a": ' * DEEP + "1" + "}" * DEEP, "deeper than 64"),
    ("{" + '"a":[' * DEEP, "deeper than 64"),                         # unbalanced: judged on the depth reached
    ("not json", "payload is not valid JSON: Expecting value at line 1 column 1"),
    ('{"a": [1, 2', "payload is not valid JSON"),
    ("", "payload is not valid JSON"),
    ("NaN", "NaN is not a JSON value"),
    ('{"a": -Infinity}', "-Infinity is not a JSON value"),
])
def test_loads_rejects_what_is_not_json_with_the_inputs_name(text, message):
    with pytest.raises(InvalidInput, match=message):
        json_input.loads(text, "payload")


def test_loads_checks_the_json_type_and_the_depth_limit_exactly():
    assert json_input.loads('{"a": [1]}', "x", expect=dict) == {"a": [1]}
    with pytest.raises(InvalidInput, match="x must be a JSON object, got a JSON array"):
        json_input.loads("[1]", "x", expect=dict)
    with pytest.raises(InvalidInput, match="must be a JSON string, got bytes"):
        json_input.loads(b"{}", "x")
    assert json_input.loads("[" * 64 + "]" * 64, "x") is not None
    with pytest.raises(InvalidInput, match="deeper than 64"):
        json_input.loads("[" * 65 + "]" * 65, "x")


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = json.dumps({"text": "[" * 5000 + '{ "\\" ' + "{" * 5000})
    assert json_input.loads(text, "x")["text"].startswith("[[[")
    assert not json_input.json_depth_exceeds(text)


def test_finite_number():
    assert json_input.finite_number(3, "n") == 3.0
    for bad, message in ((True, "must be a number, got a JSON boolean"), ("3", "got a JSON string"),
                         (math.nan, "must be finite"), (math.inf, "must be finite"), (10 ** 400, "out of range")):
        with pytest.raises(InvalidInput, match=message):
            json_input.finite_number(bad, "n")


# ------------------------------------------------------------------------------------ the JSON inputs
def test_rag_schema_and_documents_bound_the_nesting():
    with pytest.raises(InvalidInput, match="schema nests JSON deeper"):
        rag.parse_schema('{"a": ' * DEEP + "1" + "}" * DEEP)
    with pytest.raises(InvalidInput, match="schema must be a JSON object, got a JSON array"):
        rag.parse_schema("[1]")
    with pytest.raises(InvalidInput, match=r"documents\[0\].*nests JSON deeper"):
        rag.parse_caller_documents(['{"a": ' * DEEP + "1" + "}" * DEEP])


def test_ingest_request_size_limits(monkeypatch):
    with pytest.raises(InvalidInput, match="metadata for 'd1' is .* the limit is"):
        ingest.parse_documents("upsert", ["d1"], ["text"], ["{}" + " " * ingest.MAX_METADATA_CHARS])
    monkeypatch.setattr(ingest, "MAX_REQUEST_TEXT_BYTES", 10)              # the total, not each document
    with pytest.raises(InvalidInput, match="texts of one request total 12 bytes"):
        ingest.parse_documents("upsert", ["d1", "d2"], ["abcdef", "ghijkl"], None)
    assert len(ingest.parse_documents("upsert", ["d1", "d2"], ["abcde", "fghij"], None)) == 2


def test_ingest_metadata_bounds_the_nesting():
    deep = '{"a": ' * DEEP + "1" + "}" * DEEP
    with pytest.raises(InvalidInput, match="metadata for 'd1' nests JSON deeper"):
        ingest.parse_documents("upsert", ["d1"], ["text"], [deep])
    with pytest.raises(InvalidInput, match="metadata for 'd1' must be a JSON object"):
        ingest.parse_documents("upsert", ["d1"], ["text"], ["[1]"])


# ------------------------------------------------------------------------------------------ vector_index
@pytest.mark.parametrize("op, payload, message", [
    ("upsert", {"chunks": [{"text": "x"}], "content_hash": "h"}, "upsert needs payload.doc_id"),
    ("upsert", {"doc_id": "d", "content_hash": "h"}, "upsert needs payload.chunks"),
    ("upsert", {"doc_id": "d", "chunks": [{"text": "x"}]}, "upsert needs payload.content_hash"),
    ("upsert", {"doc_id": ["d"], "chunks": [{"text": "x"}], "content_hash": "h"}, "doc_id must be"),
    ("upsert", {"doc_id": "d", "chunks": "x", "content_hash": "h"}, "chunks must be"),
    ("upsert", {"doc_id": "d", "chunks": [{"text": "x"}], "content_hash": 5}, "content_hash must be"),
    ("upsert", {"doc_id": "d", "chunks": [{"text": "x"}], "content_hash": "h", "doc_metadata": [1]},
     "doc_metadata must be a dict"),
    ("upsert", None, "upsert needs payload.doc_id"),
    ("get", {}, "get needs payload.doc_id"),
    ("get", {"doc_id": {}}, "doc_id must be"),
    ("delete", {"doc_id": None}, "doc_id must be"),
    ("delete", [1, 2], "payload must be a JSON object, got list"),
    ("x" * 100_000, None, "unknown index op"),
])
def test_index_ops_name_the_bad_payload_field(tmp_path, op, payload, message):
    store = FlatFileStore(tmp_path)
    store.upsert("c", "seed", [{"text": "seed"}], np.ones((1, 4), np.float32), {}, "h0")
    with pytest.raises(InvalidInput, match=message) as info:
        index_ops.handle(store, op, "c", vectors=np.ones((1, 4), np.float32), payload=payload)
    assert len(str(info.value)) < 500                      # a huge op is not echoed whole


# ------------------------------------------------------------------------------------------ model_manager
class FakeManager:
    """Records the calls; ``boom`` makes an op fail the way a bug would."""

    def __init__(self, boom=None):
        self.calls, self.boom = [], boom
        self.mode, self.phases, self.cyclic = "co_resident", (), True

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if self.boom is not None:
                raise self.boom
            return {}
        return call


@pytest.mark.parametrize("op, payload, message", [
    ("release", {}, "release needs payload.lease"),
    ("release", {"lease": ["x"]}, "release payload.lease must be a string, got a JSON array"),
    ("release", {"lease": "l", "ok": "yes"}, "payload.ok must be true or false"),
    ("release", {"lease": "l", "latency_ms": math.nan}, "latency_ms must be finite"),
    ("release", {"lease": "l", "latency_ms": -1}, r"latency_ms must be in \[0.0"),
    ("release", {"lease": "l", "error": 5}, "payload.error must be a string"),
    ("set_mode", {}, "set_mode needs payload.mode"),
    ("set_mode", {"mode": 5}, "payload.mode must be a string"),
    ("set_mode", {"mode": "co_resident", "phases": [["embed"], ["rerank"]]}, "phases must be a list of model"),
    ("set_mode", {"mode": "co_resident", "cyclic": "maybe"}, "cyclic must be true or false"),
    ("configure", {"cooldown_s": "soon"}, "cooldown_s must be a number, got a JSON string"),
    ("configure", {"cooldown_s": math.inf}, "cooldown_s must be finite"),
    ("configure", {"cooldown_s": -1}, r"cooldown_s must be in \[0.0"),
    ("configure", {"budget_bytes": "1e999G"}, "budget_bytes is not a size"),
    ("configure", {"budget_bytes": "lots"}, "budget_bytes is not a size"),
    ("configure", {"budget_bytes": 0}, "budget_bytes must be positive"),
    ("configure", {"budget_bytes": [1]}, "budget_bytes must be a number of bytes"),
    ("configure", {"safety_buffer": 2.0}, "safety_buffer must be in"),
    ("configure", {"parallel_loads": 1.5}, "parallel_loads must be an integer"),
    ("configure", {"parallel_loads": 10 ** 30}, "parallel_loads must be in"),
    ("canary_start", {}, "canary_start needs payload.version"),
    ("canary_start", {"version": "2"}, "version must be an integer"),
    ("canary_start", {"version": 2, "share": "half"}, "share must be a number"),
    ("canary_report", {"version": 1}, "canary_report needs payload.ok"),
    ("rollback", {"root_cause": {}}, "root_cause must be a string"),
    ("heal", {"force": "yes"}, "force must be true or false"),
])
def test_manager_service_names_the_bad_field_and_calls_nothing(op, payload, message):
    manager = FakeManager()
    with pytest.raises(InvalidInput, match=message):
        ManagerService(manager).handle(op, "embed", payload)
    assert manager.calls == []


def test_manager_service_passes_checked_values_and_nulls_mean_absent():
    manager = FakeManager()
    service = ManagerService(manager)
    service.handle("release", "embed", {"lease": "l1", "ok": False, "latency_ms": 20, "error": None})
    assert manager.calls[-1] == ("release", ("l1",), {"ok": False, "latency_s": 0.02, "error": None})
    service.handle("set_mode", None, {"mode": "sequential", "cyclic": None})
    assert manager.calls[-1] == ("set_mode", ("sequential", None, None), {})


def test_manager_service_keeps_a_bug_an_internal_error():
    """A KeyError / TypeError inside an op is a bug, not bad input: it is not relabelled."""
    for exc in (KeyError("models"), TypeError("unhashable"), ValueError("bug")):
        with pytest.raises(type(exc)) as info:
            ManagerService(FakeManager(boom=exc)).handle("release", "embed", {"lease": "l1"})
        assert not isinstance(info.value, InvalidInput)


@pytest.mark.parametrize("op, model, payload, message", [
    (None, "embed", {}, "op must be a string, got JSON null"),
    (["acquire"], "embed", {}, "op must be a string, got a JSON array"),
    ("acquire", 7, {}, "model must be a string, got a JSON number"),
    ("acquire", None, {}, "op 'acquire' needs a model"),
    ("acquire", "embed", [1], "payload must be a JSON object"),
    ("reboot", "embed", {}, "unknown op 'reboot'"),
])
def test_manager_service_checks_op_and_model_before_anything_runs(op, model, payload, message):
    manager = FakeManager()
    with pytest.raises(InvalidInput, match=message):
        ManagerService(manager).handle(op, model, payload)
    assert manager.calls == []


def test_manager_service_answers_a_refusal_as_bad_input_and_a_bug_as_internal(caplog):
    """The manager refusing the request (LifecycleError) is the caller's INVALID_ARG; a KeyError inside an op is
    a bug: INTERNAL on the wire, logged with its traceback."""
    from ragstack.lifecycle.manager import LifecycleError

    with pytest.raises(InvalidInput, match="no previous version"):
        ManagerService(FakeManager(boom=LifecycleError("embed: no previous version"))).handle(
            "rollback", "embed", {"root_cause": "r"})
    try:                                   # what bls_models/model_manager does with any exception
        ManagerService(FakeManager(boom=KeyError("models"))).handle("status", None, {})
        response = None
    except Exception as e:  # noqa: BLE001
        assert not isinstance(e, InvalidInput)
        with caplog.at_level("ERROR", logger="ragstack"):
            response = ta.error_response(FakePb, e)
    assert response.error.code == FakePb.TritonError.INTERNAL
    assert response.error.msg.startswith("internal error: KeyError")
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_canary_router_reports_bad_settings_as_invalid_input():
    with pytest.raises(InvalidInput, match="share must be in"):
        CanaryRouter("embed", 1, 2, share=1.5)
    with pytest.raises(InvalidInput, match="is the stable version"):
        CanaryRouter("embed", 1, 1)


# ------------------------------------------------------------------------------------------ error messages
class FakePb:
    class TritonError:
        INVALID_ARG, INTERNAL = "invalid_arg", "internal"

        def __init__(self, msg, code=None):
            self.msg, self.code = msg, code

    class InferenceResponse:
        def __init__(self, error=None):
            self.error = error


def test_error_messages_that_echo_a_huge_input_are_cut():
    response = ta.error_response(FakePb, InvalidInput(f"unknown op {'x' * 200_000!r}"))
    assert response.error.code == "invalid_arg"
    assert response.error.msg.startswith(ta.INVALID_MARK + "unknown op 'xxx")
    assert len(response.error.msg) < ta.MAX_ERROR_CHARS + 100 and "more characters]" in response.error.msg
    short = ta.error_response(FakePb, InvalidInput("bad"))
    assert short.error.msg == ta.INVALID_MARK + "bad"


def test_output_tokens_of_a_streamed_final_response_without_a_new_token():
    """The reference engine's last streamed response may carry no token (output_ids [1, 1, 0]): generate_text
    with stream=true failed on it with 'cannot reshape array of size 0' (found by the fuzz test)."""
    from ragstack.contracts.trtllm import generate_outputs, output_tokens

    assert output_tokens(generate_outputs([], num_input_tokens=3, num_output_tokens=5)) == []
    assert output_tokens(generate_outputs([7, 8], num_input_tokens=3, num_output_tokens=2)) == [7, 8]


def test_engine_folders_resolve_under_engine_path_and_must_exist_where_a_model_loads_one(tmp_path, monkeypatch):
    monkeypatch.delenv(ta.ENGINE_PATH_ENV, raising=False)
    assert ta.engine_dir_path(str(tmp_path / "embed")) == tmp_path / "embed"      # absolute: as given
    with pytest.raises(RuntimeError, match="ENGINE_PATH is not set"):
        ta.engine_dir_path("embed")
    monkeypatch.setenv(ta.ENGINE_PATH_ENV, str(tmp_path))
    assert ta.engine_dir_path("embed") == tmp_path / "embed"
    with pytest.raises(RuntimeError, match="does not exist"):
        ta.resolve_engine_dir("embed")
    (tmp_path / "embed").mkdir()
    assert ta.resolve_engine_dir("embed") == tmp_path / "embed"
