"""Tokenization for the embed and rerank engines, as the Triton BLS models run it.

The engines take token ids only (``input_ids`` and ``attention_mask``, int32 ``[B, L]``), exactly like their
TensorRT plans will, so everything that turns text into ids lives here: the Qwen3-Embedding instruct prefix and
appended end-of-text, the Qwen3-Reranker yes/no prompt, BERT's ``[CLS] ... [SEP]`` for the demo models. The
facts come from the engine folder's ``engine.json`` (:mod:`ragstack.governance.engine_spec`) and tokenizer, so the BLS side
and the engine cannot disagree. Pure Python plus the Rust `tokenizers` library: neither torch nor transformers
is imported (tests/unit/test_lean_imports.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ragstack.governance.engine_spec import EngineSpec
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.fast_tokenizer import shared_tokenizer

INPUT_TYPES = ("query", "document")

# Batches are padded to a multiple of this many tokens: requests of similar length then share a shape, which
# Triton's dynamic batcher needs in order to put them into one batch.
PAD_MULTIPLE = 16

QWEN3_RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANK_BODY = "<Instruct>: {task}\n<Query>: {query}\n<Document>: {doc}"
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


class RerankTokenizer:
    """(query, document) pairs to token ids for a rerank engine folder, per its ``scoring``."""

    def __init__(self, engine_dir: Path):
        self.spec, self.tokenizer = load_tokenizer(engine_dir, "rerank")
        if self.spec.scoring == "qwen3_yes_no":
            self.prefix_ids = self._ids(QWEN3_RERANK_PREFIX)
            self.suffix_ids = self._ids(QWEN3_RERANK_SUFFIX)
            self.body_budget = self.spec.max_length - len(self.prefix_ids) - len(self.suffix_ids)
            if self.body_budget < 1:
                raise ValueError(f"{engine_dir}: max_length {self.spec.max_length} leaves no room for the "
                                 "reranker prompt's body")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pairs(self, query: str, documents: list[str], task: Optional[str] = None):
        """``(input_ids, attention_mask)``, int32 ``[len(documents), L]``: one row per (query, document)."""
        check_text(query, "query")
        documents = check_text_list(documents, "documents")
        if self.spec.scoring == "qwen3_yes_no":
            rows = self._qwen3_rows(query, documents, task)
        else:
            rows = self._bert_pair_rows(query, documents)
        return pad_batch(rows, self.tokenizer.pad_token_id, self.spec.padding_side, self.spec.max_length)

    def _qwen3_rows(self, query: str, documents: list[str], task: Optional[str]) -> list[list[int]]:
        """Qwen3-Reranker's prompt. The three parts are tokenized separately so that truncation can cut the
        body alone: the prefix (the judging instruction) and the suffix (the assistant turn whose next token is
        scored as yes/no) always survive, however long the document."""
        task = resolve_task(task, self.spec)
        bodies = [QWEN3_RERANK_BODY.format(task=task, query=query, doc=doc) for doc in documents]
        return [self.prefix_ids + body[:self.body_budget] + self.suffix_ids
                for body in self.tokenizer(bodies, add_special_tokens=False)["input_ids"]]

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
