"""Runtime policies: per-task sampling defaults and the per-request budgets (tokens, cost, queue delay).

Everything lives in one file, ``config/runtime_policy.json``, because several parties must agree on the same
numbers: the BLS models enforce them, the prompt-runtime sign-off (:mod:`ragstack.pipeline.prompt_runtime`) compares
the evaluation tool's manifests against them, and the alert rules and health check alert on them. The file is validated
completely at load, with errors that name the offending field: a misspelt key (``temprature``) would otherwise
fall back to a default silently, and a bad threshold would only show up as a wrong decision under traffic.

Request-time checks raise :class:`BudgetError`, an :class:`~ragstack.contracts.errors.InvalidInput` (so Triton answers
INVALID_ARG) that carries the event ``flag`` to log (``token_budget_overrun``, ``cost_budget_exceeded``).
Nothing here imports Triton; every check is a few arithmetic operations, cheap enough to run on every request.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ragstack.governance import priority as prio
from ragstack.contracts.errors import InvalidInput
from ragstack.index.lexical import SearchSpec

POLICY_VERSION = 1
TOKEN_BUDGET_FLAG = "token_budget_overrun"
COST_BUDGET_FLAG = "cost_budget_exceeded"
COST_ACTIONS = ("reject", "serve_and_alert")
PRICE_KEYS = ("price_per_1k_input_usd", "price_per_1k_output_usd")

_TOP_KEYS = {"version", "default_task", "tasks", "thresholds", "events", "require_engine_identity",
             "ingest_priority", "background_max_yield_ms"}
_PENALTY_KEYS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "min_tokens", "len_penalty")
_QUOTE_KEYS = ("quote_candidates", "max_quotes", "quote_select", "abstain_on")
ABSTAIN_ON = ("context", "span")
QUOTE_SELECT = ("generate", "index", "rerank")
_TASK_KEYS = {"description", "temperature", "top_p", "top_k", "max_tokens", "abstain_below_rerank", "priority",
              "search", *_PENALTY_KEYS, *_QUOTE_KEYS}
_THRESHOLD_KEYS = {"max_queue_delay_us", "max_tokens", "max_prompt_tokens", "max_cost_usd", "cost_breach_action"}
_EVENT_KEYS = {"log_path", "webhook_url", "webhook_timeout_s"}
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class PolicyError(ValueError):
    """The policy file (or a price table) is invalid; the message names the file and the field."""


class BudgetError(InvalidInput):
    """A request breaks a budget. ``flag`` is the structured event to emit; ``details`` its fields."""

    def __init__(self, message: str, flag: str, **details):
        super().__init__(message)
        self.flag = flag
        self.details = details


@dataclasses.dataclass(frozen=True)
class TaskPolicy:
    """Sampling defaults and the completion-token cap of one task (``answer``, ``judge``, ...)."""
    name: str
    temperature: float
    top_p: float
    max_tokens: int
    top_k: int = 0
    description: str = ""
    # TensorRT-LLM's penalty inputs (neutral by default; see ragstack.engines.generation.sampling.apply_penalties)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    len_penalty: float = 0.0
    # Grounded tasks: when the reranker's best score is below this, the answer is "not in the documents"
    # without generating (None: never). Calibrated by benchmarks/answers.py --calibrate.
    abstain_below_rerank: Optional[float] = None
    # The quote task: how many reranked spans are offered, how many may be quoted, and who picks them —
    # "generate" (the generator writes them under the spans' EBNF), "index" (it picks them by number) or
    # "rerank" (no generation: the reranker's best). Measured by benchmarks/answers.py.
    quote_candidates: int = 4
    max_quotes: int = 2
    quote_select: str = "generate"
    # What abstain_below_rerank is compared with for the quote task: the best context's reranker score, or the
    # best quotable span's (its label scored by the reranker).
    abstain_on: str = "context"
    # Triton priority level of the task's requests (ragstack/governance/priority.py): queries are urgent by default.
    priority: int = prio.URGENT
    # How the index is searched for the task's contexts (ragstack/index/lexical.py): dense (cosine), lexical or
    # hybrid (both, fused); measured by benchmarks/answers.py and benchmarks/retrieval.py.
    search: SearchSpec = SearchSpec()

    def penalties(self) -> dict:
        """The task's penalty inputs, by their tensorrt_llm names."""
        return {k: getattr(self, k) for k in _PENALTY_KEYS}

    def sampling(self, *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_p: Optional[float] = None, top_k: Optional[int] = None) -> dict:
        """The sampling parameters of a request: its own values where given (checked), else the task's.

        A request may ask for fewer completion tokens than the task allows, never more: the cap is what keeps
        the worst-case cost and the token budget predictable per task.
        """
        out = {"max_tokens": self.max_tokens if max_tokens is None else max_tokens,
               "temperature": self.temperature if temperature is None else float(temperature),
               "top_p": self.top_p if top_p is None else float(top_p),
               "top_k": self.top_k if top_k is None else top_k}
        if not 1 <= out["max_tokens"] <= self.max_tokens:
            raise InvalidInput(f"max_tokens must be in [1, {self.max_tokens}] for task '{self.name}', "
                               f"got {out['max_tokens']}")
        if not 0.0 <= out["temperature"] <= 2.0:
            raise InvalidInput(f"temperature must be in [0, 2], got {out['temperature']}")
        if not 0.0 < out["top_p"] <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1], got {out['top_p']}")
        if out["top_k"] < 0:
            raise InvalidInput(f"top_k must be >= 0, got {out['top_k']}")
        return out


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The readiness thresholds every request is held to: the queue delay that raises an alert, ``max_tokens``
    (prompt + completion combined) and ``max_prompt_tokens`` (over either: rejected), and the cost per request
    (a breach is handled as ``cost_breach_action`` says)."""
    max_queue_delay_us: int
    max_tokens: int
    max_prompt_tokens: int
    max_cost_usd: float
    cost_breach_action: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EventSettings:
    """Where events go (see :mod:`ragstack.governance.events`); ``log_path`` may be relative to the caller's base dir."""
    log_path: Optional[str] = None
    webhook_url: Optional[str] = None
    webhook_timeout_s: float = 2.0


