"""Access control inside Triton: API keys and roles, and the proof a BLS parent gives its children (issue 16).

Roles, checked where a request lands (the model that serves it):
  * ``reader``  rag, rag_stream (their orchestrators) and ``/generate`` on them: open, unless reader keys are
    configured; then a reader, writer or admin key is needed.
  * ``writer``  ingest (upsert and delete): a writer or the admin key.
  * ``admin``   model_manager operations other than ``status``: the admin key.
  * internal    vector_index, the engines (embed, rerank, generate), the *_text models and model_manager_loader:
    only a BLS parent of this server, which proves itself with the per-server secret below. Operators may open
    models to direct calls with ``RAG_DIRECT_MODELS`` (a comma list, or ``*``).

The key travels as the header ``X-Api-Key`` (forwarded by Triton's ``x-.*`` header pattern on HTTP and gRPC);
``/generate`` forwards no headers, so there it goes in the JSON body as ``"x-api-key"`` (body fields become
request parameters, like the identity headers). Keys come from the environment (``RAG_ADMIN_KEY``,
``RAG_WRITER_KEYS``, ``RAG_API_KEYS``: comma separated) or from files (``RAG_ADMIN_KEY_FILE``,
``RAG_WRITER_KEY_FILE``, ``RAG_API_KEY_FILE``: one key per line); a file is re-read when it changes, so keys
rotate without a restart. Keys are compared in constant time (:func:`hmac.compare_digest` over SHA-256 digests,
so not even the length leaks) and never appear in a message or a log line.

The internal secret: ``tools/serve_triton.sh`` writes 32 random bytes (hex) into a 0600 file per server start
and exports ``RAG_INTERNAL_SECRET_FILE``; every stub reads it, every BLS child request carries it as the request
parameter ``x-ragstack-internal``, and whatever a client sends under that name is dropped before a parent
forwards headers. Clients never learn it (the file is readable by the server's user only).

Triton 2.51's Python backend has no PERMISSION_DENIED error code (pb.TritonError has UNKNOWN, INTERNAL,
NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED): a refusal is INVALID_ARG (HTTP
400, gRPC INVALID_ARGUMENT: a client error, the request lacks a credential) whose message starts with
``permission denied:``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from typing import Iterable, Mapping, Optional

from ragstack import settings as rs
from ragstack.contracts.errors import InvalidInput

log = logging.getLogger("ragstack.governance.access")

KEY_HEADER = "x-api-key"
INTERNAL_HEADER = "x-ragstack-internal"
DENIED_MARK = "permission denied: "
SECRET_FILE_ENV = "RAG_INTERNAL_SECRET_FILE"
DIRECT_ENV = "RAG_DIRECT_MODELS"
ROLES = ("reader", "writer", "admin")
# Headers a parent never passes on to a child: the caller's key and any forged internal proof.
PRIVATE_HEADERS = frozenset({KEY_HEADER, INTERNAL_HEADER})


class PermissionDenied(InvalidInput):
    """The caller lacks the role a request needs. An InvalidInput (INVALID_ARG on the wire; see the module doc)
    so every existing error path answers it as a client error; the message starts with :data:`DENIED_MARK`."""

    def __init__(self, msg: str):
        super().__init__(msg if msg.startswith(DENIED_MARK) else DENIED_MARK + msg)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class _FileValues:
    """The non-empty lines of a file, re-read when its mtime, size or inode changes."""

    def __init__(self, path: str):
        self.path = path
        self._stamp = None
        self._values: tuple = ()

    def values(self) -> tuple:
        try:
            st = os.stat(self.path)
        except OSError:
            if self._stamp is not None:
                log.warning("key file %s is gone: its keys no longer open anything", self.path)
            self._stamp, self._values = None, ()
            return ()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as f:
                    lines = [line.strip() for line in f]
            except OSError:
                return self._values
            self._values = tuple(_digest(v) for v in lines if v and not v.startswith("#"))
            self._stamp = stamp
        return self._values


class KeyStore:
    """The configured keys of each role (as digests): from the settings (:mod:`ragstack.settings`) of ``env``, or
    of the process's environment by default."""

    def __init__(self, env: Optional[Mapping] = None):
        self.env = env
        self._lock = threading.Lock()
        self._files: dict = {}

    def _digests(self, role: str) -> tuple:
        keys, path = (rs.current() if self.env is None else rs.from_env(self.env)).keys(role)
        out = [_digest(v) for v in keys]
        if path:
            with self._lock:
                source = self._files.get(role)
                if source is None or source.path != path:
                    source = self._files[role] = _FileValues(path)
                out.extend(source.values())
        return tuple(out)

    def configured(self, role: str) -> bool:
        return bool(self._digests(role))

    def role_of(self, key: Optional[str]) -> Optional[str]:
        """The highest role ``key`` opens, or None. Every configured key is compared (constant time each)."""
        if not key:
            return None
        d = _digest(key.strip())
        found = None
        for role in ROLES:          # low to high: the highest match wins
            match = False
            for want in self._digests(role):
                match |= hmac.compare_digest(d, want)
            if match:
                found = role
        return found


