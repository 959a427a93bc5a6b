"""Guided decoding with xgrammar, under the guide types TensorRT-LLM's ``guided_decoding_guide_type`` accepts.

A guide is compiled once per (type, guide) into an xgrammar ``CompiledGrammar`` (kept in a bounded LRU, since
clients tend to resend the same schema), then every request gets its own :class:`GuideState`: a
``GrammarMatcher`` plus a one-row token bitmask that the engine applies to that request's logits row.

All failures are reported as :class:`~ragstack.errors.InvalidInput` with a message naming the problem, because
they come from client input; xgrammar signals them as ``RuntimeError`` with a C++ source location prefix that
means nothing to a client and is stripped.

xgrammar is imported when first needed, not with this module: an engine serves unguided requests on a machine
without xgrammar, and a guided request there fails as InvalidInput. Where xgrammar is installed, the tokenizer is
prepared when the :class:`GuideCompiler` is built, as before. On a GPU the bitmask is copied to the logits'
device before it is applied.
"""
from __future__ import annotations

import codecs
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from ragstack import json_input
from ragstack.errors import InvalidInput

if TYPE_CHECKING:
    import xgrammar

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")

# "[04:55:47] /project/cpp/regex_converter.cc:83: " in front of every xgrammar error message.
_XGRAMMAR_LOCATION = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")


def _import_xgrammar():
    """The xgrammar module; raises ImportError when it (or a library it needs) is not installed."""
    import xgrammar

    if not hasattr(xgrammar, "GrammarCompiler"):  # an empty placeholder standing in for a missing xgrammar
        raise ImportError("the xgrammar module found is a placeholder without xgrammar's API")
    return xgrammar


def _xgrammar_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _XGRAMMAR_LOCATION.sub("", text)


def control_token_ids(tokenizer, keep: Sequence[int] = ()) -> set:
    """The tokenizer's control tokens (special added tokens such as ``<|im_start|>``, ``<|endoftext|>``,
    ``<think>``) other than ``keep`` (the stop ids)."""
    ids = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    return (ids | set(tokenizer.all_special_ids)) - set(keep)


def encoded_vocab(tokenizer, blank: Sequence[int] = ()) -> list:
    """Token strings in vocabulary encoding, index = token id, with ``blank`` ids emptied.

    xgrammar classifies an empty token as special and never lets a grammar emit it. Without that, control
    tokens count as their literal text (``<|im_start|>`` as 12 characters of a JSON string) and the detokenizer,
    which skips special tokens, returns text that breaks the schema the grammar enforced (seen: a
    ``minLength: 200`` string decoded to 176 characters)."""
    vocab = tokenizer.get_vocab()
    out = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        out[index] = token
    for index in blank:
        out[index] = ""
    return out


def tokenizer_info(tokenizer, vocab_size: Optional[int] = None, stop_token_ids: Optional[Sequence[int]] = None):
    """xgrammar's ``TokenizerInfo`` for a Hugging Face tokenizer with its control tokens masked out (see
    :func:`encoded_vocab`); vocabulary type and prefix-space handling as xgrammar detects them."""
    xgr = _import_xgrammar()
    kw = {"stop_token_ids": list(stop_token_ids)} if stop_token_ids is not None else {}
    base = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, **kw)
    vocab = encoded_vocab(tokenizer, control_token_ids(tokenizer, keep=base.stop_token_ids))
    return xgr.TokenizerInfo(vocab, base.vocab_type, vocab_size=base.vocab_size, stop_token_ids=base.stop_token_ids,
                             add_prefix_space=base.add_prefix_space)