@dataclasses.dataclass(frozen=True)
class CostDecision:
    """Outcome of :meth:`RuntimePolicy.check_cost` when the request may be served.

    ``alert`` is the marker the caller acts on: serve the request, then emit ``flag`` as an event (finance is
    notified of a breach through the event log and webhook).
    """
    cost_usd: float
    limit_usd: float
    alert: bool

    @property
    def flag(self) -> Optional[str]:
        return COST_BUDGET_FLAG if self.alert else None


class RuntimePolicy:
    """The validated contents of the policy file. Build with :meth:`load` or :meth:`from_dict`."""

    def __init__(self, tasks: Mapping[str, TaskPolicy], default_task: str, thresholds: Thresholds,
                 events: EventSettings = EventSettings(), source: str = "<policy>",
                 require_engine_identity: bool = True, ingest_priority: int = prio.BACKGROUND,
                 background_max_yield_ms: int = 2000):
        self.tasks = dict(tasks)
        # The level ingest (bulk document work) runs at: background unless the policy says otherwise.
        self.ingest_priority = ingest_priority
        # Background work waits for urgent requests to finish before each engine batch, at most this long
        # (ragstack/triton/activity.py; 0: it never waits).
        self.background_max_yield_ms = background_max_yield_ms
        # True: requests without X-Engine-Hash / X-Quantisation headers matching the served manifest are rejected.
        self.require_engine_identity = require_engine_identity
        self.default_task = default_task
        self.thresholds = thresholds
        self.events = events
        self.source = source

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: Union[str, Path]) -> "RuntimePolicy":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PolicyError(f"policy file {path} not found") from None
        except json.JSONDecodeError as e:
            raise PolicyError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<policy>") -> "RuntimePolicy":
        v = _Validator(source)
        v.keys(data, "", _TOP_KEYS, required={"default_task", "tasks", "thresholds"})
        if data.get("version", POLICY_VERSION) != POLICY_VERSION:
            v.fail("version", f"{data['version']!r} is not supported (this code reads version {POLICY_VERSION})")
        thresholds = _thresholds(v, data["thresholds"])
        tasks_data = v.mapping(data["tasks"], "tasks")
        if not tasks_data:
            v.fail("tasks", "must define at least one task")
        tasks = {name: _task(v, name, spec, thresholds) for name, spec in tasks_data.items()}
        default = data["default_task"]
        if default not in tasks:
            v.fail("default_task", f"{default!r} is not one of the tasks ({', '.join(sorted(tasks))})")
        events = _events(v, data.get("events", {}))
        require = data.get("require_engine_identity", True)
        if not isinstance(require, bool):
            v.fail("require_engine_identity", f"must be true or false, got {require!r}")
        ingest_priority = _level(v, data.get("ingest_priority", prio.name(prio.BACKGROUND)), "ingest_priority")
        yield_ms = v.number(data.get("background_max_yield_ms", 2000), "background_max_yield_ms", integer=True,
                            high=60_000)
        return cls(tasks, default, thresholds, events, source, require_engine_identity=require,
                   ingest_priority=ingest_priority, background_max_yield_ms=yield_ms)

    # -------------------------------------------------------------------------------------------- tasks
    @property
    def task_names(self) -> list:
        return sorted(self.tasks)

    def task(self, name: Optional[str] = None) -> TaskPolicy:
        """The named task's policy; the default task when ``name`` is empty or None."""
        if not name:
            return self.tasks[self.default_task]
        try:
            return self.tasks[name]
        except KeyError:
            raise InvalidInput(f"unknown task {name!r}: valid tasks are {', '.join(self.task_names)}") from None

    # ---------------------------------------------------------------------------------------- token budget
    def prompt_budget(self, max_tokens: int, engine_limit: Optional[int] = None) -> int:
        """How many prompt tokens a request asking for ``max_tokens`` completion tokens may have; a served
        engine with a smaller input limit (``engine_limit``) lowers it further."""
        t = self.thresholds
        budget = min(t.max_prompt_tokens, t.max_tokens - max_tokens)
        return budget if engine_limit is None else min(budget, engine_limit)

    def check_token_budget(self, prompt_tokens: int, max_tokens: int) -> None:
        """Reject a prompt over ``max_prompt_tokens`` or a prompt + completion over the combined ``max_tokens``."""
        _non_negative(prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        t = self.thresholds
        if prompt_tokens > t.max_prompt_tokens:
            raise BudgetError(f"{TOKEN_BUDGET_FLAG}: prompt has {prompt_tokens} tokens, more than "
                              f"max_prompt_tokens {t.max_prompt_tokens}", TOKEN_BUDGET_FLAG,
                              prompt_tokens=prompt_tokens, max_tokens=max_tokens, limit=t.max_prompt_tokens)
        if prompt_tokens + max_tokens > t.max_tokens:
            raise BudgetError(f"{TOKEN_BUDGET_FLAG}: prompt {prompt_tokens} + max_tokens {max_tokens} = "
                              f"{prompt_tokens + max_tokens} tokens, more than the combined limit {t.max_tokens}",
                              TOKEN_BUDGET_FLAG, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                              limit=t.max_tokens)

    def trim_contexts(self, contexts_token_counts: Sequence[int], fixed_prompt_tokens: int,
                      max_tokens: int, engine_limit: Optional[int] = None) -> int:
        """How many of the retrieved contexts (best first) fit in the prompt budget with the fixed prompt part.

        The result is a prefix length, never a selection: the contexts arrive in rerank order, and dropping a
        long high-ranked one to keep a short low-ranked one would change what the answer is grounded on. When
        even the fixed part does not fit this returns 0 and :meth:`check_token_budget` then rejects the request.
        """
        _non_negative(fixed_prompt_tokens=fixed_prompt_tokens, max_tokens=max_tokens)
        room = self.prompt_budget(max_tokens, engine_limit) - fixed_prompt_tokens
        used = 0
        for n, count in enumerate(contexts_token_counts):
            used += count
            if used > room:
                return n
        return len(contexts_token_counts)

    # ------------------------------------------------------------------------------------------------ cost
    @staticmethod
    def cost_usd(tokens_in: int, tokens_out: int, prices: Mapping) -> float:
        """Cost of a request from an engine manifest's per-1k-token prices (rounded to 1e-12 USD)."""
        _non_negative(tokens_in=tokens_in, tokens_out=tokens_out)
        p_in, p_out = (_price(prices, key) for key in PRICE_KEYS)
        return round((tokens_in * p_in + tokens_out * p_out) / 1000.0, 12)

    def check_cost(self, worst_case_cost: float) -> CostDecision:
        """Decide on a request whose worst case (prompt + full ``max_tokens``) costs ``worst_case_cost``.

        Under the limit: a CostDecision without alert. Over it: ``reject`` raises BudgetError, while
        ``serve_and_alert`` returns a CostDecision with ``alert`` set.
        """
        t = self.thresholds
        exceeded = worst_case_cost > t.max_cost_usd
        if exceeded and t.cost_breach_action == "reject":
            raise BudgetError(f"{COST_BUDGET_FLAG}: worst-case cost ${worst_case_cost:.6f} is over the "
                              f"per-request limit ${t.max_cost_usd:.2f}", COST_BUDGET_FLAG,
                              cost_usd=worst_case_cost, limit_usd=t.max_cost_usd)
        return CostDecision(worst_case_cost, t.max_cost_usd, exceeded)

    # ------------------------------------------------------------------------------------------ queueing
    def queue_delay_exceeded(self, queue_delay_us: float) -> bool:
        """True when a measured queue delay is over ``max_queue_delay_us`` (an observability alert)."""
        return queue_delay_us > self.thresholds.max_queue_delay_us


def schema_id(schema: Union[str, bytes, Mapping, list]) -> str:
    """A stable id for a JSON schema: the first 16 hex digits of sha256 over its canonical JSON.

    Canonical means sorted keys and no whitespace, so the same schema written with other spacing or key order
    gets the same id: guided calls log it instead of the schema itself.
    """
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ validation
def _non_negative(**values) -> None:
    for name, value in values.items():
        # numbers.Integral also admits the numpy integers that come out of request tensors
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise InvalidInput(f"{name} must be a non-negative integer, got {value!r}")


def _price(prices: Mapping, key: str) -> float:
    value = prices.get(key) if isinstance(prices, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PolicyError(f"price table needs {key} as a non-negative number, got {value!r}")
    return float(value)


class _Validator:
    """Field checks that raise PolicyError naming the file and the dotted field path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str):
        raise PolicyError(f"{self.source}: {field or 'top level'}: {problem}")

    def mapping(self, value, field: str) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(field, f"must be an object, got {type(value).__name__}")
        return value

    def keys(self, value, field: str, allowed: set, required: set = frozenset()) -> Mapping:
        value = self.mapping(value, field)
        prefix = f"{field}." if field else ""
        unknown = sorted(set(value) - allowed)
        if unknown:
            self.fail(field, f"unknown key(s) {', '.join(prefix + k for k in unknown)} "
                             f"(allowed: {', '.join(sorted(allowed))})")
        missing = sorted(required - set(value))
        if missing:
            self.fail(field, f"missing key(s) {', '.join(prefix + k for k in missing)}")
        return value

    def number(self, value, field: str, *, integer: bool = False, low: float = 0.0, high: float = math.inf,
               low_open: bool = False) -> float:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            self.fail(field, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if value < low or (low_open and value == low) or value > high:
            lo = "(" if low_open else "["
            hi = "]" if math.isfinite(high) else ")"
            self.fail(field, f"{value!r} is out of range {lo}{low:g}, {high:g}{hi}")
        return value


def _thresholds(v: _Validator, data) -> Thresholds:
    d = v.keys(data, "thresholds", _THRESHOLD_KEYS, required=_THRESHOLD_KEYS)
    t = Thresholds(
        max_queue_delay_us=v.number(d["max_queue_delay_us"], "thresholds.max_queue_delay_us", integer=True),
        max_tokens=v.number(d["max_tokens"], "thresholds.max_tokens", integer=True, low=1),
        max_prompt_tokens=v.number(d["max_prompt_tokens"], "thresholds.max_prompt_tokens", integer=True, low=1),
        max_cost_usd=float(v.number(d["max_cost_usd"], "thresholds.max_cost_usd")),
        cost_breach_action=d["cost_breach_action"],
    )
    if t.cost_breach_action not in COST_ACTIONS:
        v.fail("thresholds.cost_breach_action", f"{t.cost_breach_action!r} is not one of {', '.join(COST_ACTIONS)}")
    if t.max_prompt_tokens >= t.max_tokens:
        v.fail("thresholds.max_prompt_tokens", f"{t.max_prompt_tokens} leaves no completion tokens under the "
                                               f"combined max_tokens {t.max_tokens}")
    return t


def _task(v: _Validator, name: str, data, thresholds: Thresholds) -> TaskPolicy:
    field = f"tasks.{name}"
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        v.fail(field, "task names are lower-case identifiers (a-z, 0-9, _)")
    d = v.keys(data, field, _TASK_KEYS, required={"temperature", "top_p", "max_tokens"})
    description = d.get("description", "")
    if not isinstance(description, str):
        v.fail(f"{field}.description", "must be a string")
    return TaskPolicy(
        name=name,
        temperature=float(v.number(d["temperature"], f"{field}.temperature", high=2.0)),
        top_p=float(v.number(d["top_p"], f"{field}.top_p", high=1.0, low_open=True)),
        # A task's completion cap must leave room for at least one prompt token under the combined limit.
        max_tokens=v.number(d["max_tokens"], f"{field}.max_tokens", integer=True, low=1,
                            high=thresholds.max_tokens - 1),
        top_k=v.number(d.get("top_k", 0), f"{field}.top_k", integer=True),
        description=description,
        repetition_penalty=float(v.number(d.get("repetition_penalty", 1.0), f"{field}.repetition_penalty",
                                          high=10.0, low_open=True)),
        presence_penalty=float(v.number(d.get("presence_penalty", 0.0), f"{field}.presence_penalty",
                                        low=-2.0, high=2.0)),
        frequency_penalty=float(v.number(d.get("frequency_penalty", 0.0), f"{field}.frequency_penalty",
                                         low=-2.0, high=2.0)),
        min_tokens=v.number(d.get("min_tokens", 0), f"{field}.min_tokens", integer=True),
        len_penalty=float(v.number(d.get("len_penalty", 0.0), f"{field}.len_penalty", low=-10.0, high=10.0)),
        abstain_below_rerank=(None if d.get("abstain_below_rerank") is None else
                              float(v.number(d["abstain_below_rerank"], f"{field}.abstain_below_rerank",
                                             high=1.0))),
        quote_candidates=v.number(d.get("quote_candidates", 4), f"{field}.quote_candidates", integer=True, low=1,
                                  high=32),
        max_quotes=v.number(d.get("max_quotes", 2), f"{field}.max_quotes", integer=True, low=1, high=8),
        quote_select=_choice(v, d.get("quote_select", "generate"), f"{field}.quote_select", QUOTE_SELECT),
        abstain_on=_choice(v, d.get("abstain_on", "context"), f"{field}.abstain_on", ABSTAIN_ON),
        priority=_level(v, d.get("priority", prio.name(prio.URGENT)), f"{field}.priority"),
        search=_search(v, d.get("search"), f"{field}.search"),
    )


def _search(v: _Validator, value, field: str) -> SearchSpec:
    try:
        return SearchSpec.parse(value)
    except InvalidInput as e:
        v.fail(field, str(e))


def _choice(v: _Validator, value, field: str, allowed: tuple) -> str:
    if value not in allowed:
        v.fail(field, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _level(v: _Validator, value, field: str) -> int:
    try:
        level = prio.parse_level(value)
    except InvalidInput as e:
        v.fail(field, str(e))
    if level is None:
        v.fail(field, f"must be one of {', '.join(prio.LEVELS)}")
    return level


def _events(v: _Validator, data) -> EventSettings:
    d = v.keys(data, "events", _EVENT_KEYS)
    log_path, url = d.get("log_path"), d.get("webhook_url")
    if log_path is not None and (not isinstance(log_path, str) or not log_path):
        v.fail("events.log_path", f"must be a non-empty string or null, got {log_path!r}")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url)):
        v.fail("events.webhook_url", f"must be an http(s) URL or null, got {url!r}")
    timeout = float(v.number(d.get("webhook_timeout_s", 2.0), "events.webhook_timeout_s", low=0.0, high=30.0,
                             low_open=True))
    return EventSettings(log_path, url, timeout)
