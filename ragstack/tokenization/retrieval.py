"""Tokenization for the embed and rerank engines, as the Triton BLS models run it.

The engines take token ids only (``input_ids`` and ``attention_mask``, int32 ``[B, L]``), exactly like their
TensorRT plans will, so everything that turns text into ids lives here: the Qwen3-Embedding instruct prefix and
appended end-of-text, the Qwen3-Reranker yes/no prompt, BERT's ``[CLS] ... [SEP]`` for the demo models. The
facts come from the engine folder's ``engine.json`` (:mod:`ragstack.governance.engine_spec`) and tokenizer, so the BLS side
and the engine cannot disagree. Pure Python plus the Rust `tokenizers` library: neither torch nor transformers
is imported (tests/unit/test_lean_imports.py).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ragstack.governance.engine_spec import EngineSpec
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.fast_tokenizer import shared_tokenizer

log = logging.getLogger(__name__)

INPUT_TYPES = ("query", "document")

# Batches are padded to a multiple of this many tokens: requests of similar length then share a shape, which
# Triton's dynamic batcher needs in order to put them into one batch.
PAD_MULTIPLE = 16

QWEN3_RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
# The body is the request's head (instruction and query) and the document, joined by the space before it: the head
# ends in a punctuation run ("<Document>:") that a byte-level BPE pre-tokenizer closes before any space, so
# tokenizing the two parts apart gives the ids of the whole (RerankTokenizer checks this when it loads).
QWEN3_RERANK_HEAD = "<Instruct>: {task}\n<Query>: {query}\n<Document>:"
QWEN3_RERANK_DOC = " {doc}"
QWEN3_RERANK_BODY = QWEN3_RERANK_HEAD + QWEN3_RERANK_DOC
# Documents whose token ids RerankTokenizer keeps (least recently used out first), counted in tokens: 4 bytes each.
DOC_CACHE_TOKENS = 1 << 18
# Starts of a document that a split could tokenize differently if the tokenizer's pre-tokenizer were not the
# byte-level kind the split relies on: a tokenizer that gives any of them other ids apart than whole is
# tokenized whole.
SPLIT_PROBES = ("plain words", "Capital start", "  two spaces", " one space", "\nnewline first", "\ttab", "123 digits",
                "'s contraction", "(parenthesis", ":colon", "-dash", "\u00e9t\u00e9 accents", "\u0301 combining",
                "\U0001f642 emoji", "\u4e2d\u6587 CJK", "<|im_end|> special", "x", "\r\nCRLF", "...dots")
QWEN3_RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def read_spec(engine_dir: Path, kind: str) -> EngineSpec:
    """The engine folder's spec; ``kind`` guards against a configuration pointing at the wrong engine."""
    spec = EngineSpec.read(engine_dir)
    if spec.kind != kind:
        raise ValueError(f"{engine_dir} holds a {spec.kind} engine, expected {kind}")
    return spec


def load_tokenizer(engine_dir: Path, kind: str):
    """The engine folder's spec and tokenizer (:class:`ragstack.tokenization.fast_tokenizer.FastTokenizer`: the `tokenizers`
    library, no transformers or torch in the BLS stubs)."""
    spec = read_spec(engine_dir, kind)
    tokenizer = shared_tokenizer(engine_dir)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{engine_dir}: the tokenizer has no pad token")
    return spec, tokenizer


def check_text(text, what: str) -> str:
    """Reject what would otherwise become a meaningless (or crashing) request: a non-string or a blank one."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    return text


def check_text_list(texts, what: str) -> list[str]:
    """A non-empty list of non-blank strings; a bare string is refused rather than split into characters."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InvalidInput(f"{what} must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidInput(f"{what} is an empty list")
    return [check_text(t, f"{what}[{i}]") for i, t in enumerate(texts)]


def resolve_task(task: Optional[str], spec: EngineSpec) -> str:
    """The instruction for the model: the caller's, else the engine's default_task."""
    if task is None:
        task = spec.default_task
        if task is None:
            raise InvalidInput(f"no task given and engine {spec.name} has no default_task")
    return check_text(task, "task")


def padded_length(longest: int, max_length: int) -> int:
    """``longest`` rounded up to a multiple of :data:`PAD_MULTIPLE`, but never past the engine's max_length."""
    return min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_length)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str, max_length: int):
    """Pack token id lists into int32 ``(input_ids, attention_mask)`` ``[B, L]``, padded on ``side``.

    Every row must already fit in ``max_length``; L is the longest row rounded up (:func:`padded_length`).
    """
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    width = padded_length(int(lengths.max()), max_length)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    return input_ids, attention_mask


