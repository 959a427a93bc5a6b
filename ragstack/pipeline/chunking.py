"""Token-aware chunking of plain text and Markdown for ingestion.

A chunk is what the embed engine sees as one document, so its size is measured in the engine's tokens, not in
characters: :func:`chunk_text` tokenizes the document once (with character offsets), slides a window of
``max_tokens`` over the tokens and cuts each window where the text has a natural break. Cutting positions are
token boundaries mapped back to characters through the offsets, which is what keeps every chunk an exact
substring of the document (``document[chunk.start:chunk.end] == chunk.text``) and never splits a character:
byte-level BPE spreads a multi-byte character over several tokens that all carry the same offsets, and a boundary
between two such tokens is simply not a place where a cut may happen.

Where to cut: within the last :data:`LOOKBACK` of the window, the strongest boundary wins (a Markdown heading,
then a paragraph break, a sentence end, a line break, a space), the latest of equally strong ones so that chunks
stay full; with none of them there, the cut is at the window's last token. Consecutive chunks overlap by about
``overlap_tokens``: the next window starts that many tokens before the cut, moved (by at most a quarter of the
overlap) to the strongest boundary nearby so that it does not begin mid-word. A heading is never cut from the
text under it: the breaks in and right after a heading line do not count.

Everything is deterministic: the same text, tokenizer and parameters give the same chunks.
"""
from __future__ import annotations

import math
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ragstack.contracts.errors import InvalidInput

MIN_MAX_TOKENS = 8
# The fraction of the window, at its end, in which a natural boundary is preferred to a plain token boundary.
LOOKBACK = 0.25

# Boundary strengths; 0 is a plain token boundary.
WORD, LINE, SENTENCE, PARAGRAPH, HEADING = 1, 2, 3, 4, 5

# Each match's end is where the next unit starts, after the separating whitespace: a tokenizer usually glues
# that whitespace to the following word (" The"), so the cut snaps back to the token that carries it.
_BREAKS = (
    (PARAGRAPH, re.compile(r"\n[ \t]*\n\s*")),
    (LINE, re.compile(r"\n\s*")),
    (SENTENCE, re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]\s*")),
    (WORD, re.compile(r"\s+")),
)
_SPACE = re.compile(r"\s*")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")


@dataclass(frozen=True)
class Chunk:
    """One chunk: ``text`` is ``document[start:end]``; ``token_count`` is measured as the budget is (see
    :func:`chunk_text`); ``metadata`` holds ``heading_path`` ("# A > ## B", "" before the first heading) for
    Markdown."""
    index: int
    text: str
    start: int
    end: int
    token_count: int
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The record a :class:`ragstack.index.VectorStore` takes for this chunk."""
        return {"text": self.text, "metadata": dict(self.metadata), "start": self.start, "end": self.end,
                "token_count": self.token_count}


def chunk_text(text: str, tokenizer, max_tokens: int, overlap_tokens: int = 0,
               markdown: Optional[bool] = None) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens, overlapping by about ``overlap_tokens``.

    ``tokenizer`` is a :class:`ragstack.tokenization.retrieval.EmbedTokenizer` or a Hugging Face fast tokenizer. With an
    EmbedTokenizer a chunk's token count is :meth:`~ragstack.tokenization.retrieval.EmbedTokenizer.count_tokens` (what the engine
    sees, special tokens included), and ``max_tokens`` may not exceed the engine's ``max_length``, since the
    engine would truncate the chunks; with a bare tokenizer it is the chunk's own tokens.
    ``markdown``: None detects it (an ATX heading outside code fences); True/False forces it.
    Raises InvalidInput for a blank document, ``max_tokens`` < 8 or ``overlap_tokens`` not in [0, max_tokens).
    """
    _check_args(text, tokenizer, max_tokens, overlap_tokens)
    hf_tokenizer, count_tokens, reserved = _token_counter(tokenizer)
    offsets = hf_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                           verbose=False)["offset_mapping"]  # no "longer than max length" warning: we cut it
    if not offsets:
        raise InvalidInput("document has no tokens")
    headings = _markdown_headings(text) if markdown is not False else []
    is_markdown = bool(headings) if markdown is None else markdown
    cuts = _Cuts(text, offsets, headings)
    spans = _window_spans(cuts, max_tokens - reserved, overlap_tokens, max_tokens, count_tokens)
    paths = _heading_paths(headings)
    path_starts = [pos for pos, _ in paths]
    chunks = []
    for start, end, n_tokens in spans:
        metadata = {}
        if is_markdown:
            i = bisect_right(path_starts, start) - 1
            metadata["heading_path"] = paths[i][1] if i >= 0 else ""
        chunks.append(Chunk(len(chunks), text[start:end], start, end, n_tokens, metadata))
    return chunks


