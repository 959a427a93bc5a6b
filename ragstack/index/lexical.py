"""Lexical retrieval and rank fusion: the "hybrid" half of search.

A dense embedding ranks by meaning, and a small one misses a chunk whose words match the question but whose
embedding sits elsewhere (a table row "SEV1 | ... | 5 minutes" for "how fast must I respond to a SEV1 alert").
Hybrid search ranks the collection both ways and fuses the two rankings before the reranker sees them.

* :class:`Bm25Index`: Okapi BM25 over chunk texts, kept incrementally (``add`` / ``remove`` per row), so the
  flat-file store updates it with every upsert and delete. Score of a row for a query of terms ``t``::

      sum_t  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * len(d) / avg_len))
      idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))          (never negative)

  ``N`` live rows, ``df`` rows holding ``t``, ``len`` a row's term count; a query term counts once.
* :func:`tokenize`: lower-cased word tokens (letters and digits), English stop words dropped, a plural "s"
  stripped. The pgvector store uses Postgres full-text search instead (``to_tsvector('english')``, stemmed);
  the two agree on ranks, not on score values.
* :func:`rrf` (reciprocal rank fusion, the default) and :func:`weighted` (a weighted sum of min-max-normalised
  scores) combine ranked lists. RRF uses only ranks, so it fuses cosine and BM25 (or ts_rank_cd) without
  calibrating one against the other, and both stores fuse the same way.
* :class:`SearchSpec`: what a search asks for (mode, fusion, depth of each list), checked once; the runtime
  policy holds one per task and the vector_index model receives it with the query text.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Mapping, Optional, Sequence

from ragstack.contracts.errors import InvalidInput

SEARCH_MODES = ("dense", "hybrid", "lexical")
FUSIONS = ("rrf", "weighted")
K1, B = 1.2, 0.75
RRF_K = 60

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Function words that carry no topic (a fixed list: English is what the corpora here are written in), and the
# pieces an apostrophe leaves ("visitor's" -> "visitor", "s").
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not of off on once
only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves s t d ll m re ve
""".split())


def _stem(word: str) -> str:
    """A plural "s" off ("alerts" -> "alert", "days" -> "day"); "ss", "us", "is" endings and short words stay."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """The terms of ``text`` for BM25, in order (repeats kept: they are the term frequencies)."""
    return [_stem(w) for w in (m.group(0).lower() for m in _WORD.finditer(text or "")) if w not in STOP_WORDS]


class Bm25Index:
    """BM25 over rows (int keys) of texts; ``add``/``remove`` keep it current. Not thread-safe by itself: the
    owner serialises mutations and searches (the flat store does both under its state lock)."""

    def __init__(self, k1: float = K1, b: float = B):
        self.k1, self.b = float(k1), float(b)
        self.postings: dict[str, dict[int, int]] = {}     # term -> {row: term frequency}
        self.lengths: dict[int, int] = {}                  # row -> term count
        self.total_length = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, row: int, text: str) -> None:
        if row in self.lengths:
            self.remove(row)
        terms = tokenize(text)
        self.lengths[row] = len(terms)
        self.total_length += len(terms)
        counts: dict[str, int] = {}
        for t in terms:
            counts[t] = counts.get(t, 0) + 1
        for t, n in counts.items():
            self.postings.setdefault(t, {})[row] = n

    def remove(self, row: int, text: Optional[str] = None) -> None:
        """Drop ``row``; its ``text`` (when given) names the postings to visit, else every term is checked."""
        length = self.lengths.pop(row, None)
        if length is None:
            return
        self.total_length -= length
        terms = set(tokenize(text)) if text is not None else list(self.postings)
        for t in terms:
            rows = self.postings.get(t)
            if rows is not None and rows.pop(row, None) is not None and not rows:
                del self.postings[t]

    def idf(self, term: str) -> float:
        n, df = len(self.lengths), len(self.postings.get(term, ()))
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def scores(self, query: str, rows: Optional[Iterable[int]] = None) -> dict[int, float]:
        """``{row: score}`` for the rows that hold at least one query term (others score 0 and are left out),
        optionally only among ``rows``."""
        if not self.lengths:
            return {}
        allowed = None if rows is None else set(rows)
        avg = self.total_length / len(self.lengths) or 1.0
        out: dict[int, float] = {}
        for term in dict.fromkeys(tokenize(query)):
            postings = self.postings.get(term)
            if not postings:
                continue
            idf = self.idf(term)
            for row, tf in postings.items():
                if allowed is not None and row not in allowed:
                    continue
                norm = self.k1 * (1.0 - self.b + self.b * self.lengths[row] / avg)
                out[row] = out.get(row, 0.0) + idf * tf * (self.k1 + 1.0) / (tf + norm)
        return out


def rank(scores: Mapping, key=None, limit: Optional[int] = None) -> list:
    """Keys of ``scores`` best first; ties by ``key(k)`` ascending (the chunk id for the stores)."""
    order = sorted(scores, key=lambda k: (-scores[k], key(k) if key else k))
    return order if limit is None else order[:limit]


def rrf(rankings: Sequence[Sequence], k: int = RRF_K, weights: Optional[Sequence[float]] = None) -> dict:
    """Reciprocal rank fusion: ``{item: sum_i w_i / (k + rank_i(item))}``, ranks from 1; an item missing from a
    list gets nothing from it."""
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    fused: dict = {}
    for ranking, w in zip(rankings, weights):
        for r, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + w / (k + r)
    return fused


def minmax(scores: Mapping) -> dict:
    """Scores mapped onto [0, 1] (all equal: all 1)."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    return {k: 1.0 if hi == lo else (v - lo) / (hi - lo) for k, v in scores.items()}