class EmbedTokenizer:
    """Text to token ids for an embed engine folder (Qwen3-Embedding conventions, or BERT's for family bert)."""

    def __init__(self, engine_dir: Path):
        self.spec, self.tokenizer = load_tokenizer(engine_dir, "embed")
        self.uses_tokenizer_specials = self.spec.family == "bert"
        self.eos_id: Optional[int] = None
        if self.spec.append_eos and not self.uses_tokenizer_specials:
            self.eos_id = self.tokenizer.convert_tokens_to_ids(self.spec.eos_token)
            if self.eos_id is None or self.eos_id == self.tokenizer.unk_token_id:
                raise ValueError(f"{engine_dir}: eos_token {self.spec.eos_token!r} is not in the vocabulary")

    def format(self, text: str, input_type: str, task: Optional[str] = None) -> str:
        """The string the model sees: queries go through the instruct template, documents stay plain."""
        if input_type not in INPUT_TYPES:
            raise InvalidInput(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
        check_text(text, input_type)
        if input_type == "document":
            return text
        if "{task}" in self.spec.query_template:
            task = resolve_task(task, self.spec)
        return self.spec.query_template.format(task=task, query=text)

    def _token_rows(self, strings: list[str]) -> list[list[int]]:
        """Token ids per string, truncated to max_length, special tokens per the model family."""
        max_length = self.spec.max_length
        if self.uses_tokenizer_specials:
            return self.tokenizer(strings, truncation=True, max_length=max_length)["input_ids"]
        rows = self.tokenizer(strings, add_special_tokens=False)["input_ids"]
        if self.eos_id is None:
            return [row[:max_length] for row in rows]
        # Qwen3-Embedding pools the hidden state of the appended end-of-text: it must survive truncation.
        return [row[:max_length - 1] + [self.eos_id] for row in rows]

    def encode(self, texts: list[str], input_type: str, task: Optional[str] = None):
        """``(input_ids, attention_mask, lengths)``: int32 ``[B, L]``, ``[B, L]`` and ``[B]`` (real tokens)."""
        texts = check_text_list(texts, "texts")
        rows = self._token_rows([self.format(t, input_type, task) for t in texts])
        input_ids, attention_mask = pad_batch(rows, self.tokenizer.pad_token_id, self.spec.padding_side,
                                              self.spec.max_length)
        return input_ids, attention_mask, attention_mask.sum(axis=1, dtype=np.int32)

    def count_tokens(self, text: str, input_type: str = "document", task: Optional[str] = None) -> int:
        """Tokens ``text`` takes before truncation (with the special tokens encode adds): more than
        ``spec.max_length`` means the engine only sees the first part of it."""
        ids = self.tokenizer(self.format(text, input_type, task),
                             add_special_tokens=self.uses_tokenizer_specials)["input_ids"]
        return len(ids) + (self.eos_id is not None)


class TokenCache:
    """Token ids of texts (int32 arrays), least recently used out first once more than ``max_tokens`` are held.
    Thread-safe; ``encode(texts) -> [ids]`` runs outside the lock."""

    def __init__(self, encode: Callable[[list], list], max_tokens: int):
        self.encode = encode
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self.misses = 0
        self._ids: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, texts: Sequence[str]) -> list:
        out: list = [None] * len(texts)
        missing: dict = {}
        with self._lock:
            for i, text in enumerate(texts):
                ids = self._ids.get(text)
                if ids is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._ids.move_to_end(text)
                    out[i] = ids
            self.hits += len(texts) - sum(map(len, missing.values()))
            self.misses += len(missing)
        if not missing:
            return out
        new = list(missing)
        encoded = [np.asarray(ids, dtype=np.int32) for ids in self.encode(new)]
        for text, ids in zip(new, encoded):
            for i in missing[text]:
                out[i] = ids
        if self.max_tokens > 0:
            with self._lock:
                for text, ids in zip(new, encoded):
                    if len(ids) > self.max_tokens or text in self._ids:
                        continue
                    self._ids[text] = ids
                    self.tokens += len(ids)
                while self.tokens > self.max_tokens:
                    self.tokens -= len(self._ids.popitem(last=False)[1])
        return out


