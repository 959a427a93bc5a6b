"""Request priorities: the levels, the queue policies of every model, and how one request's level is decided.

Triton's own machinery does the ordering: every model that urgent and background work share gets
``dynamic_batching { priority_levels: 2  default_priority_level: 1 }`` and a bounded queue per level
(:data:`QUEUES`, rendered into the configs by :mod:`ragstack.contracts.model_config`). Level 1 is urgent (queries: ``rag``,
``rag_stream``, ``/generate``), level 2 background (``ingest``); Triton serves a lower number first.

How a level travels along a request (Triton 2.51 / python_backend r24.10):
* An entry request may carry Triton's own ``priority`` (gRPC/HTTP infer parameter); an ensemble passes it to its
  step (``ensemble_scheduler.cc``), so it orders the orchestrators' queues. Python models cannot read it: the
  backend API of 24.10 has no accessor for a request's priority.
* ``pb_utils.InferenceRequest`` has no priority argument (r24.10, and still none on python_backend's main): a BLS
  child always has priority 0, which Triton maps to the target model's ``default_priority_level``. Hence the
  defaults are *urgent* everywhere a query goes, so a query's children need nothing, and
* the level the stack decided is carried as the request parameter :data:`PARAMETER` (``x-priority``, the same
  name as the header a client may send, forwarded with the other ``x-*`` headers to every child). A background
  child that is not decoupled is sent through the server's own HTTP endpoint with Triton's ``priority`` set
  (:mod:`ragstack.triton.loopback`), the one way in 24.10 to give a child a level other than its model's default; a
  decoupled child (``generate``, streamed through the same endpoint's generate extension, which has no Triton
  priority) gets the parameter, which the reference engine's in-flight batcher honours.

Deciding a level (:func:`resolve`): the task's level from the runtime policy, lowered (a larger number) if the
caller asks for that, and never more urgent than the caller's ceiling. The ceiling comes from a hook
(:data:`CeilingHook`); without roles every caller's ceiling is urgent. Nothing here imports Triton.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Union

from ragstack.contracts.errors import InvalidInput

URGENT = 1
BACKGROUND = 2
LEVELS = {"urgent": URGENT, "background": BACKGROUND}
NAMES = {v: k for k, v in LEVELS.items()}
PRIORITY_LEVELS = len(LEVELS)
DEFAULT_LEVEL = URGENT
# The request parameter (and client header: X-Priority) that carries a level by name or number.
PARAMETER = "x-priority"


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    """Triton's ``ModelQueuePolicy`` for one level: at most ``max_queue_size`` requests wait (0: no bound), and
    one that waited ``timeout_us`` (0: forever) is rejected. Both rejections are UNAVAILABLE errors from Triton
    (``Exceeds maximum queue size`` / ``Request timeout expired``) that :func:`queue_error` names clearly."""
    max_queue_size: int
    timeout_us: int = 0
    allow_timeout_override: bool = True


@dataclasses.dataclass(frozen=True)
class PriorityQueues:
    """The priority part of a model's ``dynamic_batching``: levels, the default for requests that name none
    (every BLS child), and the queue policy of each level."""
    default_level: int = DEFAULT_LEVEL
    policies: tuple = ()            # ((level, QueuePolicy), ...)
    levels: int = PRIORITY_LEVELS

    def __post_init__(self):
        if not 1 <= self.default_level <= self.levels:
            raise ValueError(f"default level {self.default_level} is not in [1, {self.levels}]")
        for level, _ in self.policies:
            if not 1 <= level <= self.levels:
                raise ValueError(f"queue policy for level {level} is not in [1, {self.levels}]")

    def policy(self, level: int) -> Optional[QueuePolicy]:
        return dict(self.policies).get(level)


# Queue bounds. Urgent work is bounded generously (it is shed only under overload: 64 waiting queries is minutes
# of work on the reference profile); background work is bounded tightly and waits at most a minute, so a bulk
# ingest can never pile up in front of an engine: when its queue is full, the ingest backs off and retries
# (ragstack.pipeline.ingest) instead of queueing more.
URGENT_QUEUE = QueuePolicy(max_queue_size=64)
BACKGROUND_QUEUE = QueuePolicy(max_queue_size=8, timeout_us=60_000_000)
QUEUES = PriorityQueues(DEFAULT_LEVEL, ((URGENT, URGENT_QUEUE), (BACKGROUND, BACKGROUND_QUEUE)))
# Models whose own requests are background work by default (their clients may not raise them).
BACKGROUND_QUEUES = dataclasses.replace(QUEUES, default_level=BACKGROUND)
BACKGROUND_MODELS = ("ingest", "docling")


def queues_for(model: str) -> PriorityQueues:
    """The priority settings of a model's config."""
    return BACKGROUND_QUEUES if model in BACKGROUND_MODELS else QUEUES


def default_level(model: str) -> int:
    """The level Triton gives a request to ``model`` that names none (every BLS child)."""
    return queues_for(model).default_level