def weighted(score_maps: Sequence[Mapping], weights: Sequence[float]) -> dict:
    """``{item: sum_i w_i * minmax(scores_i)[item]}`` (an item missing from a map gets 0 from it)."""
    fused: dict = {}
    for scores, w in zip(score_maps, weights):
        for item, v in minmax(scores).items():
            fused[item] = fused.get(item, 0.0) + w * v
    return fused


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """How a search ranks: ``mode`` dense (cosine only), lexical (BM25 / full-text only) or hybrid (both,
    fused by ``fusion``); ``depth``: how many of each list are fused (at least the search's top_k);
    ``lexical_weight``: the lexical list's weight (the dense list's is 1); ``rrf_k``: RRF's constant."""
    mode: str = "dense"
    fusion: str = "rrf"
    depth: int = 50
    rrf_k: int = RRF_K
    lexical_weight: float = 1.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, value) -> "SearchSpec":
        """A spec from a dict (policy file, request payload), a mode name, or None (dense); InvalidInput when
        a field is unknown or out of range."""
        if value is None:
            return cls()
        if isinstance(value, SearchSpec):
            return value
        if isinstance(value, str):
            value = {"mode": value}
        if not isinstance(value, Mapping):
            raise InvalidInput(f"search must be an object or a mode name, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidInput(f"search: unknown field(s) {', '.join(unknown)}")
        spec = cls(**value)
        if spec.mode not in SEARCH_MODES:
            raise InvalidInput(f"search.mode must be one of {', '.join(SEARCH_MODES)}, got {spec.mode!r}")
        if spec.fusion not in FUSIONS:
            raise InvalidInput(f"search.fusion must be one of {', '.join(FUSIONS)}, got {spec.fusion!r}")
        for name, low, high in (("depth", 1, 1000), ("rrf_k", 0, 10_000)):
            v = getattr(spec, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise InvalidInput(f"search.{name} must be an integer in [{low}, {high}], got {v!r}")
        w = spec.lexical_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 100.0:
            raise InvalidInput(f"search.lexical_weight must be a number in [0, 100], got {w!r}")
        return dataclasses.replace(spec, lexical_weight=float(w))


def fuse(dense: Mapping, lexical: Mapping, spec: SearchSpec, top_k: int, key=None) -> list:
    """The ``top_k`` items of a hybrid search, best first: ``dense`` and ``lexical`` are ``{item: score}`` (each
    already cut to the spec's depth), fused by the spec's method; ties by ``key(item)`` ascending. Returns
    ``[(item, fused score)]``."""
    if spec.fusion == "rrf":
        fused = rrf([rank(dense, key), rank(lexical, key)], spec.rrf_k, [1.0, spec.lexical_weight])
    else:
        fused = weighted([dense, lexical], [1.0, spec.lexical_weight])
    return [(item, fused[item]) for item in rank(fused, key, top_k)]
