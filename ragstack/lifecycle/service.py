"""The manager's request protocol: ``op`` + ``model`` + JSON ``payload`` in, a JSON result out.

One function per op over a :class:`ModelManager`; the Triton model, the CLI and the tests all speak this.
Bad requests raise :class:`ragstack.contracts.errors.InvalidInput` (INVALID_ARG to the caller).

==============  ======  ====================================================================================
op              model   payload
==============  ======  ====================================================================================
acquire         yes     {} -> {status: ready|loading|waiting|failed|unmanaged, lease?, version?, detail}
release         yes     {lease, ok, latency_ms?, error?}
prewarm         yes     {}
unload          yes     {}
status          -       {}
set_mode        -       {mode: co_resident|sequential, phases?: [..], cyclic?: bool}
configure       -       {budget_bytes? (bytes, '12G' or 'auto'), safety_buffer?, cooldown_s?, lease_ttl_s?, slow_load_s?, ...}
canary_start    yes     {version, share?, min_requests?, promote_after?, max_error_rate?, max_latency_ratio?,
                         stable?, engine_dir?}
canary_route    yes     {} -> {version}
canary_report   yes     {version, ok, latency_ms?, error?} -> {decision}
canary_status   yes     {}
rollback        yes     {root_cause}
heal            yes     {force?: bool}: check the model's stubs now (force: reload it regardless); engines and
                        the watched Python models alike
history         yes     {}
==============  ======  ====================================================================================
"""
from __future__ import annotations

from typing import Callable, Optional

from ragstack.contracts.errors import InvalidInput
from ragstack.contracts.json_input import finite_number, type_name
from ragstack.lifecycle.budget import MemoryBudget, parse_bytes
from ragstack.lifecycle.history import engine_info
from ragstack.lifecycle.manager import LifecycleError, ModelManager

OPS = ("acquire", "release", "prewarm", "unload", "status", "set_mode", "configure", "canary_start",
       "canary_route", "canary_report", "canary_status", "rollback", "heal", "history")
NEEDS_MODEL = {"acquire", "release", "prewarm", "unload", "canary_start", "canary_route", "canary_report",
               "canary_status", "rollback", "heal", "history"}

# What each op's payload may hold: field -> kind. Fields not listed are ignored (configure: refused by the
# manager); a null is the same as an absent field. Checked before the op runs, so a bad field is the caller's
# InvalidInput and any other exception an op raises stays an internal error.
SECONDS = ("seconds", 0.0, 366 * 86400.0)
FIELDS = {
    "release": {"lease": ("str",), "ok": ("bool",), "latency_ms": ("number", 0.0, None), "error": ("str",)},
    "set_mode": {"mode": ("str",), "phases": ("str_list",), "cyclic": ("bool",)},
    "configure": {"budget_bytes": ("bytes",), "safety_buffer": ("number", 0.0, 1.0),
                  "cooldown_s": SECONDS, "lease_ttl_s": SECONDS, "demand_ttl_s": SECONDS, "retry_after_s": SECONDS,
                  "slow_load_s": SECONDS, "oscillation_window_s": SECONDS, "tick_s": SECONDS,
                  "oscillation_loads": ("int", 1, 1_000_000), "parallel_loads": ("int", 1, 64)},
    "canary_start": {"version": ("int", 0, None), "share": ("number", 0.0, 1.0), "min_requests": ("int", 0, None),
                     "promote_after": ("int", 0, None), "max_error_rate": ("number", 0.0, 1.0),
                     "max_latency_ratio": ("number", 0.0, None), "stable": ("int", 0, None), "engine_dir": ("str",)},
    "canary_report": {"version": ("int", 0, None), "ok": ("bool",), "latency_ms": ("number", 0.0, None),
                      "error": ("str",)},
    "rollback": {"root_cause": ("str",)},
    "heal": {"force": ("bool",)},
}
REQUIRED = {"release": ("lease",), "set_mode": ("mode",), "canary_start": ("version",),
            "canary_report": ("version", "ok")}


def check_payload(op: str, payload: dict) -> dict:
    """``payload`` with each known field checked against FIELDS[op] (nulls dropped); InvalidInput naming the
    first bad or missing field."""
    fields = FIELDS.get(op, {})
    out = {k: v for k, v in payload.items() if v is not None}
    for name in REQUIRED.get(op, ()):
        if name not in out:
            raise InvalidInput(f"model_manager: {op} needs payload.{name}")
    for name, value in out.items():
        kind = fields.get(name)
        if kind is not None:
            out[name] = _check_field(f"model_manager: {op} payload.{name}", value, *kind)
    return out


def _check_field(what: str, value, kind: str, low=None, high=None):
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidInput(f"{what} must be a string, got {type_name(value)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(f"{what} must be true or false, got {type_name(value)}")
        return value
    if kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"{what} must be a list of model names")
        return value
    if kind == "bytes":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidInput(f"{what} must be a number of bytes or a size such as '12G', got {type_name(value)}")
        if isinstance(value, str) and value.strip().lower() == "auto":
            from ragstack.lifecycle.triton_io import auto_budget_bytes  # here: triton_io imports this module

            return auto_budget_bytes()
        try:
            size = parse_bytes(value)
        except (ValueError, OverflowError):
            raise InvalidInput(f"{what} is not a size: {str(value)[:40]!r}") from None
        if size <= 0:
            raise InvalidInput(f"{what} must be positive, got {size}")
        return size
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{what} must be an integer, got {type_name(value)}")
        number = value
    else:  # number, seconds
        number = finite_number(value, what)
    if (low is not None and number < low) or (high is not None and number > high):
        raise InvalidInput(f"{what} must be in [{low}, {'∞' if high is None else high}], got {number}")
    return number