def _check_args(text, tokenizer, max_tokens, overlap_tokens) -> None:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("document is empty" if isinstance(text, str)
                           else f"document must be a string, got {type(text).__name__}")
    if not _is_int(max_tokens) or max_tokens < MIN_MAX_TOKENS:
        raise InvalidInput(f"max_tokens must be an integer >= {MIN_MAX_TOKENS}, got {max_tokens!r}")
    if not _is_int(overlap_tokens) or not 0 <= overlap_tokens < max_tokens:
        raise InvalidInput(f"overlap_tokens must be an integer in [0, max_tokens={max_tokens}), "
                           f"got {overlap_tokens!r}")
    spec = getattr(tokenizer, "spec", None)
    if spec is not None and max_tokens > spec.max_length:
        raise InvalidInput(f"max_tokens {max_tokens} exceeds the engine's max_length {spec.max_length}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _token_counter(tokenizer) -> tuple[object, Callable[[str], int], int]:
    """``(hf_tokenizer, count, reserved)``: the tokenizer that gives offsets, the token count a chunk is held
    to, and how many of those tokens are special tokens around the text (so not available to it)."""
    if hasattr(tokenizer, "count_tokens") and hasattr(tokenizer, "tokenizer"):
        hf_tokenizer = tokenizer.tokenizer

        def count(chunk: str) -> int:
            return tokenizer.count_tokens(chunk, "document")
    else:
        hf_tokenizer = tokenizer

        def count(chunk: str) -> int:
            return len(hf_tokenizer(chunk, add_special_tokens=False)["input_ids"])
    if not getattr(hf_tokenizer, "is_fast", False):
        raise TypeError("chunk_text needs a fast (Rust) tokenizer: it relies on offset mappings")
    probe = "a"
    reserved = count(probe) - len(hf_tokenizer(probe, add_special_tokens=False)["input_ids"])
    return hf_tokenizer, count, reserved


class _Cuts:
    """The token boundaries of a document: where a cut may go (``valid``), the character it maps to
    (``char``) and how good a place it is (``strength``), each indexed by boundary k = 0..n (before token k)."""

    def __init__(self, text: str, offsets, headings):
        n = len(offsets)
        self.n = n
        self.text = text
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        ends = np.array([e for _, e in offsets], dtype=np.int64)
        self.char = np.append(starts, len(text))
        self.valid = np.ones(n + 1, dtype=bool)
        # Tokens that share a character (the bytes of one UTF-8 character) must stay together.
        self.valid[1:n] = ends[:-1] <= starts[1:]
        self.valid_ks = np.nonzero(self.valid)[0]
        self.strength = np.zeros(n + 1, dtype=np.int8)
        positions, levels = _break_positions(text, headings)
        if positions:
            # A break position inside a token snaps back to that token's start.
            valid_chars = self.char[self.valid_ks]
            idx = np.searchsorted(valid_chars, np.array(positions), side="right") - 1
            keep = idx >= 0
            np.maximum.at(self.strength, self.valid_ks[idx[keep]], np.array(levels, dtype=np.int8)[keep])
        self.strength[0] = 0

    def best(self, lo: int, hi: int) -> Optional[int]:
        """The strongest valid boundary in [lo, hi], the latest of equals; None if there is none."""
        ks = self.valid_ks[(self.valid_ks >= lo) & (self.valid_ks <= hi)]
        if not len(ks):
            return None
        strengths = self.strength[ks]
        candidates = ks[strengths == strengths.max()]
        return int(candidates[-1])

    def previous(self, k: int) -> int:
        """The valid boundary before k (-1 if none)."""
        i = np.searchsorted(self.valid_ks, k, side="left") - 1
        return int(self.valid_ks[i]) if i >= 0 else -1

    def following(self, k: int) -> int:
        """The first valid boundary after k (boundary n always is one)."""
        return int(self.valid_ks[np.searchsorted(self.valid_ks, k, side="right")])


def _break_positions(text: str, headings) -> tuple[list[int], list[int]]:
    """Character positions where a unit (heading, paragraph, sentence, line, word) starts, with strengths.

    Breaks inside a heading line and right after it are left out: a heading belongs with the text it
    introduces, so a chunk should never end with it."""
    held = [(pos, _SPACE.match(text, eol).end()) for pos, _, _, eol in headings]
    held_starts = [start for start, _ in held]
    positions, levels = [], []
    for level, pattern in _BREAKS:
        for m in pattern.finditer(text):
            i = bisect_right(held_starts, m.end() - 1) - 1
            if i < 0 or m.end() > held[i][1]:
                positions.append(m.end())
                levels.append(level)
    positions.extend(held_starts)
    levels.extend([HEADING] * len(held_starts))
    return positions, levels


def _window_spans(cuts: _Cuts, budget: int, overlap: int, max_tokens: int,
                  count_tokens: Callable[[str], int]) -> list[tuple[int, int, int]]:
    """``(char_start, char_end, token_count)`` of each chunk, whitespace at both ends left out; starts and ends
    strictly increase, so no chunk is contained in another."""
    spans = []
    begin, last_end = 0, 0                      # token boundaries: this window's start, the last window's end
    while True:
        end = _pick_end(cuts, begin, budget, last_end)
        end, span = _fit(cuts, begin, end, max_tokens, count_tokens)
        if span is not None and (not spans or span[1] > spans[-1][1]):
            if spans and span[0] <= spans[-1][0]:
                spans.pop()     # same start once whitespace is stripped (a huge overlap): this one extends it
            spans.append(span)
        if end >= cuts.n:
            break
        begin, last_end = _pick_next_begin(cuts, begin, end, overlap), end
    if not spans:
        raise InvalidInput("document is empty")
    return spans


def _pick_end(cuts: _Cuts, begin: int, budget: int, last_end: int) -> int:
    """Where the window starting at ``begin`` ends: its last token when it reaches the end of the document,
    else the strongest boundary in its last quarter (never at or before the previous window's end, so that
    every chunk brings new text)."""
    hard_end = begin + budget
    if hard_end >= cuts.n:
        return cuts.n
    lo = max(begin + math.ceil((1 - LOOKBACK) * budget), last_end + 1)
    end = cuts.best(lo, hard_end)
    if end is None:
        end = cuts.previous(hard_end + 1)
        if end <= begin:
            end = cuts.following(begin)
    return end


def _fit(cuts: _Cuts, begin: int, end: int, max_tokens: int, count_tokens: Callable[[str], int]):
    """Shrink [begin, end) until the chunk's text, tokenized on its own, fits ``max_tokens``.

    Token counts of a substring can differ from the tokens it spanned in the whole document (merges across the
    cut no longer happen), so the budget is checked on the text itself. Returns ``(end, span)``, span None for
    a window of whitespace only."""
    text = cuts.text
    while True:
        start, stop = int(cuts.char[begin]), int(cuts.char[end])
        piece = text[start:stop]
        stripped = piece.strip()
        if not stripped:
            return end, None
        start += len(piece) - len(piece.lstrip())
        stop = start + len(stripped)
        n_tokens = count_tokens(stripped)
        if n_tokens <= max_tokens:
            return end, (start, stop, n_tokens)
        shorter = cuts.previous(end)
        if shorter <= begin:
            raise RuntimeError(f"cannot fit the text at characters {start}:{stop} into {max_tokens} tokens")
        end = shorter


def _pick_next_begin(cuts: _Cuts, begin: int, end: int, overlap: int) -> int:
    """Start of the next window: ``overlap`` tokens before ``end``, moved by at most a quarter of the overlap
    either way to the strongest boundary there (so the chunk starts at a word, sentence or paragraph rather
    than mid-word), and always after ``begin``."""
    if overlap == 0:
        return end
    target = max(end - overlap, begin + 1)
    slack = overlap // 4
    nxt = cuts.best(max(target - slack, begin + 1), min(target + slack, end))
    if nxt is not None and cuts.strength[nxt] > 0:
        return nxt
    return cuts.following(target - 1)


def _markdown_headings(text: str) -> list[tuple[int, int, str, int]]:
    """``(char_pos, level, title, line_end)`` of each ATX heading ("## Title"), skipping fenced code blocks,
    where a ``#`` line is a comment, not a heading. (Setext headings, underlined with === or ---, are not
    detected.)"""
    headings = []
    fence = None                                  # the opening fence's character and length while inside one
    pos = 0
    for line in text.split("\n"):
        bare = line.rstrip("\r")
        m = _FENCE.match(bare)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not bare[m.end():].strip():
                fence = None
        elif m:
            fence = (m.group(1)[0], len(m.group(1)))
        else:
            h = _ATX_HEADING.match(bare)
            if h:
                headings.append((pos, len(h.group(1)), (h.group(2) or "").strip(), pos + len(line)))
        pos += len(line) + 1
    return headings


def _heading_paths(headings) -> list[tuple[int, str]]:
    """``(char_pos, "# A > ## B")`` per heading: the heading with its enclosing (lower-level) headings."""
    stack: list[tuple[int, str]] = []
    paths = []
    for pos, level, title, _ in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, f"{'#' * level} {title}".rstrip()))
        paths.append((pos, " > ".join(label for _, label in stack)))
    return paths
