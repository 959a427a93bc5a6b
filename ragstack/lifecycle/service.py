"""The manager's request protocol: ``op`` + ``model`` + JSON ``payload`` in, a JSON result out.

One function per op over a :class:`ModelManager`; the Triton model, the CLI and the tests all speak this.
Bad requests raise :class:`ragstack.errors.InvalidInput` (INVALID_ARG to the caller).

==============  ======  ====================================================================================
op              model   payload
==============  ======  ====================================================================================
acquire         yes     {} -> {status: ready|loading|waiting|failed|unmanaged, lease?, version?, detail}
release         yes     {lease, ok, latency_ms?, error?}
prewarm         yes     {}
unload          yes     {}
status          -       {}
set_mode        -       {mode: co_resident|sequential, phases?: [..], cyclic?: bool}
configure       -       {budget_bytes?, safety_buffer?, cooldown_s?, lease_ttl_s?, slow_load_s?, ...}
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

from ragstack.errors import InvalidInput
from ragstack.lifecycle.budget import MemoryBudget, parse_bytes
from ragstack.lifecycle.history import engine_info
from ragstack.lifecycle.manager import LifecycleError, ModelManager

OPS = ("acquire", "release", "prewarm", "unload", "status", "set_mode", "configure", "canary_start",
       "canary_route", "canary_report", "canary_status", "rollback", "heal", "history")
NEEDS_MODEL = {"acquire", "release", "prewarm", "unload", "canary_start", "canary_route", "canary_report",
               "canary_status", "rollback", "heal", "history"}


class ManagerService:
    def __init__(self, manager: ModelManager, resolve_engine_dir: Optional[Callable] = None, watchdog=None):
        self.manager = manager
        self.resolve_engine_dir = resolve_engine_dir or (lambda model, value: value)
        self.watchdog = watchdog          # StubWatchdog of the unbudgeted Python models, or None

    def handle(self, op: str, model: Optional[str], payload: Optional[dict]) -> dict:
        if op not in OPS:
            raise InvalidInput(f"model_manager: unknown op {op!r}; expected one of {', '.join(OPS)}")
        if op in NEEDS_MODEL and not model:
            raise InvalidInput(f"model_manager: op {op!r} needs a model")
        if payload is not None and not isinstance(payload, dict):
            raise InvalidInput("model_manager: payload must be a JSON object")
        try:
            return getattr(self, f"_{op}")(model, payload or {})
        except LifecycleError as e:
            raise InvalidInput(str(e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"model_manager: bad payload for {op}: {e}") from None

    # ------------------------------------------------------------------------------------------- ops
    def _acquire(self, model, p):
        return self.manager.acquire(model).to_dict()

    def _release(self, model, p):
        latency = p.get("latency_ms")
        return {"released": self.manager.release(str(p["lease"]), ok=bool(p.get("ok", True)),
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
        self.manager.set_mode(str(p["mode"]), p.get("phases"), None if cyclic is None else bool(cyclic))
        return {"mode": self.manager.mode, "phases": list(self.manager.phases), "cyclic": self.manager.cyclic}

    def _configure(self, model, p):
        p = dict(p)
        budget = None
        if "budget_bytes" in p or "safety_buffer" in p:
            current = self.manager.budget
            budget = MemoryBudget(parse_bytes(p.pop("budget_bytes", current.total_bytes)),
                                  float(p.pop("safety_buffer", current.safety_buffer)))
        self.manager.configure(budget=budget, **p)
        status = self.manager.status()
        return {k: status[k] for k in ("budget", "used_bytes", "headroom_bytes", "cooldown_s", "parallel_loads")}

    def _canary_start(self, model, p):
        engine_dir = p.get("engine_dir")
        info = engine_info(self.resolve_engine_dir(model, engine_dir)) if engine_dir else None
        kwargs = {k: p[k] for k in ("share", "min_requests", "promote_after", "max_error_rate",
                                    "max_latency_ratio", "stable") if k in p}
        return self.manager.canary_start(model, int(p["version"]), engine_info=info, **kwargs)

    def _canary_route(self, model, p):
        return {"version": self.manager.canary_route(model)}

    def _canary_report(self, model, p):
        latency = p.get("latency_ms")
        return {"decision": self.manager.canary_record(
            model, int(p["version"]), bool(p["ok"]), None if latency is None else float(latency) / 1000,
            p.get("error"))}

    def _canary_status(self, model, p):
        m = self.manager.status()["models"].get(model)
        if m is None:
            raise InvalidInput(f"{model!r} is not a managed model")
        return {k: m[k] for k in ("canary_state", "canary", "last_canary", "versions", "rollout", "blocked")}

    def _rollback(self, model, p):
        return self.manager.rollback(model, str(p.get("root_cause", "")))

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