class ManagerService:
    def __init__(self, manager: ModelManager, resolve_engine_dir: Optional[Callable] = None, watchdog=None):
        self.manager = manager
        self.resolve_engine_dir = resolve_engine_dir or (lambda model, value: value)
        self.watchdog = watchdog          # StubWatchdog of the unbudgeted Python models, or None

    def handle(self, op: str, model: Optional[str], payload: Optional[dict]) -> dict:
        """Run one op. The request is checked field by field first (op, model, payload): a bad one is
        :class:`InvalidInput` naming the field. A :class:`LifecycleError` (the manager refusing what was asked,
        e.g. a rollback with no previous version) is InvalidInput too; any other exception is a bug and
        propagates unchanged, so the model answers INTERNAL and logs it (``triton.adapter.error_response``)."""
        if not isinstance(op, str):
            raise InvalidInput(f"model_manager: op must be a string, got {type_name(op)}")
        if model is not None and not isinstance(model, str):
            raise InvalidInput(f"model_manager: model must be a string, got {type_name(model)}")
        if op not in OPS:
            raise InvalidInput(f"model_manager: unknown op {op!r:.100}; expected one of {', '.join(OPS)}")
        if op in NEEDS_MODEL and not model:
            raise InvalidInput(f"model_manager: op {op!r} needs a model")
        if payload is not None and not isinstance(payload, dict):
            raise InvalidInput("model_manager: payload must be a JSON object")
        p = check_payload(op, payload or {})
        try:
            return getattr(self, f"_{op}")(model, p)
        except LifecycleError as e:
            raise InvalidInput(str(e)) from None

    # ------------------------------------------------------------------------------------------- ops
    def _acquire(self, model, p):
        return self.manager.acquire(model).to_dict()

    def _release(self, model, p):
        latency = p.get("latency_ms")
        return {"released": self.manager.release(p["lease"], ok=p.get("ok", True),
                                                 latency_s=None if latency is None else float(latency) / 1000,
                                                 error=p.get("error"))}

    def _prewarm(self, model, p):
        return {"model": model, "state": self.manager.prewarm(model)}

    def _unload(self, model, p):
        return {"model": model, "state": self.manager.unload(model)}

    def _status(self, model, p):
        status = self.manager.status()
        if self.watchdog is not None:
            status["watched"] = self.watchdog.status()
        return status

    def _set_mode(self, model, p):
        cyclic = p.get("cyclic")
        self.manager.set_mode(p["mode"], p.get("phases"), cyclic)
        return {"mode": self.manager.mode, "phases": list(self.manager.phases), "cyclic": self.manager.cyclic}

    def _configure(self, model, p):
        p = dict(p)
        budget = None
        if "budget_bytes" in p or "safety_buffer" in p:
            current = self.manager.budget
            safety = float(p.pop("safety_buffer", current.safety_buffer))
            if not 0.0 <= safety < 1.0:
                raise InvalidInput(f"model_manager: configure payload.safety_buffer must be in [0, 1), got {safety}")
            budget = MemoryBudget(p.pop("budget_bytes", current.total_bytes), safety)
        self.manager.configure(budget=budget, **p)
        status = self.manager.status()
        return {k: status[k] for k in ("budget", "used_bytes", "headroom_bytes", "cooldown_s", "parallel_loads")}

    def _canary_start(self, model, p):
        engine_dir = p.get("engine_dir")
        info = engine_info(self.resolve_engine_dir(model, engine_dir)) if engine_dir else None
        kwargs = {k: p[k] for k in ("share", "min_requests", "promote_after", "max_error_rate",
                                    "max_latency_ratio", "stable") if k in p}
        return self.manager.canary_start(model, p["version"], engine_info=info, **kwargs)

    def _canary_route(self, model, p):
        return {"version": self.manager.canary_route(model)}

    def _canary_report(self, model, p):
        latency = p.get("latency_ms")
        return {"decision": self.manager.canary_record(
            model, p["version"], p["ok"], None if latency is None else latency / 1000,
            p.get("error"))}

    def _canary_status(self, model, p):
        m = self.manager.status()["models"].get(model)
        if m is None:
            raise InvalidInput(f"{model!r} is not a managed model")
        return {k: m[k] for k in ("canary_state", "canary", "last_canary", "versions", "rollout", "blocked")}

    def _rollback(self, model, p):
        return self.manager.rollback(model, p.get("root_cause", ""))

    def _heal(self, model, p):
        if self.watchdog is not None and model in self.watchdog.models():
            return {"model": model, "state": self.watchdog.check(model, force=bool(p.get("force")))}
        if p.get("force"):
            self.manager.on_stub_dead(model, "operator: forced heal")
        else:
            self.manager.check_health(model)
        return {"model": model, "state": self.manager.status()["models"][model]["state"]}

    def _history(self, model, p):
        h = self.manager.history
        return {"current": h.current(model), "previous": h.previous(model), "log": h.log(model),
                "versions": h.to_dict()["models"].get(model, {}).get("versions", {})}