def parse_level(value: Union[None, str, int]) -> Optional[int]:
    """A level from a name (``urgent``, ``background``) or a number; None for None/empty; InvalidInput else."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"priority must be one of {', '.join(LEVELS)} (or 1..{PRIORITY_LEVELS}), got {value!r}")
    if isinstance(value, int):
        level = value
    else:
        text = str(value).strip().lower()
        level = LEVELS.get(text)
        if level is None and text.isdigit():
            level = int(text)
    if level is None or not 1 <= level <= PRIORITY_LEVELS:
        raise InvalidInput(f"priority must be one of {', '.join(LEVELS)} (or 1..{PRIORITY_LEVELS}), got {value!r}")
    return level


def name(level: int) -> str:
    return NAMES[level]


# A hook that tells the most urgent level a caller may use, from the request's headers (x-* parameters):
# the role-based access layer plugs its role -> ceiling table in here.
CeilingHook = Callable[[Mapping], int]


def no_roles(headers: Mapping) -> int:
    """Without roles, every caller may be urgent."""
    return URGENT


_ceiling_hook: CeilingHook = no_roles


def set_ceiling_hook(hook: Optional[CeilingHook]) -> None:
    """Install the role layer's ceiling lookup (None: back to :func:`no_roles`)."""
    global _ceiling_hook
    _ceiling_hook = hook or no_roles


def ceiling(headers: Mapping) -> int:
    level = _ceiling_hook(headers)
    if not 1 <= level <= PRIORITY_LEVELS:
        raise RuntimeError(f"the priority ceiling hook returned {level!r}, not a level in [1, {PRIORITY_LEVELS}]")
    return level


def requested(params: Mapping):
    """What a request asks for: its ``x-priority`` (header, /infer parameter, or /generate field), else a
    ``priority`` parameter (on /generate a JSON field of that name arrives as one; on /infer Triton takes it as
    the request's own priority and the model never sees it)."""
    if not params:
        return None
    value = params.get(PARAMETER)
    return params.get("priority") if value is None else value


def resolve(task_level: int, headers: Mapping, requested: Union[None, str, int] = None) -> int:
    """The level a request runs at: the task's (runtime policy), lowered when the caller asks (``requested``, or
    the ``x-priority`` header), and never more urgent than the caller's ceiling. Asking for a more urgent level
    than the task's is not an error: it is simply not granted (the task's level stands)."""
    asked = parse_level(requested if requested is not None else headers.get(PARAMETER))
    level = task_level if asked is None else max(task_level, asked)
    return max(level, ceiling(headers))


def of_parameters(params: Mapping, default: int = DEFAULT_LEVEL) -> int:
    """The level a request carries in its parameters (a BLS child: set by its parent), else ``default``."""
    level = parse_level(params.get(PARAMETER)) if params else None
    return default if level is None else level


def with_level(params: Mapping, level: int) -> dict:
    """A copy of a child's parameters carrying ``level``."""
    return {**params, PARAMETER: name(level)}


# Triton's messages (core r24.10, scheduler_utils.cc / dynamic_batch_scheduler.cc) for a request its queue policy
# turned away; both are UNAVAILABLE.
QUEUE_FULL_MARK = "Exceeds maximum queue size"
QUEUE_TIMEOUT_MARK = "Request timeout expired"


def queue_error(model: str, message: str, level: Optional[int] = None) -> Optional[str]:
    """A clear message for a queue-policy rejection by ``model`` (None if ``message`` is not one)."""
    at = f" at the {name(level)} level" if level in NAMES else ""
    if QUEUE_FULL_MARK in message:
        size = QUEUES.policy(level).max_queue_size if level in NAMES else None
        bound = f" (max_queue_size {size})" if size else ""
        return f"model '{model}' has a full queue{at}{bound}: retry later"
    if QUEUE_TIMEOUT_MARK in message:
        return f"request waited too long in the queue of model '{model}'{at} and was rejected: retry later"
    return None


def retry_when_queue_full(fn: Callable, attempts: int = 6, first_wait_s: float = 0.2,
                          sleep: Callable[[float], None] = None):
    """``fn()``, retried with doubling waits while a queue policy turns it away (background work backs off
    rather than failing when the engines' background queues are full). Other errors, and the last rejection,
    propagate."""
    import time

    from ragstack.contracts.errors import Unavailable

    sleep = sleep or time.sleep
    wait = first_wait_s
    for attempt in range(attempts):
        try:
            return fn()
        except Unavailable as e:
            if attempt == attempts - 1 or ("full queue" not in str(e) and "waited too long" not in str(e)):
                raise
        sleep(wait)
        wait *= 2


def for_request(raw_parameters, task_level: int = DEFAULT_LEVEL) -> int:
    """The level a request runs at, from its parameters (the JSON string ``request.parameters()`` returns):
    :func:`resolve` over its headers and what it asks for."""
    import json

    try:
        params = json.loads(raw_parameters) if raw_parameters else {}
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"request parameters are not valid JSON ({e})") from None
    if not isinstance(params, Mapping):
        raise InvalidInput(f"request parameters must be a JSON object, got {type(params).__name__}")
    headers = {str(k).lower(): v for k, v in params.items() if isinstance(v, str)}
    return resolve(task_level, headers, requested(params))