class Utf8Guard:
    """Masks the tokens whose bytes would make the output invalid UTF-8, which xgrammar lets through.

    xgrammar matches a grammar on token bytes and decodes UTF-8 leniently: it accepts an encoded surrogate
    (``ED A0..BF xx``, U+D800-U+DFFF) as one character of a JSON string. The detokenizer (strict UTF-8 with
    replacement) turns those three bytes into three U+FFFD, so text the grammar kept within ``maxLength`` came
    out longer and failed the schema it was generated under (seen under load on ``rag`` task ``judge``).
    The allowed set depends only on the unfinished UTF-8 sequence at the end of the output so far (at most
    three bytes), so one packed mask per such tail is computed once and kept.
    """

    def __init__(self, decoded_vocab: Sequence[bytes], vocab_size: int, keep: Sequence[int] = ()):
        self._vocab = [bytes(b) for b in decoded_vocab]
        self._vocab_size = vocab_size
        self._keep = set(keep)  # stop and other empty tokens: the grammar alone decides about them
        self._masks: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def valid_prefix(data: bytes) -> bool:
        """True when ``data`` is valid UTF-8 or a prefix of it (strict: no surrogates, overlongs, > U+10FFFF)."""
        try:
            codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=False)
            # Python checks an unfinished sequence's second byte (E0/ED/F0/F4 ranges) only once it is whole:
            # complete it with continuation bytes, which are valid wherever the first two bytes are.
            tail = Utf8Guard.tail(data)
            if len(tail) >= 2:
                need = 3 if tail[0] < 0xF0 else 4
                (tail + b"\x80" * (need - len(tail))).decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    @staticmethod
    def tail(data: bytes) -> bytes:
        """The unfinished UTF-8 sequence at the end of ``data`` (b"" when it ends on a whole character)."""
        for n in range(1, min(3, len(data)) + 1):
            byte = data[-n]
            if byte < 0x80:
                return b""
            if byte >= 0xC0:  # a lead byte: unfinished if fewer bytes follow it than it needs
                need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                return data[-n:] if n < need else b""
        return b""

    def mask(self, tail: bytes) -> torch.Tensor:
        """Packed int32 bitmask (xgrammar's layout) of the tokens allowed after ``tail``."""
        with self._lock:
            if tail not in self._masks:
                bits = np.zeros(((self._vocab_size + 31) // 32) * 32, dtype=np.uint8)
                for i in range(self._vocab_size):
                    token = self._vocab[i] if i < len(self._vocab) else b""
                    bits[i] = 1 if (not token or i in self._keep or self.valid_prefix(tail + token)) else 0
                packed = np.packbits(bits, bitorder="little").view(np.int32).copy()
                self._masks[tail] = torch.from_numpy(packed).reshape(1, -1)
            return self._masks[tail]

    def token_bytes(self, token_id: int) -> bytes:
        return self._vocab[token_id] if 0 <= token_id < len(self._vocab) else b""


class GuideCompiler:
    """Compiles guides for one tokenizer and one logits width, with a bounded LRU of compiled grammars.

    ``vocab_size`` must be the width of the model's logits (it can exceed the tokenizer's length when the
    embedding matrix is padded): the bitmask has to cover every logit or padded ids could be sampled.
    Thread-safe: requests are validated on the caller's threads while the engine thread runs matchers.
    """

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        self.vocab_size = int(vocab_size)
        self._cache: OrderedDict[tuple[str, Optional[str]], xgrammar.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer_info = self._compiler = None
        self.unavailable: Optional[str] = None  # why guides cannot be compiled here (xgrammar missing)
        try:
            xgr = _import_xgrammar()
        except ImportError as exc:
            self.unavailable = f"guided decoding is not available on this server (xgrammar: {exc})"
            return
        self._tokenizer_info = tokenizer_info(tokenizer, vocab_size=self.vocab_size)
        # xgrammar's own cache is unbounded by entry count; ours is bounded and keyed by the raw guide text.
        self._compiler = xgr.GrammarCompiler(self._tokenizer_info, cache_enabled=False)
        self.utf8 = Utf8Guard(self._tokenizer_info.decoded_vocab, self.vocab_size,
                              keep=self._tokenizer_info.stop_token_ids)

    def compile(self, guide_type: Optional[str], guide: Optional[str]) -> xgrammar.CompiledGrammar:
        """The compiled grammar for a guide; raises InvalidInput when the guide is unusable."""
        if guide_type not in GUIDE_TYPES:
            raise InvalidInput(f"unknown guided decoding guide type {guide_type!r}; valid types: "
                               f"{', '.join(GUIDE_TYPES)}")
        if guide_type == "json":
            guide = None  # any JSON: the builtin grammar, whatever text came with it
        elif guide is None or (isinstance(guide, str) and not guide.strip()):
            raise InvalidInput(f"guide type {guide_type!r} needs a guide, but none was given")
        elif not isinstance(guide, str):
            raise InvalidInput(f"the guide must be a string, got {type(guide).__name__}")
        if self._compiler is None:
            raise InvalidInput(self.unavailable)
        key = (guide_type, guide)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile_uncached(guide_type, guide)
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile_uncached(self, guide_type: str, guide: Optional[str]) -> xgrammar.CompiledGrammar:
        if guide_type == "json_schema":
            json_input.loads(guide, "json_schema guide")
        try:
            if guide_type == "json":
                return self._compiler.compile_builtin_json_grammar()
            if guide_type == "json_schema":
                # Compact output, as TensorRT-LLM compiles it: no free whitespace for the model to loop in.
                return self._compiler.compile_json_schema(guide, any_whitespace=False)
            if guide_type == "regex":
                return self._compiler.compile_regex(guide)
            return self._compiler.compile_grammar(guide)
        except Exception as exc:  # xgrammar raises RuntimeError, but any failure here is the guide's fault
            what = {"json_schema": "json_schema guide rejected", "regex": "invalid regex guide",
                    "ebnf_grammar": "invalid ebnf_grammar guide"}.get(guide_type, "guide rejected")
            raise InvalidInput(f"{what}: {_xgrammar_message(exc)}") from None

    def new_state(self, compiled: xgrammar.CompiledGrammar, stop_token_ids: Sequence[int]) -> "GuideState":
        return GuideState(compiled, self.vocab_size, stop_token_ids, utf8=self.utf8)


class GuideState:
    """One request's position in its grammar, and the mask of tokens allowed next.

    ``stop_token_ids`` (the request's end id) are the tokens the grammar allows once it is complete; when the
    grammar allows nothing else, :attr:`must_stop` says so, which lets the engine finish the request without
    spending a forward pass on a token whose value is already known.
    """

    def __init__(self, compiled: xgrammar.CompiledGrammar, vocab_size: int, stop_token_ids: Sequence[int],
                 utf8: Optional[Utf8Guard] = None):
        self._utf8 = utf8
        self._tail = b""  # the unfinished UTF-8 sequence the output ends with
        self._xgrammar = _import_xgrammar()  # a compiled grammar exists, so xgrammar does
        self._vocab_size = vocab_size
        # No stop ids given: the matcher falls back to the tokenizer's own end tokens.
        self._matcher = self._xgrammar.GrammarMatcher(compiled,
                                                      override_stop_tokens=sorted(set(stop_token_ids)) or None)
        self._stop_token_ids = frozenset(self._matcher.stop_token_ids)
        self._bitmask = self._xgrammar.allocate_token_bitmask(1, vocab_size)  # host memory: the matcher fills it
        self.must_stop = False
        self._refresh()

    def _refresh(self) -> None:
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if self._utf8 is not None:
            self._bitmask &= self._utf8.mask(self._tail)
        bits = np.unpackbits(self._bitmask.numpy().view(np.uint8), bitorder="little")[: self._vocab_size]
        allowed = np.flatnonzero(bits)
        self.must_stop = len(allowed) <= len(self._stop_token_ids) and set(allowed.tolist()) <= self._stop_token_ids

    def apply(self, logits_row: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (``logits_row``: shape [1, vocab]).

        On CPU the host bitmask is applied as is; elsewhere a copy on the logits' device is, with xgrammar's
        kernel for that device (its Triton kernel on CUDA, or its plain-torch one when Triton is missing).
        """
        if logits_row.device.type == "cpu":
            self._xgrammar.apply_token_bitmask_inplace(logits_row, self._bitmask, vocab_size=self._vocab_size)
            return
        bitmask = self._bitmask.to(logits_row.device)
        try:
            self._xgrammar.apply_token_bitmask_inplace(logits_row, bitmask, vocab_size=self._vocab_size)
        except ImportError:  # no triton for xgrammar's default CUDA kernel
            self._xgrammar.apply_token_bitmask_inplace(logits_row, bitmask, vocab_size=self._vocab_size,
                                                       backend="torch_native")

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id``; the mask was applied before sampling, so a refusal is an engine bug."""
        if not self._matcher.accept_token(int(token_id)):
            raise RuntimeError(f"grammar matcher refused token {token_id} that its own mask allowed")
        if self._utf8 is not None:
            self._tail = Utf8Guard.tail(self._tail + self._utf8.token_bytes(int(token_id)))
        if not self._matcher.is_terminated():
            self._refresh()

    @property
    def terminated(self) -> bool:
        """True once the matcher accepted a stop token."""
        return self._matcher.is_terminated()
