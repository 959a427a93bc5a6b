"""ragstack.governance.identity: X-Engine-Hash / X-Quantisation checks and header forwarding to BLS children."""
import json

import pytest

from ragstack.contracts.errors import InvalidInput
from ragstack.governance.identity import check_identity, forward_headers, request_headers

ENGINE = {"engine_hash": "ab12cd34" * 8, "quantisation": "w4a8", "tokenizer_hash": "ignored"}
SOURCE = "manifest build/engines/generate/manifest.json"


def triton_params(**headers) -> str:
    """What request.parameters() returns: JSON, names lower-cased, plus tritonclient's int entry."""
    params = {k.lower().replace("_", "-"): v for k, v in headers.items()}
    params["inference-header-content-length"] = 0
    return json.dumps(params)


def test_matching_headers_pass_in_any_form():
    good = {"x-engine-hash": ENGINE["engine_hash"], "x-quantisation": "w4a8"}
    check_identity(good, ENGINE, SOURCE)
    check_identity(json.dumps(good), ENGINE, SOURCE)
    check_identity(json.dumps(good).encode(), ENGINE, SOURCE)
    # mixed-case keys, upper-case values and stray whitespace carry no meaning
    check_identity({"X-Engine-Hash": " " + ENGINE["engine_hash"].upper(), "X-QUANTISATION": "W4A8 "}, ENGINE, SOURCE)
    check_identity(triton_params(x_engine_hash=ENGINE["engine_hash"], x_quantisation="w4a8"), ENGINE, SOURCE)


@pytest.mark.parametrize("headers", [None, "", {}, {"x-quantisation": "w4a8"}, {"x-engine-hash": "   "},
                                     {"x-engine-hash": 12345, "x-quantisation": "w4a8"}])
def test_missing_engine_hash_names_header_and_source(headers):
    with pytest.raises(InvalidInput) as e:
        check_identity(headers, ENGINE, SOURCE)
    assert str(e.value) == (f"missing header X-Engine-Hash (expected the engine_hash of {SOURCE}: "
                            f"'{ENGINE['engine_hash']}')")


def test_missing_quantisation():
    with pytest.raises(InvalidInput, match=r"^missing header X-Quantisation \(expected the quantisation of "
                                           r"manifest build/engines/generate/manifest\.json: 'w4a8'\)$"):
        check_identity({"x-engine-hash": ENGINE["engine_hash"]}, ENGINE, SOURCE)


def test_mismatch_says_what_was_sent_and_what_is_served():
    with pytest.raises(InvalidInput) as e:
        check_identity({"x-engine-hash": "deadbeef", "x-quantisation": "w4a8"}, ENGINE, SOURCE)
    msg = str(e.value)
    assert msg.startswith("header X-Engine-Hash is 'deadbeef' but the served engine has engine_hash")
    assert ENGINE["engine_hash"] in msg and SOURCE in msg
    with pytest.raises(InvalidInput, match=r"header X-Quantisation is 'fp8' but the served engine has "
                                           r"quantisation 'w4a8'"):
        check_identity({"x-engine-hash": ENGINE["engine_hash"], "x-quantisation": "fp8"}, ENGINE, SOURCE)


def test_bad_parameters_are_invalid_input():
    with pytest.raises(InvalidInput, match="not valid JSON"):
        check_identity("{oops", ENGINE, SOURCE)
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        check_identity("[1, 2]", ENGINE, SOURCE)


def test_server_side_misconfiguration_is_not_blamed_on_the_request():
    with pytest.raises(RuntimeError, match="has no engine_hash"):
        check_identity({"x-engine-hash": "a", "x-quantisation": "b"}, {"quantisation": "b"}, SOURCE)


def test_request_headers_keeps_strings_only():
    params = triton_params(x_engine_hash="h", x_quantisation="q")
    assert request_headers(params) == {"x-engine-hash": "h", "x-quantisation": "q"}
    assert request_headers({"Max-Tokens": 5, "X-A": "1"}) == {"x-a": "1"}


def test_forward_headers_picks_x_entries_for_bls_children():
    params = json.dumps({"x-engine-hash": "h", "x-quantisation": "q", "x-request-id": "r1",
                         "inference-header-content-length": 17, "temperature": "0.5", "x-count": 3})
    assert forward_headers(params) == {"x-engine-hash": "h", "x-quantisation": "q", "x-request-id": "r1"}
    assert forward_headers(None) == {}
    # what a child receives passes the same check the parent did
    check_identity(forward_headers(triton_params(x_engine_hash=ENGINE["engine_hash"], x_quantisation="w4a8")),
                   ENGINE, SOURCE)