KEYS = KeyStore()


def _params(params) -> dict:
    from ragstack.governance.identity import request_headers

    return request_headers(params)


def require(params, role: str, what: str, keys: Optional[KeyStore] = None) -> None:
    """Raise PermissionDenied unless the request (its parameters) carries a key of ``role`` or higher.
    A ``reader`` requirement passes when no reader keys are configured (reading is open by default)."""
    keys = keys or KEYS
    if role == "reader" and not keys.configured("reader"):
        return
    got = keys.role_of(_params(params).get(KEY_HEADER))
    if got is not None and ROLES.index(got) >= ROLES.index(role):
        return
    if role != "reader" and not any(keys.configured(r) for r in ROLES[ROLES.index(role):]):
        raise PermissionDenied(f"{what} needs a {role} key and none is configured on this server "
                               f"(set RAG_ADMIN_KEY_FILE{' or RAG_WRITER_KEY_FILE' if role == 'writer' else ''})")
    raise PermissionDenied(f"{what} needs a {role} key: send it as the X-Api-Key header "
                           "(or \"x-api-key\" in a /generate body); the key sent is missing or not valid")


# ------------------------------------------------------------------------------------------ internal proof
_secret_cache: dict = {}


def internal_secret() -> Optional[str]:
    """The per-server secret (None when the server was started without one: internal checks are then off)."""
    path = rs.current().internal_secret_file
    if not path:
        return None
    if path not in _secret_cache:           # one per server start: read once
        try:
            with open(path, encoding="utf-8") as f:
                _secret_cache[path] = f.read().strip() or None
        except OSError:
            log.error("cannot read %s (%s): internal models will refuse every call", SECRET_FILE_ENV, path)
            return "\0unreadable"            # fail closed: nothing can match it
    return _secret_cache[path]


def child_parameters(forwarded: Optional[Mapping] = None) -> dict:
    """A BLS child request's parameters: the parent's forwarded headers minus the private ones, plus the proof."""
    out = {k: v for k, v in (forwarded or {}).items() if k not in PRIVATE_HEADERS}
    secret = internal_secret()
    if secret:
        out[INTERNAL_HEADER] = secret
    return out


def direct_models(env: Optional[Mapping] = None) -> frozenset:
    return (rs.current() if env is None else rs.from_env(env)).direct_models


_secret_digests: dict = {}


def _secret_digest(secret: str) -> bytes:
    digest = _secret_digests.get(secret)
    if digest is None:
        digest = _secret_digests[secret] = _digest(secret)
    return digest


def is_internal(params) -> bool:
    """Whether the request carries this server's internal proof (a BLS parent of this server sent it). A request
    without the parameter is a client's: no digest to compare (its absence is no secret)."""
    secret = internal_secret()
    if secret is None:
        return False
    got = _params(params).get(INTERNAL_HEADER)
    if not got:
        return False
    return hmac.compare_digest(_digest(got), _secret_digest(secret))


def require_role(params, role: str, what: str) -> None:
    """:func:`require`, but a BLS parent of this server (internal proof) passes too (e.g. the orchestrators'
    lease calls to model_manager)."""
    if not is_internal(params):
        require(params, role, what)


def require_internal(params, model: str) -> None:
    """Raise PermissionDenied unless the request comes from a BLS parent of this server (or ``model`` is opened
    to direct calls by the operator)."""
    secret = internal_secret()
    if secret is None:
        return
    opened = direct_models()
    if "*" in opened or model in opened:
        return
    if is_internal(params):
        return
    raise PermissionDenied(f"model '{model}' is internal to this server and takes no direct calls "
                           f"(use rag / rag_stream; operators can open it with {DIRECT_ENV})")


def is_denied(message: str) -> bool:
    return DENIED_MARK in message


def scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text
