"""Engine identity headers: every request names the engine it expects.

A client (the evaluation tool's slices, the sign-off smoke tests: docs/design-notes.md#evaluation) sends
``X-Engine-Hash`` and ``X-Quantisation``;
the server rejects a request that is missing either or names another engine. That way results can never be
attributed to an engine that did not produce them, e.g. after a rollback swapped the plan underneath a client.

Triton delivers the headers only when it runs with ``--http-header-forward-pattern='x-.*'`` (and the gRPC
twin): they then arrive lower-cased in ``request.parameters()``, a JSON string. That dict may hold other
entries too: ``tritonclient.http`` adds an int ``inference-header-content-length``, and generate-extension
requests put their unknown JSON fields there; only string values are headers. A BLS child does not receive
its parent's headers, so the parent passes :func:`forward_headers` along as the child request's parameters.
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Union

from ragstack.contracts.errors import InvalidInput

# (header as forwarded by Triton, the engine-manifest field it must equal, the header as clients spell it)
IDENTITY_HEADERS = (
    ("x-engine-hash", "engine_hash", "X-Engine-Hash"),
    ("x-quantisation", "quantisation", "X-Quantisation"),
)
FORWARD_PREFIX = "x-"

Params = Union[None, str, bytes, Mapping]


def request_headers(params: Params) -> dict:
    """The string-valued entries of a request's parameters, keys lower-cased.

    Accepts what ``request.parameters()`` returns (a JSON string), an already-parsed dict, or None.
    """
    if params is None or params == "" or params == b"":
        return {}
    if isinstance(params, (str, bytes)):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"request parameters are not valid JSON ({e.msg})") from None
    if not isinstance(params, Mapping):
        raise InvalidInput(f"request parameters must be a JSON object, got {type(params).__name__}")
    return {str(k).lower(): v for k, v in params.items() if isinstance(v, str)}


def forward_headers(params: Params) -> dict:
    """The ``x-*`` headers of a request, to pass as a BLS child request's ``parameters``."""
    return {k: v for k, v in request_headers(params).items() if k.startswith(FORWARD_PREFIX)}


def check_identity(headers: Params, expected: Mapping, source: str) -> None:
    """Raise InvalidInput unless the request's identity headers match the served engine.

    ``expected`` holds the served engine's ``engine_hash`` and ``quantisation`` (from its build manifest);
    ``source`` says where they come from, e.g. ``"manifest build/engines/generate/manifest.json"``, so that a
    client told its request was rejected also learns which file holds the value it should send. Values are
    compared without surrounding whitespace and case-insensitively (hex digests and precision names such as
    ``W4A8`` carry no meaning in their case).
    """
    found = request_headers(headers)
    for key, field, spelling in IDENTITY_HEADERS:
        want = _expected(expected, field, source)
        got = found.get(key)
        if got is None or not got.strip():
            raise InvalidInput(f"missing header {spelling} (expected the {field} of {source}: {want!r})")
        if got.strip().casefold() != want.casefold():
            raise InvalidInput(f"header {spelling} is {got.strip()!r} but the served engine has {field} {want!r} "
                               f"(from {source})")


def _expected(expected: Mapping, field: str, source: str) -> str:
    value: Optional[object] = expected.get(field)
    if not isinstance(value, str) or not value.strip():
        # The server's own configuration is broken, not the request: not an InvalidInput.
        raise RuntimeError(f"{source} has no {field}: cannot check the {field} header")
    return value.strip()
