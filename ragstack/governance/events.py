"""Structured events: one JSON line per event in an event log, and a POST to the readiness webhook.

The events are the record of budget breaches, observability alerts and rollbacks that finance, on-call and the
evaluation sign-off read (docs/design-notes.md#serving-rules). Two properties matter more than anything else here:

* **The log is always parseable.** Every Triton model instance is a separate stub process and each may run
  several threads, all appending to the same file. Each event is therefore written with a single ``write(2)``
  on a descriptor opened with ``O_APPEND`` (the kernel places it at the end atomically) under a thread lock,
  so lines never interleave and a reader never sees half a line followed by another event.
* **A request never waits on the webhook, and never fails because of it.** Posting happens on one background
  thread fed by a bounded queue; a slow or dead receiver costs at most a dropped notification (counted and
  logged), never request latency.

Record format: ``{"ts": "2025-01-01T00:00:00.000000Z", "event": "<name>", "fields": {...}}``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

log = logging.getLogger("ragstack.governance.events")

OBSERVABILITY_ALERT = "llm_observability_alert"
TOKEN_BUDGET_OVERRUN = "token_budget_overrun"
COST_BUDGET_EXCEEDED = "cost_budget_exceeded"
ROLLBACK_COMPLETED = "llm_rollback_completed"
EVENTS = (OBSERVABILITY_ALERT, TOKEN_BUDGET_OVERRUN, COST_BUDGET_EXCEEDED, ROLLBACK_COMPLETED)

# Environment overrides, so a deployment can redirect events without editing the policy file.
LOG_PATH_ENV = "RAGSTACK_EVENT_LOG"
WEBHOOK_URL_ENV = "RAGSTACK_EVENT_WEBHOOK_URL"


def utc_timestamp(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_record(event: str, fields: Mapping, ts: str) -> dict:
    """The event as it is logged and posted. Unknown event names are a programming error (ValueError)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}: known events are {', '.join(EVENTS)}")
    return {"ts": ts, "event": event, "fields": dict(fields)}


def encode_record(record: Mapping) -> bytes:
    """One log line. Values JSON cannot hold (paths, numpy scalars) are written as their str()."""
    return (json.dumps(record, default=str, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


class EventLog:
    """Writes events to ``path`` (if given) and posts them to ``webhook_url`` (if given).

    Thread-safe; share one instance per process. Call :meth:`close` at shutdown to let queued posts finish.
    """

    def __init__(self, path: Union[None, str, Path] = None, webhook_url: Optional[str] = None,
                 webhook_timeout_s: float = 2.0, max_pending: int = 1000,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path) if path is not None else None
        self.webhook_url = webhook_url
        self.webhook_timeout_s = webhook_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._queue: "queue.Queue" = queue.Queue(maxsize=max_pending)
        self._idle = threading.Condition()
        self._pending = 0
        self._worker: Optional[threading.Thread] = None
        self.stats = {"written": 0, "posted": 0, "post_failed": 0, "dropped": 0}

    @classmethod
    def from_settings(cls, settings, base_dir: Union[str, Path] = ".", env: Optional[Mapping] = None) -> "EventLog":
        """Build from :class:`ragstack.governance.policy.EventSettings`; a relative ``log_path`` is under ``base_dir``.

        ``RAGSTACK_EVENT_LOG`` and ``RAGSTACK_EVENT_WEBHOOK_URL`` override the settings when set (an empty
        value turns that destination off); ``env``: an environment to read them from instead of the process's.
        """
        from ragstack import settings as rs

        overrides = rs.current() if env is None else rs.from_env(env)
        path = settings.log_path if overrides.event_log is None else overrides.event_log
        url = settings.webhook_url if overrides.event_webhook_url is None else overrides.event_webhook_url
        if path:
            path = Path(base_dir) / path
        return cls(path or None, url or None, settings.webhook_timeout_s)

    # --------------------------------------------------------------------------------------------- emit
    def emit(self, event: str, **fields) -> dict:
        """Log one event and queue its webhook post; never raises for I/O problems.

        Returns the record as logged and posted (values JSON cannot hold already turned into strings).
        """
        line = encode_record(make_record(event, fields, utc_timestamp(self._clock())))
        if self._fd is not None:
            try:
                with self._lock:
                    _write_all(self._fd, line)
                    self.stats["written"] += 1
            except OSError as e:
                log.error("could not write event %s to %s: %s", event, self.path, e)
        if self.webhook_url:
            self._enqueue(line)
        return json.loads(line)

    # ------------------------------------------------------------------------------------------ webhook
    def _enqueue(self, body: bytes) -> None:
        with self._idle:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._post_loop, name="ragstack-event-webhook",
                                                daemon=True)
                self._worker.start()
            try:
                self._queue.put_nowait(body)
                self._pending += 1
            except queue.Full:
                self.stats["dropped"] += 1
                log.warning("event webhook queue full (%d pending): dropped one notification", self._pending)

    def _post_loop(self) -> None:
        # imported here, by the webhook's thread: urllib.request brings http.client and ssl (~2 MiB of RSS in every
        # stub that keeps an event log, most of which never post)
        import urllib.request

        while True:
            body = self._queue.get()
            if body is None:
                return
            try:
                req = urllib.request.Request(self.webhook_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.webhook_timeout_s) as resp:
                    resp.read()
                self.stats["posted"] += 1
            except Exception as e:  # noqa: BLE001 - a notification failure must never propagate
                self.stats["post_failed"] += 1
                log.warning("event webhook %s failed: %s", self.webhook_url, e)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until every queued post was attempted; False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Give queued posts up to ``timeout`` seconds, stop the poster thread and close the log."""
        self.wait_idle(timeout)
        if self._worker is not None and self._worker.is_alive():
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # daemon thread: it dies with the process
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    # A regular file takes the whole buffer in one write(2) unless the disk is full; the loop only makes a
    # short write (then an error) visible instead of silently losing the tail.
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_events(path: Union[str, Path]) -> list:
    """All records of an event log (for tests, the sign-off report and post-mortems)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
