"""JSON that arrives in a request's string inputs, parsed so that every problem is the caller's InvalidInput.

``json.loads`` fails in three ways on hostile text: ``JSONDecodeError`` (not JSON), ``RecursionError`` (nesting
deeper than the interpreter's recursion limit: ``"[" * 100_000`` is 200 kB) and ``ValueError`` for out-of-range
constructs. :func:`loads` bounds the nesting *before* parsing (a scan at C speed: strings are skipped by one
regular expression, only brackets are counted in Python, and only when the text has more brackets than the
limit) and turns every parse failure into :class:`~ragstack.contracts.errors.InvalidInput` naming the input.
"""
from __future__ import annotations

import json
import math
import re
from typing import Optional

from ragstack.contracts.errors import InvalidInput

# Deep enough for any real payload, schema or metadata (a JSON Schema nests two levels per schema level),
# shallow enough that nothing downstream (jsonschema, xgrammar, json.dumps) comes near a recursion limit.
MAX_JSON_DEPTH = 64
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", bool: "a JSON boolean",
               int: "a JSON number", float: "a JSON number", type(None): "JSON null"}


def json_depth_exceeds(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays/objects deeper than ``max_depth`` (brackets inside strings do not count;
    unbalanced text is judged on the depth it reaches)."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif token in "]}":
            depth -= 1
    return False


def type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def loads(text: str, what: str, *, expect: Optional[type] = None, max_depth: int = MAX_JSON_DEPTH):
    """``text`` parsed as JSON; InvalidInput naming ``what`` when it is not JSON, nests deeper than
    ``max_depth``, or (with ``expect``, e.g. ``dict``) is not of that JSON type."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a JSON string, got {type(text).__name__}")
    if json_depth_exceeds(text, max_depth):
        raise InvalidInput(f"{what} nests JSON deeper than {max_depth} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:   # not reachable after the depth check; kept so that it can never become a 500
        raise InvalidInput(f"{what} nests JSON too deeply") from None
    if expect is not None and not isinstance(value, expect):
        raise InvalidInput(f"{what} must be {_TYPE_NAMES.get(expect, expect.__name__)}, got {type_name(value)}")
    return value


def _reject_constant(name: str):
    """NaN, Infinity and -Infinity are not JSON (Python's json accepts them by default)."""
    raise InvalidInput(f"{name} is not a JSON value")


def finite_number(value, what: str) -> float:
    """A JSON number (not a boolean) that is finite, as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number, got {type_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidInput(f"{what} is out of range") from None
    if not math.isfinite(number):
        raise InvalidInput(f"{what} must be finite, got {value}")
    return number