class RerankTokenizer:
    """(query, document) pairs to token ids for a rerank engine folder, per its ``scoring``.

    Qwen3 scoring tokenizes a request's head (instruction and query) once and each document on its own, keeping
    the documents' ids (:class:`TokenCache`, up to ``doc_cache_tokens``): a document retrieved again costs no
    tokenization. The ids are those of the whole prompt tokenized in one piece; the tokenizer is checked for
    that when it loads (:data:`SPLIT_PROBES`), and tokenizes whole if it fails."""

    def __init__(self, engine_dir: Path, doc_cache_tokens: int = DOC_CACHE_TOKENS):
        self.spec, self.tokenizer = load_tokenizer(engine_dir, "rerank")
        self.split = False
        if self.spec.scoring == "qwen3_yes_no":
            self.prefix_ids = self._ids(QWEN3_RERANK_PREFIX)
            self.suffix_ids = self._ids(QWEN3_RERANK_SUFFIX)
            self._prefix = np.asarray(self.prefix_ids, dtype=np.int32)
            self._suffix = np.asarray(self.suffix_ids, dtype=np.int32)
            self.body_budget = self.spec.max_length - len(self.prefix_ids) - len(self.suffix_ids)
            if self.body_budget < 1:
                raise ValueError(f"{engine_dir}: max_length {self.spec.max_length} leaves no room for the "
                                 "reranker prompt's body")
            self.documents = TokenCache(self._document_ids, doc_cache_tokens)
            self.split = self._split_is_exact()
            if not self.split:
                log.warning("%s: this tokenizer gives a document other ids on its own than inside the reranker "
                            "prompt; prompts are tokenized whole (no document cache)", engine_dir)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _document_ids(self, documents: list[str]) -> list:
        return self.tokenizer([QWEN3_RERANK_DOC.format(doc=d) for d in documents],
                              add_special_tokens=False)["input_ids"]

    def _split_is_exact(self) -> bool:
        task = self.spec.default_task or "Judge the passage."
        for query in ("what is it?", "Query ending in a colon:", "  spaced  "):
            whole = self._whole_rows(query, list(SPLIT_PROBES), task)
            apart = self._split_rows(query, list(SPLIT_PROBES), task, self._document_ids(list(SPLIT_PROBES)))
            if any(list(a) != list(w) for a, w in zip(apart, whole)):
                return False
        return True

    def encode_pairs(self, query: str, documents: list[str], task: Optional[str] = None):
        """``(input_ids, attention_mask)``, int32 ``[len(documents), L]``: one row per (query, document)."""
        check_text(query, "query")
        documents = check_text_list(documents, "documents")
        if self.spec.scoring == "qwen3_yes_no":
            task = resolve_task(task, self.spec)
            if self.split:
                rows = self._split_rows(query, documents, task, self.documents.get(documents))
            else:
                rows = self._whole_rows(query, documents, task)
        else:
            rows = self._bert_pair_rows(query, documents)
        return pad_batch(rows, self.tokenizer.pad_token_id, self.spec.padding_side, self.spec.max_length)

    def _whole_rows(self, query: str, documents: list[str], task: str) -> list[list[int]]:
        """Qwen3-Reranker's prompt. The prefix (the judging instruction), the body and the suffix (the assistant
        turn whose next token is scored as yes/no) are tokenized separately so that truncation can cut the body
        alone: prefix and suffix always survive, however long the document."""
        bodies = [QWEN3_RERANK_BODY.format(task=task, query=query, doc=doc) for doc in documents]
        return [self.prefix_ids + body[:self.body_budget] + self.suffix_ids
                for body in self.tokenizer(bodies, add_special_tokens=False)["input_ids"]]

    def _split_rows(self, query: str, documents: list[str], task: str, doc_ids: list) -> list:
        """The rows of :meth:`_whole_rows` from the head's ids and each document's (``doc_ids``)."""
        head = np.asarray(self._ids(QWEN3_RERANK_HEAD.format(task=task, query=query)), dtype=np.int32)
        room = self.body_budget - len(head)
        if room <= 0:
            return [np.concatenate([self._prefix, head[:self.body_budget], self._suffix]) for _ in documents]
        return [np.concatenate([self._prefix, head, ids[:room], self._suffix]) for ids in doc_ids]

    def _bert_pair_rows(self, query: str, documents: list[str]) -> list[list[int]]:
        """``[CLS] query [SEP] document [SEP]``, cutting only the document: the engine splits at the first
        [SEP]. A query too long to leave room for any document is refused (the tokenizer cannot cut it)."""
        room = self.spec.max_length - self.tokenizer.num_special_tokens_to_add(pair=True) - 1
        query_tokens = len(self._ids(query))
        if query_tokens > room:
            raise InvalidInput(f"query is {query_tokens} tokens; this reranker takes at most {room}")
        encoded = self.tokenizer([query] * len(documents), documents, truncation="only_second",
                                 max_length=self.spec.max_length)
        return encoded["input_ids"]
