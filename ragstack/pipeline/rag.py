"""The RAG pipeline as plain Python: validate → embed query → search → rerank → prompt → guided generate → check.

Every engine call is an injected callable (the Triton model wires BLS calls; tests wire fakes or in-process
engines), so the orchestration logic — what is validated, what goes in the prompt, which schema constrains the
answer, how citations are checked, what is timed — is one piece of code whichever engines serve it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import time
from typing import Any, Callable, List, NotRequired, Optional, Protocol, Sequence, Tuple, TypedDict

from ragstack.contracts import json_input
from ragstack.contracts.errors import InvalidInput

TASKS = ("answer", "generate_json", "rank_candidates", "judge", "quote")
GROUNDED_TASKS = ("answer", "quote")   # tasks that abstain below the reranker threshold and report citation support
NOT_IN_DOCUMENTS = "The documents do not contain the answer to this question."
MAX_QUOTES = 2
MAX_TOP_K = 100
MAX_DOCUMENTS = 64
MAX_DOCUMENT_CHARS = 20_000
ANSWER_MAX_CHARS = 600
# Request limits (issue 16): each breach is the caller's INVALID_ARG.
MAX_QUERY_CHARS = 32_000               # the prompt-token budget then applies (policy)
MAX_SCHEMA_CHARS = 32_000
MAX_SCHEMA_DEPTH = 32                 # JSON nesting: a schema level takes two (properties -> name -> schema)
STAGES = ("tokenize", "embed", "search", "rerank", "generate")


@dataclasses.dataclass
class Context:
    """One context shown to the generator. ``id`` is its label in the prompt and in citations (ctx-1, ctx-2,
    … in final order): labels that depend only on the count keep the answer schema — and so the compiled
    grammar — the same across requests, and the generator cannot tell chunk ids apart anyway."""
    text: str
    doc_id: str
    chunk_id: str
    score: float                      # retrieval score (cosine); caller documents: 0
    rerank_score: Optional[float] = None
    metadata: dict = dataclasses.field(default_factory=dict)
    id: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"id": d.pop("id"), **d}

    @classmethod
    def of_hit(cls, hit: dict) -> "Context":
        """A search hit of the vector store (``VectorStore.search``, vector_index's ``hits``)."""
        return cls(text=hit["text"], doc_id=hit["doc_id"], chunk_id=hit["chunk_id"], score=float(hit["score"]),
                   metadata=hit.get("metadata") or {})


@dataclasses.dataclass
class RagRequest:
    query: str
    task: str = "answer"
    schema: Optional[dict] = None     # the caller's JSON Schema (generate_json; optional for answer)
    documents: Optional[list] = None  # caller-supplied contexts: the index is bypassed
    top_k: int = 8
    top_n: int = 3
    max_tokens: Optional[int] = None  # None: the task policy's
    collection: str = "default"


def parse_caller_documents(values) -> list:
    """Caller documents: each a plain string, or a JSON object {"id", "text", "metadata"}."""
    if len(values) > MAX_DOCUMENTS:
        raise InvalidInput(f"at most {MAX_DOCUMENTS} documents per request, got {len(values)}")
    docs = []
    for i, value in enumerate(values):
        doc = {"id": f"doc-{i + 1}", "text": value, "metadata": {}}
        stripped = value.strip()
        if stripped.startswith("{"):
            obj = json_input.loads(stripped, f"documents[{i}] (text that starts with '{{')")
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InvalidInput(f"documents[{i}] as JSON must be an object with a string 'text'")
            doc = {"id": str(obj.get("id") or doc["id"]), "text": obj["text"], "metadata": obj.get("metadata") or {}}
        if not doc["text"].strip():
            raise InvalidInput(f"documents[{i}] is empty")
        if len(doc["text"]) > MAX_DOCUMENT_CHARS:
            raise InvalidInput(f"documents[{i}] is {len(doc['text'])} characters; the limit is "
                               f"{MAX_DOCUMENT_CHARS} (ingest long documents instead: they are chunked)")
        docs.append(doc)
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise InvalidInput("documents have duplicate ids")
    return docs


def parse_schema(text: Optional[str]) -> Optional[dict]:
    if text is None or not text.strip():
        return None
    if json_input.json_depth_exceeds(text, MAX_SCHEMA_DEPTH):
        raise InvalidInput(f"schema nests JSON deeper than {MAX_SCHEMA_DEPTH} levels")
    if len(text) > MAX_SCHEMA_CHARS:
        raise InvalidInput(f"schema is {len(text)} characters; the limit is {MAX_SCHEMA_CHARS}")
    schema = json_input.loads(text, "schema", expect=dict, max_depth=MAX_SCHEMA_DEPTH)
    import jsonschema

    try:
        _validator(json.dumps(schema, sort_keys=True))
    except jsonschema.SchemaError as e:
        raise InvalidInput(f"schema is not a valid JSON Schema: {e.message}") from None
    return schema


@functools.lru_cache(maxsize=256)
def _validator(canonical_schema: str):
    """A checked validator per schema (canonical JSON text), for the draft its ``$schema`` names (2020-12 by
    default). Checking a schema against its meta-schema costs about a millisecond; requests mostly reuse a
    handful of schemas (the answer schema per context count and max_tokens, callers' own), so it is done once
    per schema."""
    import jsonschema

    schema = json.loads(canonical_schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def validate_rag_request(req: RagRequest) -> RagRequest:
    """What the pipeline itself needs; sampling limits (max_tokens per task) are the policy's to check."""
    if not isinstance(req.query, str) or not req.query.strip():
        raise InvalidInput("query is empty")
    if len(req.query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"query is {len(req.query)} characters; the limit is {MAX_QUERY_CHARS}")
    if req.task not in TASKS:
        raise InvalidInput(f"unknown task {req.task!r}; expected one of {', '.join(TASKS)}")
    if not 1 <= req.top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {req.top_k}")
    if not 1 <= req.top_n <= req.top_k:
        raise InvalidInput(f"top_n must be between 1 and top_k ({req.top_k}), got {req.top_n}")
    if req.task == "generate_json" and req.schema is None:
        raise InvalidInput("task generate_json needs a schema")
    if req.task == "rank_candidates" and not req.documents:
        raise InvalidInput("task rank_candidates needs caller-supplied documents (the candidates)")
    return req


def text_budget(max_tokens: int, n_contexts: int) -> int:
    """Characters allowed in the answer's free-text field: what fits in max_tokens at two tokens per character
    (most text packs several characters into one token; a non-ASCII character can take two or more) after the
    JSON around it (about 24 tokens) and the citations (about 8 per context), capped at ANSWER_MAX_CHARS. Text
    that still runs out of tokens is reported as such, never returned cut."""
    return max(16, min(ANSWER_MAX_CHARS, (max_tokens - 24 - 8 * n_contexts) // 2))


def answer_schema(task: str, context_ids: list, caller_schema: Optional[dict], max_tokens: int = 256,
                  max_quotes: int = MAX_QUOTES) -> dict:
    """The JSON Schema the answer is decoded under. Citations are an enum of the given context ids, so the
    model cannot cite a context it was not shown; strings are bounded so decoding terminates within budget."""
    if caller_schema is not None:
        return caller_schema
    chars = text_budget(max_tokens, len(context_ids))
    cite = {"type": "array", "items": {"enum": context_ids}, "maxItems": max(1, len(context_ids))}
    if task == "quote":
        return {"type": "object", "properties": {"quotes": {
            "type": "array", "minItems": 1, "maxItems": max_quotes, "items": {
                "type": "object", "properties": {"context": {"enum": context_ids}, "text": {"type": "string"}},
                "required": ["context", "text"], "additionalProperties": False}}},
            "required": ["quotes"], "additionalProperties": False}
    if task == "rank_candidates":
        return {"type": "object", "properties": {"ranking": {**cite, "minItems": 1}},
                "required": ["ranking"], "additionalProperties": False}
    if task == "judge":
        return {"type": "object", "properties": {
            "verdict": {"enum": ["supported", "not_supported", "partially_supported"]},
            "reason": {"type": "string", "maxLength": chars}, "citations": cite},
            "required": ["verdict", "reason", "citations"], "additionalProperties": False}
    if context_ids:   # an answer over contexts must say which one supports it
        cite = {**cite, "minItems": 1}
    return {"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": chars}, "citations": cite},
        "required": ["answer", "citations"], "additionalProperties": False}


# ---- the quote task: verbatim spans of the contexts -------------------------------------------------------------
# A chunk is read as Markdown blocks: headings (not quotable; they label what follows), pipe-table rows, list
# items (with their wrapped continuation lines) and paragraphs. A quote is a table row, a list item, or one
# sentence of a paragraph (or of a list item too long to quote whole) — always a verbatim substring of the
# chunk, wrapped lines included. What the reranker scores is the span's *label*: the span with its section
# heading, and a table row as "header: cell" pairs, so "SEV1 | … | 5 minutes" is scored as what it says.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_CLAUSE_BREAK = re.compile(r"(?<=[;:])\s+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d{1,3}[.)])\s+(?:\[[ xX]\]\s+)?")
_EMPHASIS = re.compile(r"\*\*|__|`")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
QUOTE_MIN_CHARS = 12
QUOTE_MAX_CHARS = 240


@dataclasses.dataclass(frozen=True)
class QuoteUnit:
    text: str        # verbatim substring of the context: what a quote may be
    label: str       # what the reranker scores: the text with its heading / table header, whitespace folded


def _fold(s: str) -> str:
    return " ".join(s.split())


def _cells(row: str) -> list:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _sentences(text: str) -> list:
    """Verbatim sentences of ``text`` (clauses of one longer than QUOTE_MAX_CHARS, cut at a word at worst)."""
    out = []
    for sentence in _SENTENCE_END.split(text):
        pieces = [sentence] if len(sentence) <= QUOTE_MAX_CHARS else _CLAUSE_BREAK.split(sentence)
        for piece in pieces:
            piece = piece.strip()
            if len(piece) > QUOTE_MAX_CHARS:
                piece = piece[:QUOTE_MAX_CHARS].rsplit(" ", 1)[0]
            out.append(piece)
    return out


def quote_units(text: str, heading_path: str = "") -> list:
    """The quotable units of one context (see above), in order, each once. ``heading_path`` (the chunk's
    metadata, "# A > ## B") labels the spans before the chunk's first heading of its own."""
    lines = text.split("\n")
    blocks = []                  # (kind, verbatim text, heading, table header cells or None)
    heading = heading_path.rsplit(">", 1)[-1].strip().lstrip("#").strip() if heading_path else ""
    header, current = None, None

    def close():
        nonlocal current
        if current is not None:
            blocks.append((current[0], "\n".join(current[1]), heading, None))
        current = None

    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            close()
            header = None
            continue
        m = _HEADING.match(line)
        if m:
            close()
            heading, header = m.group(1), None
            continue
        if stripped.startswith("|"):
            close()
            if _TABLE_RULE.match(stripped):
                continue
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if header is None and _TABLE_RULE.match(nxt):
                header = _cells(stripped)           # the header row labels the rows below it
                continue
            row = stripped.strip("|").strip()
            cells = _cells(stripped)
            pairs = "; ".join(f"{h}: {c}" for h, c in zip(header, cells)) if header else " | ".join(cells)
            blocks.append(("row", row, heading, pairs))
            continue
        m = _LIST_ITEM.match(line)
        if m:
            close()
            current = ["item", [line[m.end():].rstrip()]]
        elif current is None:
            current = ["para", [line.strip()]]
        else:
            current[1].append(line.rstrip())
    close()

    units, seen = [], set()
    for n, (kind, body, head, pairs) in enumerate(blocks):
        if kind == "row":
            texts = [(body, pairs)]
        elif kind == "item" and len(body) <= QUOTE_MAX_CHARS:
            texts = [(body.strip(), None)]
        else:
            texts = [(s, None) for s in _sentences(body)]
            if n == 0 and kind == "para" and text[:1].islower():
                texts = texts[1:]      # the chunk starts inside a sentence: its tail is no sentence of its own
        for span, label in texts:
            if len(span) < QUOTE_MIN_CHARS or span in seen or span not in text:
                continue
            seen.add(span)
            label = _fold(_EMPHASIS.sub("", label or span))
            units.append(QuoteUnit(span, f"{head}: {label}" if head else label))
    return units


def quote_spans(text: str) -> list:
    """The verbatim spans a quote may be (:func:`quote_units`' texts)."""
    return [u.text for u in quote_units(text)]


def _ebnf_literal(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@functools.lru_cache(maxsize=256)
def _quote_grammar(spans_per_context: tuple, max_quotes: int) -> str:
    rules = []
    for n, (ctx_id, spans) in enumerate(spans_per_context, 1):
        head = json.dumps({"context": ctx_id, "text": ""})[:-3]       # '{"context": "ctx-1", "text": '
        texts = " | ".join(_ebnf_literal(json.dumps(s, ensure_ascii=False)) for s in spans)
        close = _ebnf_literal("}")
        rules.append(f"q{n} ::= {_ebnf_literal(head)} ({texts}) {close}")
    quote = " | ".join(f"q{n}" for n in range(1, len(spans_per_context) + 1))
    sep, opening, closing = _ebnf_literal(", "), _ebnf_literal('{"quotes": ['), _ebnf_literal("]}")
    more = " ".join(f"({sep} quote)?" for _ in range(max_quotes - 1))
    return "\n".join([f"root ::= {opening} quote {more} {closing}", f"quote ::= {quote}", *rules])


QUOTE_CANDIDATES = 4


def quote_candidates(query: str, contexts: list, engines: "Engines", timer, limit: int = QUOTE_CANDIDATES) -> list:
    """The spans a quote may choose from: every context's :func:`quote_units` (a span that two overlapping
    chunks share counted once, for the better-ranked one), their labels scored against the query by the
    reranker (one batched call), best ``limit`` kept, as contexts of one span each (same ids), best first."""
    pairs, seen = [], set()
    for c in contexts:
        path = (c.metadata or {}).get("heading_path")
        for unit in quote_units(c.text, path if isinstance(path, str) else ""):
            if unit.text not in seen:
                seen.add(unit.text)
                pairs.append((c, unit))
    if not pairs:
        return []
    with timer.stage("rerank"):
        scores = engines.rerank(query, [unit.label for _, unit in pairs], timer)
    # Stable sort: equal scores keep the contexts' order.
    ranked = sorted(zip(pairs, scores), key=lambda p: -float(p[1]))[:limit]
    return [dataclasses.replace(c, text=unit.text, rerank_score=float(score)) for (c, unit), score in ranked]


def quote_grammar(contexts: list, max_quotes: int = MAX_QUOTES, whole: bool = False) -> str:
    """EBNF (xgrammar's dialect) for the quote task's answer: {"quotes": [{"context": id, "text": span}, ...]}
    with 1..max_quotes quotes, each text one of :func:`quote_spans` of the context it names (``whole``: the
    context's text itself, for candidates that are one span each), JSON-encoded as json.dumps writes it. Built
    per request; the text for a given set of spans is cached here, and the generate engine caches its compiled
    grammar by that text."""
    per_context = tuple((c.id, (c.text,) if whole else tuple(quote_spans(c.text))) for c in contexts)
    return _quote_grammar(tuple(pc for pc in per_context if pc[1]), max_quotes)


def index_schema(n_candidates: int, max_quotes: int) -> dict:
    """What the generator writes when it picks candidates by number (quote_select "index")."""
    return {"type": "object", "properties": {"quotes": {
        "type": "array", "minItems": 1, "maxItems": max_quotes,
        "items": {"enum": list(range(1, n_candidates + 1))}}}, "required": ["quotes"], "additionalProperties": False}


def index_prompt(query: str, candidates: list) -> tuple:
    blocks = "\n".join(f"[{n}] {_fold(c.text)}" for n, c in enumerate(candidates, 1))
    return INSTRUCTIONS["quote_index"], f"Sentences:\n{blocks}\n\nQuestion: {query}"


def check_quotes(answer: dict, contexts: list) -> dict:
    """Every quote must be a verbatim substring of the context it cites; adds "answer" (the quotes joined,
    line breaks folded to spaces) and "citations" (the cited ids, in order) so that a quote answer reads like an
    answer-task one."""
    by_id = {c.id: c.text for c in contexts}
    for q in answer["quotes"]:
        if q["text"] not in by_id.get(q["context"], ""):
            raise RuntimeError(f"quote is not verbatim from {q['context']}: {q['text'][:80]!r}")
    answer["answer"] = " ".join(_fold(q["text"]) for q in answer["quotes"])
    answer["citations"] = list(dict.fromkeys(q["context"] for q in answer["quotes"]))
    return answer


# ---- citation support -------------------------------------------------------------------------------------------
_STOPWORDS = frozenset("""a an and are as at be by can do does for from has have how i in is it its of on or our per
that the their there this to was we what when where which who will with you your not no than then they them
each may must any all also""".split())
_TOKEN = re.compile(r"\$?\d[\d,.:]*%?|[a-z][a-z'-]*")


def key_tokens(text: str) -> set:
    """The words that carry an answer's content: lower-cased, numbers (with $ and %) kept whole, stopwords and
    one- or two-letter words dropped."""
    out = set()
    for tok in _TOKEN.findall(text.lower()):
        tok = tok.rstrip(".,:")
        if tok and (tok[0].isdigit() or tok[0] == "$" or (len(tok) > 2 and tok not in _STOPWORDS)):
            out.add(tok)
    return out


SUPPORT_MIN_OVERLAP = 0.5


def citation_support(answer_text: str, cited: list, contexts: list) -> list:
    """For each cited context: the share of the answer's key tokens it contains, and whether it supports the
    answer (at least SUPPORT_MIN_OVERLAP of them, and one of the answer's numbers when it has any)."""
    keys = key_tokens(answer_text)
    numbers = {k for k in keys if k[0].isdigit() or k[0] == "$"}
    by_id = {c.id: c for c in contexts}
    out = []
    for cid in cited:
        ctx_keys = key_tokens(by_id[cid].text) if cid in by_id else set()
        overlap = len(keys & ctx_keys) / len(keys) if keys else 0.0
        ok = overlap >= SUPPORT_MIN_OVERLAP and (not numbers or bool(numbers & ctx_keys))
        out.append({"id": cid, "overlap": round(overlap, 3), "supported": ok})
    return out


INSTRUCTIONS = {
    "answer": "Answer the question using only the numbered contexts. Reply with JSON: \"answer\" (a short "
              "answer) and \"citations\" (the ids of the contexts you used).",
    "generate_json": "Using the numbered contexts, produce JSON that follows the required schema.",
    "rank_candidates": "Rank the candidate contexts from most to least relevant to the question. Reply with "
                       "JSON: \"ranking\" (context ids, best first).",
    "judge": "Judge whether the contexts support an answer to the question. Reply with JSON: \"verdict\", "
             "\"reason\" and \"citations\".",
    "quote": "Answer the question by quoting, word for word, the sentence that answers it. Reply with JSON: "
             "\"quotes\" (each with the \"context\" id and the quoted \"text\").",
    "quote_index": "Which numbered sentence answers the question? Reply with JSON: \"quotes\" (the numbers of the "
                   "sentences that answer it, best first).",
}


def build_prompt(task: str, query: str, contexts: list) -> tuple:
    """(system, user) messages: numbered contexts, then the question."""
    blocks = "\n\n".join(f"[{c.id}] {c.text}" for c in contexts)
    user = f"Contexts:\n{blocks}\n\nQuestion: {query}" if contexts else f"Question: {query}"
    return INSTRUCTIONS[task], user


def check_answer(text: str, schema: dict, finish_reason: str, context_ids: list) -> dict:
    import jsonschema

    try:
        # strict=False: xgrammar's JSON string rule admits raw control characters, which strict JSON forbids.
        answer = json.loads(text, strict=False)
    except json.JSONDecodeError:
        if finish_reason == "length":
            raise InvalidInput("the answer hit max_tokens before its JSON was complete; raise max_tokens") from None
        raise RuntimeError(f"guided generation returned text that is not JSON: {text[:200]!r}") from None
    error = jsonschema.exceptions.best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(answer))
    if error is not None:
        raise RuntimeError(f"guided generation returned JSON that breaks the schema: {error.message}")
    cited = answer.get("citations", []) if isinstance(answer, dict) else []
    unknown = [c for c in cited if c not in context_ids] if isinstance(cited, list) else []
    if unknown:
        raise RuntimeError(f"answer cites unknown contexts {unknown}")
    return answer


# ------------------------------------------------------------------------------------------------ engines
# What run() needs of each engine, as call signatures. The orchestrator implements them over BLS calls, the
# benchmarks in-process, the tests with fakes; each takes and returns plain values.
class EmbedQuery(Protocol):
    def __call__(self, query: str, timer: "Timer") -> Tuple[Sequence[float], int]:
        """The query's embedding and its token count (tokenizing inside ``timer.stage("tokenize")``)."""


class Search(Protocol):
    def __call__(self, collection: str, vector: Sequence[float], top_k: int, query: Optional[str] = None,
                 search: Any = None) -> List[Context]:
        """The ``top_k`` best chunks of ``collection``, best first: nearest to ``vector``, or, when ``search`` (the
        task's :class:`~ragstack.index.lexical.SearchSpec`) is lexical or hybrid, ranked with ``query``'s terms."""


class Rerank(Protocol):
    def __call__(self, query: str, texts: List[str], timer: "Timer") -> Sequence[float]:
        """One relevance score per text, in the order given (higher is more relevant)."""


class Generation(TypedDict):
    """What a generate engine returns: the text, why it stopped, the token counts (and the queue delay when the
    engine reports one)."""
    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    queue_delay_us: NotRequired[Optional[float]]


class Generate(Protocol):
    def __call__(self, system: str, user: str, schema: dict, policy: Any, max_tokens: int,
                 on_delta: Optional[Callable[[str], None]], timer: "Timer",
                 guide: Optional[Tuple[str, str]] = None) -> Generation:
        """Generate under ``schema`` (or under ``guide``, a (guide type, guide text) pair, when given) with the
        task ``policy``'s sampling; ``on_delta`` receives text as it is decoded."""


class CountTokens(Protocol):
    def __call__(self, system: str, user: str) -> int:
        """The prompt's tokens as the generator will see them."""


class PromptLimit(Protocol):
    def __call__(self, max_tokens: int) -> Optional[int]:
        """The generate engine's own limit on the prompt when ``max_tokens`` are to follow (None: no limit)."""


class CountTexts(Protocol):
    def __call__(self, texts: List[str]) -> List[int]:
        """The tokens of each text alone, in one batched call."""


@dataclasses.dataclass
class Engines:
    """The engines one run uses (see the protocols above for each signature)."""
    embed_query: EmbedQuery
    search: Search
    rerank: Rerank
    generate: Generate
    count_tokens: CountTokens
    prompt_limit: Optional[PromptLimit] = None
    count_texts: Optional[CountTexts] = None


ENGINE_PROTOCOLS = {"embed_query": EmbedQuery, "search": Search, "rerank": Rerank, "generate": Generate,
                    "count_tokens": CountTokens, "prompt_limit": PromptLimit, "count_texts": CountTexts}


def check_engines(engines: Engines) -> None:
    """TypeError naming the engine whose callable cannot be called the way its protocol says (positional
    parameters by position, ``guide`` by keyword). For tests and new implementations: a type checker sees the
    same, and run() does not pay for it per request."""
    import inspect

    optional = {f.name for f in dataclasses.fields(Engines) if f.default is None}
    for name, protocol in ENGINE_PROTOCOLS.items():
        fn = getattr(engines, name)
        if fn is None and name in optional:
            continue
        if not callable(fn):
            raise TypeError(f"engine {name} is not callable: {fn!r}")
        params = list(inspect.signature(protocol.__call__).parameters.values())[1:]     # without self
        positional = [object()] * sum(p.default is inspect.Parameter.empty for p in params)
        keywords = {p.name: None for p in params if p.default is not inspect.Parameter.empty}
        try:
            inspect.signature(fn).bind(*positional, **keywords)
        except TypeError as e:
            raise TypeError(f"engine {name} does not take {protocol.__name__}'s arguments "
                            f"({', '.join(p.name for p in params)}): {e}") from None


@dataclasses.dataclass
class RagResult:
    answer: dict
    contexts: list
    usage: dict

    def outputs(self) -> dict:
        answer = json.dumps(self.answer, ensure_ascii=False)
        try:
            answer.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape the grammar allowed: keep it escaped
            answer = json.dumps(self.answer)
        return {"answer": answer,
                "contexts": json.dumps([c.as_dict() for c in self.contexts], ensure_ascii=False),
                "usage": json.dumps(self.usage)}


class Timer:
    """Per-stage wall time in ms. Spans nest; a stage's time excludes the stages nested inside it, so the
    stages add up to the time spent in them (tokenization inside the embed step counts as tokenize)."""

    def __init__(self):
        self.ms = {s: 0.0 for s in STAGES}
        self._stack = []

    def stage(self, name):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()
                self.children = 0.0
                timer._stack.append(self)

            def __exit__(self, *exc):
                timer._stack.pop()
                elapsed = (time.perf_counter() - self.t0) * 1000.0
                timer.ms[name] += elapsed - self.children
                if timer._stack:
                    timer._stack[-1].children += elapsed
        return _Span()


def fit_contexts(task: str, query: str, contexts: list, engines: Engines, policy,
                 max_tokens: int) -> Tuple[list, int]:
    """Drop the lowest-ranked contexts that do not fit the prompt budget (the policy's thresholds: prompt ≤
    4,096 and prompt + completion ≤ 6,000 tokens as configured, and within the engine's own limits), then check the
    budget; an overrun left after trimming (a huge query) raises the policy's BudgetError, flagged
    token_budget_overrun. Returns the contexts kept and the prompt's token count."""
    system, bare = build_prompt(task, query, [])
    fixed = engines.count_tokens(system, bare)
    blocks = [f"[{c.id}] {c.text}\n\n" for c in contexts]
    engine_limit = engines.prompt_limit(max_tokens) if engines.prompt_limit else None
    # No text has more tokens than UTF-8 bytes plus one (a token covers at least one byte; a SentencePiece
    # tokenizer may add one word-start marker of its own): contexts that fit even at that count are kept without
    # counting them one by one, which trimming by their exact counts would keep too.
    if policy.trim_contexts([len(b.encode("utf-8")) + 1 for b in blocks], fixed, max_tokens,
                            engine_limit) == len(blocks):
        keep = len(blocks)
    else:
        if engines.count_texts is not None:
            sizes = engines.count_texts(blocks)
        else:
            sizes = [engines.count_tokens("", b) for b in blocks]
        keep = policy.trim_contexts(sizes, fixed, max_tokens, engine_limit)
    prompt_tokens = engines.count_tokens(*build_prompt(task, query, contexts[:keep]))
    # A block's tokens alone can differ by a token or so from what it adds to the whole prompt (merges at
    # its edges): the exact count decides, dropping the lowest-ranked context while the prompt is over.
    room = policy.prompt_budget(max_tokens, engine_limit)
    while keep > 0 and prompt_tokens > room:
        keep -= 1
        prompt_tokens = engines.count_tokens(*build_prompt(task, query, contexts[:keep]))
    policy.check_token_budget(prompt_tokens, max_tokens)
    return contexts[:keep], prompt_tokens


def run(req: RagRequest, engines: Engines, policy, on_delta=None, prices: Optional[dict] = None,
        on_alert: Optional[Callable] = None) -> RagResult:
    """One request through the pipeline under ``policy`` (a :class:`ragstack.governance.policy.RuntimePolicy`).

    ``prices`` (per-1k-token prices from the engine manifest) turn on the cost policy: the worst case (prompt
    plus the whole max_tokens) is checked before generation — rejected, or served with ``on_alert(event,
    fields)`` called, as the policy says — and the actual cost is returned in usage. Raises InvalidInput (the
    policy's BudgetError for budget breaches) for anything the caller must fix."""
    from ragstack.governance.policy import schema_id

    t0 = time.perf_counter()
    timer = Timer()
    task_policy = policy.task(req.task)
    if req.documents:
        contexts = [Context(text=d["text"], doc_id=d["id"], chunk_id=d["id"], score=0.0, metadata=d["metadata"])
                    for d in req.documents]
        n_query_tokens = 0
    else:
        with timer.stage("embed"):
            vector, n_query_tokens = engines.embed_query(req.query, timer)
        with timer.stage("search"):
            contexts = engines.search(req.collection, vector, req.top_k, query=req.query, search=task_policy.search)
    if contexts:
        with timer.stage("rerank"):
            scores = engines.rerank(req.query, [c.text for c in contexts], timer)
        for c, s in zip(contexts, scores):
            c.rerank_score = float(s)
        # Stable sort: equal rerank scores keep the retrieval order.
        contexts = sorted(contexts, key=lambda c: -c.rerank_score)
        if req.task != "rank_candidates":
            contexts = contexts[:req.top_n]
    for i, c in enumerate(contexts, 1):
        c.id = f"ctx-{i}"
    max_tokens = task_policy.sampling(max_tokens=req.max_tokens)["max_tokens"]
    best = max((c.rerank_score for c in contexts), default=None)
    threshold = task_policy.abstain_below_rerank
    # quote with abstain_on "span": the threshold applies to the best quotable span's score, further down
    by_span = req.task == "quote" and req.schema is None and task_policy.abstain_on == "span"
    # How the contexts were found: the task's search mode (ragstack/index/lexical.py), or the caller's documents.
    search_mode = "documents" if req.documents else task_policy.search.mode
    if req.task in GROUNDED_TASKS and threshold is not None and (best is None or (best < threshold and not by_span)):
        return _searched(_abstain(req, contexts, best, threshold, n_query_tokens, timer, t0, on_delta), search_mode)
    with timer.stage("tokenize"):
        contexts, prompt_tokens = fit_contexts(req.task, req.query, contexts, engines, policy, max_tokens)
    if prices:
        decision = policy.check_cost(policy.cost_usd(prompt_tokens, max_tokens, prices))
        if decision.alert and on_alert is not None:
            on_alert(decision.flag, {"task": req.task, "worst_case_cost_usd": decision.cost_usd,
                                     "limit_usd": decision.limit_usd, "prompt_tokens": prompt_tokens,
                                     "max_tokens": max_tokens})
    context_ids = [c.id for c in contexts]
    schema = answer_schema(req.task, context_ids, req.schema, max_tokens, task_policy.max_quotes)
    candidates = None
    if req.task == "quote" and req.schema is None:
        candidates = quote_candidates(req.query, contexts, engines, timer, task_policy.quote_candidates)
        if not candidates or (by_span and threshold is not None and candidates[0].rerank_score < threshold):
            # no quotable span, or none relevant enough: say so
            return _searched(_abstain(req, contexts, candidates[0].rerank_score if by_span and candidates else best,
                                      threshold, n_query_tokens, timer, t0, on_delta), search_mode)
        answer, gen = _quote(req.query, candidates, contexts, schema, engines, task_policy, max_tokens, on_delta,
                             timer)
    else:
        system, user = build_prompt(req.task, req.query, contexts)
        with timer.stage("generate"):
            gen = engines.generate(system, user, schema, task_policy, max_tokens, on_delta, timer)
        answer = check_answer(gen["text"], schema, gen["finish_reason"], context_ids)
    usage = {
        "task": req.task,
        "tokens_in": gen["num_input_tokens"], "tokens_out": gen["num_output_tokens"],
        "query_tokens": n_query_tokens,
        "finish_reason": gen["finish_reason"],
        "timings_ms": {**{k: round(v, 3) for k, v in timer.ms.items()},
                       "total": round((time.perf_counter() - t0) * 1000.0, 3)},
        "schema_id": schema_id(schema),
        "cost_usd": (round(policy.cost_usd(gen["num_input_tokens"], gen["num_output_tokens"], prices), 8)
                     if prices else None),
        "queue_delay_us": gen.get("queue_delay_us"),
        "contexts": len(contexts),
        "search": search_mode,
    }
    if req.task in GROUNDED_TASKS and req.schema is None:
        support = citation_support(answer["answer"], answer["citations"], contexts)
        usage["citations"] = support
        usage["citations_supported"] = bool(support) and all(c["supported"] for c in support)
        usage["best_rerank_score"] = best
        usage["abstained"] = False
        if candidates is not None:
            usage["best_span_score"] = candidates[0].rerank_score
            usage["quote_candidates"] = len(candidates)
            usage["quote_select"] = task_policy.quote_select
    return RagResult(answer=answer, contexts=contexts, usage=usage)


def _searched(result: RagResult, mode: str) -> RagResult:
    result.usage["search"] = mode
    return result


def _quote(query: str, candidates: list, contexts: list, schema: dict, engines: Engines, task_policy,
           max_tokens: int, on_delta, timer: Timer) -> tuple:
    """The quote task's answer from its candidates, as the task policy's ``quote_select`` says: "generate" (the
    generator writes the quotes under the EBNF of the candidates' verbatim spans), "index" (it picks candidates
    by number, under a JSON schema of their numbers) or "rerank" (no generation: the best max_quotes candidates
    by the reranker). Returns (answer, generation result)."""
    context_ids = [c.id for c in contexts]
    n_quotes = task_policy.max_quotes
    if task_policy.quote_select == "rerank":
        answer = {"quotes": [{"context": c.id, "text": c.text} for c in candidates[:n_quotes]]}
        if on_delta is not None:
            on_delta(json.dumps(answer, ensure_ascii=False))
        gen: Generation = {"text": "", "num_input_tokens": 0, "num_output_tokens": 0, "finish_reason": "extracted"}
    elif task_policy.quote_select == "index":
        system, user = index_prompt(query, candidates)
        picked_schema = index_schema(len(candidates), n_quotes)
        with timer.stage("generate"):
            gen = engines.generate(system, user, picked_schema, task_policy, max_tokens, None, timer)
        picked = check_answer(gen["text"], picked_schema, gen["finish_reason"], [])["quotes"]
        answer = {"quotes": [{"context": candidates[n - 1].id, "text": candidates[n - 1].text}
                             for n in dict.fromkeys(picked)]}
        if on_delta is not None:
            on_delta(json.dumps(answer, ensure_ascii=False))
    else:
        system, user = build_prompt("quote", query, candidates)
        guide = ("ebnf_grammar", quote_grammar(candidates, n_quotes, whole=True))
        with timer.stage("generate"):
            gen = engines.generate(system, user, schema, task_policy, max_tokens, on_delta, timer, guide=guide)
        answer = check_answer(gen["text"], schema, gen["finish_reason"], context_ids)
    return check_quotes(answer, contexts), gen


def _abstain(req: RagRequest, contexts: list, best, threshold: float, n_query_tokens: int, timer: Timer,
             t0: float, on_delta=None) -> RagResult:
    """The honest outcome when no context is relevant enough: say so, generate nothing, cite nothing. A
    streaming caller gets the answer's JSON as one delta, as it would get a generated one."""
    answer = {"answer": NOT_IN_DOCUMENTS, "citations": [], "not_in_documents": True}
    if req.task == "quote":
        answer = {"quotes": [], **answer}
    if on_delta is not None:
        on_delta(json.dumps(answer, ensure_ascii=False))
    usage = {"task": req.task, "tokens_in": 0, "tokens_out": 0, "query_tokens": n_query_tokens,
             "finish_reason": "abstained",
             "timings_ms": {**{k: round(v, 3) for k, v in timer.ms.items()},
                            "total": round((time.perf_counter() - t0) * 1000.0, 3)},
             "schema_id": None, "cost_usd": 0.0, "queue_delay_us": None, "contexts": len(contexts),
             "citations": [], "citations_supported": False, "best_rerank_score": best,
             "abstain_below_rerank": threshold, "abstained": True}
    return RagResult(answer=answer, contexts=contexts, usage=usage)


# ---- wiring: token-id engines behind the stage callables --------------------------------------------------------
def token_engines(embed_tok, rerank_tok, gen_tok, *, embed: Callable, search: Callable, rerank: Callable,
                  generate: Callable, tokenize_lock=None) -> Engines:
    """:class:`Engines` over token-id engines, wired the same wherever they run (BLS calls in
    ragstack/triton/orchestrator.py, in-process engines in the benchmarks): the tokenizers (``ragstack.tokenization.retrieval``,
    ``ragstack.tokenization.generation``) turn text into ids here, timed as the ``tokenize`` stage.

    ``embed(ids, mask) -> [B, dim]``; ``search(collection, vector, top_k, query=, search=) -> [hit dict]``
    (``VectorStore.search``; ``query`` and ``search`` matter only for a lexical or hybrid search);
    ``rerank(ids, mask) -> [B]`` scores; ``generate(system, user, guide_type, guide, policy, max_tokens, on_delta,
    timer) -> dict`` (the generate stage's dict), where the guide is the answer schema's unless ``rag.run`` gives
    its own (the quote task's grammar). ``tokenize_lock``: held around each tokenizer call (a Hugging Face fast
    tokenizer's truncation settings are per-object state that concurrent calls overwrite)."""
    lock = tokenize_lock if tokenize_lock is not None else contextlib.nullcontext()

    def tokenizing(timer):
        return timer.stage("tokenize") if timer is not None else contextlib.nullcontext()

    def embed_query(query, timer):
        with tokenizing(timer), lock:
            ids, mask, lengths = embed_tok.encode([query], "query")
        return embed(ids, mask)[0], int(lengths[0])

    search_hits = search

    def search_contexts(collection, vector, top_k, query=None, search=None):
        return [Context.of_hit(h) for h in search_hits(collection, vector, top_k, query=query, search=search)]

    def rerank_texts(query, texts, timer):
        with tokenizing(timer), lock:
            ids, mask = rerank_tok.encode_pairs(query, texts)
        return rerank(ids, mask)

    def generate_answer(system, user, schema, policy, max_tokens, on_delta, timer, guide=None):
        guide_type, guide_text = guide or ("json_schema", json.dumps(schema))
        return generate(system, user, guide_type, guide_text, policy, max_tokens, on_delta, timer)

    return Engines(embed_query=embed_query, search=search_contexts, rerank=rerank_texts, generate=generate_answer,
                   count_tokens=gen_tok.count_prompt, prompt_limit=gen_tok.prompt_limit,
                   count_texts=gen_tok.count_texts)
