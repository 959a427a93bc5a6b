"""The Triton side of the lifecycle manager: loaders, warm-up, metrics and events.

``pb`` is ``triton_python_backend_utils``, passed in (this module imports nothing from Triton, so it imports
in unit tests). Used only by ``bls_models/model_manager``.

Three loaders, chosen by the manager's ``load_api`` parameter:

* ``grpc`` (default) / ``http``: Triton's model-repository extension on the server's own ports (loopback):
  load (with the config override), unload, model ready. A failed load is an error reply and nothing else.
  gRPC is the default: over HTTP a load holds one of the server's HTTP worker threads, and requests on a
  keep-alive connection pinned to that thread wait for the load (seen: a 12 s ``status``).
* ``pb``: the Python backend's Model Loading API (``pb.load_model`` / ``unload_model`` / ``is_model_ready``).
  Seen on Triton 2.51 (the pytriton 0.7.0 build): **a pb.load_model that fails (the model does not exist,
  or its initialize raises) aborts tritonserver** (``boost::interprocess::lock_exception`` in the Python
  backend), and so does an ``is_model_ready`` that errors (before the server is ready) followed by a custom
  metric update in the same stub. A broken canary or a bad engine must not take the server down, hence the
  default. ``pb.load_model`` also holds the calling stub's GIL for the whole load, so this loader runs the
  calls in a helper model, ``model_manager_loader``, created through the file override from
  ``bls_models/model_manager/loader.py``: the manager keeps answering during a load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ragstack.contracts import tensors as contracts
from ragstack import settings as rs
from ragstack.triton import adapter as ta
from ragstack.triton.metrics import MetricRegistry
from ragstack.lifecycle.budget import GiB, MemoryBudget, parse_bytes

log = logging.getLogger("ragstack.lifecycle")

LOADER_MODEL = "model_manager_loader"
LOADER_SOURCE = Path(__file__).resolve().parents[2] / "bls_models" / "model_manager" / "loader.py"


def local_host() -> str:
    """Where this server's own ports answer from inside it (``Settings.local_host``)."""
    return rs.current().local_host


ROOT = Path(__file__).resolve().parents[2]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".plan", ".engine", ".onnx", ".data", ".gguf", ".pt")


# ------------------------------------------------------------------------------------------ repositories
def default_repositories(extra: Iterable = ()) -> list:
    """Where engine folders (``<repo>/<model>/config.pbtxt``) are looked up, first match wins."""
    repos = [Path(p) for p in extra if p] + rs.current().engine_repositories()
    seen, out = set(), []
    for r in repos:
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def model_dir(model: str, repos: Iterable) -> Path:
    for repo in repos:
        if (Path(repo) / model / "config.pbtxt").is_file():
            return Path(repo) / model
    raise FileNotFoundError(f"no config.pbtxt for {model!r} in {[str(r) for r in repos]}")


def read_config(model: str, repos: Iterable):
    """The model's config.pbtxt as Triton's ModelConfig message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse((model_dir(model, repos) / "config.pbtxt").read_text(), mc.ModelConfig())


RELOAD_PARAMETER = "reload_generation"


def config_json(model: str, versions: Iterable, repos: Iterable, fresh: bool = False) -> str:
    """The model's own config as a load-time override: with ``version_policy { specific { versions } }`` when
    versions are given; with a new ``reload_generation`` parameter when ``fresh`` (see :meth:`_LoaderBase.reload`)."""
    from google.protobuf import json_format

    cfg = read_config(model, repos)
    versions = list(versions)
    if versions:
        cfg.version_policy.Clear()
        cfg.version_policy.specific.versions.extend(int(v) for v in versions)
    if fresh:
        cfg.parameters[RELOAD_PARAMETER].string_value = str(time.time_ns())
    return json_format.MessageToJson(cfg, preserving_proto_field_name=True, indent=None)


def engine_dir_of(model: str, repos: Iterable) -> Optional[Path]:
    """The engine folder a model serves (its ``engine_dir`` parameter, relative to ENGINE_PATH)."""
    try:
        cfg = read_config(model, repos)
    except Exception:  # noqa: BLE001 - no config, no seed: the default seed applies
        return None
    value = cfg.parameters.get("engine_dir")
    if value is None or not value.string_value:
        return None
    try:
        path = ta.engine_dir_path(value.string_value)
    except RuntimeError:              # relative, and no ENGINE_PATH
        return None
    return path if path.is_dir() else None


def seed_bytes(engine_dir: Optional[Path], base_bytes: int, weight_factor: float = 1.0) -> int:
    """Footprint estimate before the first load: the weights the manifest lists (else the weight files on
    disk) times ``weight_factor``, plus the per-process base (Python stub with torch on the reference)."""
    if engine_dir is None:
        return base_bytes
    names = []
    try:
        from ragstack.governance.manifest import MANIFEST_FILE, read_manifest

        if (engine_dir / MANIFEST_FILE).is_file():
            names = list(read_manifest(engine_dir).files)
    except Exception:  # noqa: BLE001 - a manifest this code cannot read still leaves the files
        names = []
    files = [engine_dir / n for n in names] if names else \
        [p for p in engine_dir.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    weights = sum(p.stat().st_size for p in files if p.is_file())
    return base_bytes + int(weights * weight_factor)


def auto_budget_bytes() -> int:
    """Device memory (NVML) when there is a GPU, else half the machine's memory (the reference profile)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: the CPU reference profile
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 * GiB


def nvml_used_bytes(index: int = 0) -> Optional[int]:
    """Device memory in use (NVML), or None without a GPU / pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: the CPU reference profile
        return None


# ----------------------------------------------------------------------------------------------- warm-up
WARMUP_IDS = np.array([[1, 2, 3, 4]], dtype=np.int32)


def _warm_embed(pb) -> None:
    ta.bls_infer(pb, "embed", {"input_ids": WARMUP_IDS.astype(np.int32),
                               "attention_mask": np.ones_like(WARMUP_IDS).astype(np.int32)}, ["embedding"])


def _warm_rerank(pb) -> None:
    ta.bls_infer(pb, "rerank", {"input_ids": WARMUP_IDS.astype(np.int32),
                                "attention_mask": np.ones_like(WARMUP_IDS).astype(np.int32)}, ["score"])


def _warm_generate(pb) -> None:
    from ragstack.contracts.trtllm import generate_inputs

    inputs = generate_inputs(WARMUP_IDS[0], 1, 0, 0, return_perf_metrics=False)
    for _ in ta.bls_stream(pb, "generate", inputs, ["output_ids", "sequence_length"]):
        pass


WARMUPS = {"embed": _warm_embed, "rerank": _warm_rerank, "generate": _warm_generate}


def run_warmup(pb, model: str) -> None:
    """One tiny request through the engine (a model without a known contract is not warmed up).

    The request takes Triton's default version (the newest loaded): the version just loaded, restored or
    promoted (one version loaded), or the canary (the newer of two); ``ragstack.triton.adapter`` has no
    ``model_version`` argument yet. No ``pb.is_model_ready`` here: a Model Loading API call that fails can take
    the server down (see the module doc); the request itself fails if the engine is not ready.
    """
    warm = WARMUPS.get(model)
    if warm is not None:
        warm(pb)


# ---------------------------------------------------------------------------------------------- loaders
class _LoaderBase:
    concurrent_loads = False     # may several threads load (different models) at once?

    def __init__(self, pb, repos, probe=None, unload_timeout_s: float = 60.0):
        self.pb, self.repos, self.probe = pb, list(repos), probe
        self.unload_timeout_s = unload_timeout_s

    def _config(self, model: str, versions, fresh: bool = False) -> str:
        return config_json(model, versions, self.repos, fresh) if (versions or fresh) else ""

    def load(self, model: str, versions, fresh: bool = False) -> Optional[int]:
        """Load, and return the device memory the load took (NVML delta) on a GPU; None on the CPU profile,
        where the manager reads each model's stub processes instead. ``fresh``: see :meth:`reload`."""
        before = nvml_used_bytes()
        self._load(model, versions, fresh)
        after = nvml_used_bytes() if before is not None else None
        return max(0, after - before) if after is not None else None

    def reload(self, model: str, versions=()) -> Optional[int]:
        """Replace a loaded model with new instances (the heal of a dead stub), *without* unloading it first.

        Two facts of Triton 2.51 make this the only safe way: loading a model whose config has not changed is a
        no-op (the dead instance would stay), so the override carries a new ``reload_generation`` parameter;
        and unloading a model whose stub died during a BLS call never finishes (the Python backend waits
        forever for the dead stub to acknowledge the call's response, and the instance's thread pool joins that
        thread), so an unload-then-load would never reach the load. A reload swaps the new instances in as soon
        as they are ready (ensembles over the model follow) and retires the old ones in the background.
        """
        return self.load(model, versions, fresh=True)

    def _wait_gone(self, model: str) -> None:
        """Unload returns before the stubs exit: wait until the memory is really free."""
        if self.probe is None:
            return
        deadline = time.monotonic() + self.unload_timeout_s
        while model in self.probe.snapshot():
            if time.monotonic() > deadline:
                log.warning("%s: stubs still alive %.0f s after unload", model, self.unload_timeout_s)
                return
            time.sleep(0.05)

    def is_ready(self, model: str) -> bool:
        return bool(self.pb.is_model_ready(model_name=model))

    def warmup(self, model: str, version: int) -> None:
        run_warmup(self.pb, model)


class InlineLoader(_LoaderBase):
    """``pb.load_model`` in the manager's own stub (holds its GIL during the load)."""

    def _load(self, model: str, versions, fresh: bool = False) -> None:
        self.pb.load_model(model_name=model, config=self._config(model, versions, fresh))
        if not self.pb.is_model_ready(model_name=model):
            raise RuntimeError(f"{model} is not ready after load")

    def unload(self, model: str) -> None:
        self.pb.unload_model(model_name=model, unload_dependents=False)
        self._wait_gone(model)


class HttpLoader(_LoaderBase):
    """Loads through the server's own repository API on loopback (see the module doc for why)."""

    concurrent_loads = True      # one urllib request per call; Triton loads models in parallel

    def __init__(self, pb, repos, probe=None, unload_timeout_s: float = 60.0, url: Optional[str] = None,
                 admin_key: Optional[str] = None, load_timeout_s: float = 600.0):
        super().__init__(pb, repos, probe, unload_timeout_s)
        settings = rs.current()
        self.url = (url or f"http://{local_host()}:{settings.loader_http_port}").rstrip("/")
        self.admin_key = admin_key if admin_key is not None else settings.triton_admin_key
        self.load_timeout_s = load_timeout_s

    def _request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 30.0):
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.admin_key:
            headers["admin-key"] = self.admin_key
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _load(self, model: str, versions, fresh: bool = False) -> None:
        config = self._config(model, versions, fresh)
        body = {"parameters": {"config": config}} if config else None
        status, text = self._request("POST", f"/v2/repository/models/{model}/load", body, self.load_timeout_s)
        if status != 200:
            raise RuntimeError(_error_text(text) or f"HTTP {status}")

    def unload(self, model: str) -> None:
        status, text = self._request("POST", f"/v2/repository/models/{model}/unload",
                                     {"parameters": {"unload_dependents": False}})
        if status != 200:
            raise RuntimeError(_error_text(text) or f"HTTP {status}")
        self._wait_gone(model)

    def is_ready(self, model: str) -> bool:
        status, _ = self._request("GET", f"/v2/models/{model}/ready", timeout=5.0)
        return status == 200


class GrpcLoader(_LoaderBase):
    """Loads through the server's own gRPC repository service on loopback.

    Preferred over HTTP: Triton's HTTP server pins each connection to one of its worker threads, and a
    load request occupies its thread until the load is done, so a client whose keep-alive connection shares
    that thread (an ``acquire`` poll!) would wait for an unrelated load. The gRPC repository calls are served
    apart from inference requests. Concurrent loads of different models run in parallel in Triton (seen: embed
    and rerank loaded together in 5 s on 2 cores, one after the other in 10 s).
    """

    concurrent_loads = True

    def __init__(self, pb, repos, probe=None, unload_timeout_s: float = 60.0, url: Optional[str] = None,
                 admin_key: Optional[str] = None, load_timeout_s: float = 600.0):
        super().__init__(pb, repos, probe, unload_timeout_s)
        settings = rs.current()
        self.url = url or f"{local_host()}:{settings.loader_grpc_port}"
        key = admin_key if admin_key is not None else settings.triton_admin_key
        self.headers = {"triton-grpc-protocol-admin-key": key} if key else None
        self.load_timeout_s = load_timeout_s
        self._client = None
        self._client_lock = threading.Lock()

    def _c(self):
        with self._client_lock:           # one channel, shared by the worker and the load threads
            if self._client is None:
                import tritonclient.grpc as grpcclient

                # The manager starts before the server listens: with gRPC's default reconnect backoff (up to
                # 120 s) the first refused connection left every readiness call failing for minutes (seen: the
                # stub watchdog adopted nothing under traffic). Reconnect within a second instead.
                size = grpcclient.MAX_GRPC_MESSAGE_SIZE
                self._client = grpcclient.InferenceServerClient(self.url, channel_args=[
                    ("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)])
            return self._client

    def _load(self, model: str, versions, fresh: bool = False) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._c().load_model(model, headers=self.headers, config=self._config(model, versions, fresh) or None,
                                 client_timeout=self.load_timeout_s)
        except InferenceServerException as e:
            raise RuntimeError(e.message() or str(e)) from None

    def unload(self, model: str) -> None:
        self._c().unload_model(model, headers=self.headers, unload_dependents=False)
        self._wait_gone(model)

    def is_ready(self, model: str) -> bool:
        return bool(self._c().is_model_ready(model, headers=self.headers, client_timeout=5.0))


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:500]


class HelperLoader(_LoaderBase):
    """``pb.load_model`` run by the helper model's stub, reached over BLS (see the module doc)."""

    def __init__(self, pb, repos, probe=None, unload_timeout_s: float = 60.0, source: Path = LOADER_SOURCE):
        super().__init__(pb, repos, probe, unload_timeout_s)
        self.source = Path(source)
        self._inline = InlineLoader(pb, repos, probe, unload_timeout_s)
        self._helper: Optional[bool] = None

    def ensure_helper(self) -> bool:
        if self._helper is None:
            try:
                ready = self.pb.is_model_ready(model_name=LOADER_MODEL)
            except Exception:
                raise                   # the server is not ready yet: try again later
            try:
                if not ready:
                    contract = dataclasses.replace(contracts.MODEL_MANAGER, name=LOADER_MODEL)
                    from google.protobuf import json_format

                    from ragstack.contracts.model_config import Deployment, to_proto

                    cfg = json_format.MessageToJson(to_proto(Deployment(contract)), preserving_proto_field_name=True)
                    self.pb.load_model(model_name=LOADER_MODEL, config=cfg,
                                       files={"file:1/model.py": self.source.read_bytes()})
                self._helper = True
            except Exception as e:  # noqa: BLE001 - fall back to loading inline
                log.error("could not create %s (%s): loads will block the manager while they run",
                          LOADER_MODEL, e)
                self._helper = False
        return self._helper

    def is_ready(self, model: str) -> bool:
        if not self.ensure_helper():
            return self._inline.is_ready(model)
        return bool(self._call("ready", model)["ready"])

    def _call(self, op: str, model: str, payload: Optional[dict] = None) -> dict:
        out = ta.bls_infer(self.pb, "model_manager_loader", {
            "op": contracts.one_string(op), "model": contracts.one_string(model),
            "payload": contracts.one_string(json.dumps(payload or {}))}, ["result"])
        return json.loads(out["result"].reshape(-1)[0])

    def _load(self, model: str, versions, fresh: bool = False) -> None:
        if not self.ensure_helper():
            return self._inline._load(model, versions, fresh)
        self._call("load", model, {"config": self._config(model, versions, fresh)})

    def unload(self, model: str) -> None:
        if not self.ensure_helper():
            return self._inline.unload(model)
        self._call("unload", model)
        self._wait_gone(model)


# ----------------------------------------------------------------------------------------- metrics/events
LOAD_BUCKETS = [0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]
LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30]
COMPONENT = "engines"

# name: (kind, help, label names). Triton exports a family under exactly this name (it appends no ``_total``),
# so counters carry the Prometheus suffix themselves.
FAMILIES = {
    "llm_model_load_seconds": ("GAUGE", "Duration of the latest load of each model", ("model",)),
    "llm_model_load_duration_seconds": ("HISTOGRAM", "Model load durations", ("model",)),
    "llm_model_loads_total": ("COUNTER", "Model loads by the lifecycle manager", ("model", "reason")),
    "llm_model_unloads_total": ("COUNTER", "Model unloads by the lifecycle manager", ("model", "reason")),
    "llm_model_evictions_total": ("COUNTER", "Models evicted (LRU) to fit the memory budget", ("model",)),
    "llm_model_heals_total": ("COUNTER", "Models reloaded after their stub died", ("model",)),
    "llm_models_resident": ("GAUGE", "Managed models resident now", ()),
    "llm_model_resident_bytes": ("GAUGE", "Measured memory of each resident model", ("model",)),
    "llm_memory_used_bytes": ("GAUGE", "Resident memory of a serving process (stub or server)", ("component",)),
    "llm_memory_budget_bytes": ("GAUGE", "The memory budget of the same component", ("component",)),
    "llm_memory_headroom_bytes": ("GAUGE", "What is left under the high-watermark", ("component",)),
    "llm_model_version_requests_total": ("COUNTER", "Leased requests per engine version and outcome",
                                   ("model", "version", "outcome")),
    "llm_model_version_latency_seconds": ("HISTOGRAM", "Leased request latency per engine version",
                                          ("model", "version")),
    "llm_lifecycle_alerts_total": ("COUNTER", "Lifecycle alerts (slow load, oscillation, dead stub, ...)", ("alert",)),
    # Triton 2.51 keeps reporting a model ready while one of its Python stubs is dead: this says the truth.
    "llm_model_stub_healthy": ("GAUGE", "0 from the death of one of the model's Python stubs until its reload, "
                                        "else 1 (models that died at least once)", ("model",)),
}


class TritonSink(MetricRegistry):
    """Metrics (pb.MetricFamily, referenced for the process's life) and events (ragstack.governance.events.EventLog)."""

    def __init__(self, pb, events=None):
        super().__init__(pb, FAMILIES)
        self._resident_models = set()
        self.events = events

    def _emit(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)

    # LifecycleSink
    def loaded(self, model, seconds, footprint_bytes, reason):
        self.metric("llm_model_load_seconds", model=model).set(seconds)
        self.metric("llm_model_load_duration_seconds", LOAD_BUCKETS, model=model).observe(seconds)
        self.metric("llm_model_loads_total", model=model, reason=reason).increment(1)

    def unloaded(self, model, reason):
        self.metric("llm_model_unloads_total", model=model, reason=reason).increment(1)
        if reason == "evict":
            self.metric("llm_model_evictions_total", model=model).increment(1)

    def healed(self, model, seconds):
        self.metric("llm_model_heals_total", model=model).increment(1)
        self.metric("llm_model_stub_healthy", model=model).set(1)
        from ragstack.governance.events import OBSERVABILITY_ALERT

        self._emit(OBSERVABILITY_ALERT, alert="model_stub_recovered", model=model,
                   recovered_in_s=round(seconds, 3), severity="info")

    def alert(self, alert, **fields):
        from ragstack.governance.events import OBSERVABILITY_ALERT

        self.metric("llm_lifecycle_alerts_total", alert=alert).increment(1)
        if alert == "model_stub_died" and fields.get("model"):
            self.metric("llm_model_stub_healthy", model=fields["model"]).set(0)
        severity = "critical" if alert in ("model_stub_died", "rollback_failed") else "warning"
        self._emit(OBSERVABILITY_ALERT, alert=alert, severity=severity, **fields)

    def rollback_completed(self, **fields):
        from ragstack.governance.events import ROLLBACK_COMPLETED

        self._emit(ROLLBACK_COMPLETED, **fields)

    def promoted(self, **fields):
        from ragstack.governance.events import OBSERVABILITY_ALERT

        self._emit(OBSERVABILITY_ALERT, alert="canary_promoted", severity="info", **fields)

    def request(self, model, version, ok, latency_s):
        self.metric("llm_model_version_requests_total", model=model, version=version,
                outcome="ok" if ok else "error").increment(1)
        if latency_s is not None:
            self.metric("llm_model_version_latency_seconds", LATENCY_BUCKETS, model=model,
                    version=version).observe(latency_s)

    def usage(self, used_bytes, budget: MemoryBudget, resident):
        self.metric("llm_models_resident").set(len(resident))
        self.metric("llm_memory_used_bytes", component=COMPONENT).set(used_bytes)
        self.metric("llm_memory_budget_bytes", component=COMPONENT).set(budget.total_bytes)
        self.metric("llm_memory_headroom_bytes", component=COMPONENT).set(budget.headroom(used_bytes))
        for model in self._resident_models | set(resident):
            self.metric("llm_model_resident_bytes", model=model).set(resident.get(model, 0))
        self._resident_models |= set(resident)


# ------------------------------------------------------------------------------------------------ wiring
def build_manager(pb, args: dict):
    """The manager of a ``model_manager`` instance from its config parameters; started, models adopted."""
    from ragstack.governance.events import EventLog
    from ragstack.lifecycle.history import VersionHistory
    from ragstack.lifecycle.manager import ModelManager, ModelSpec
    from ragstack.lifecycle.procmem import ProcMemoryProbe
    from ragstack.lifecycle.service import ManagerService
    from ragstack.lifecycle.watchdog import DEFAULT_WATCHED, StubWatchdog
    from ragstack.governance.policy import RuntimePolicy

    settings = rs.current()
    p = rs.ManagerParams.from_parameters(ta.model_parameters(args))
    models = list(p.managed_models)
    repos = default_repositories(p.model_repositories)
    probe = ProcMemoryProbe(os.getppid(), p.memory_metric)
    budget_text = settings.memory_budget or p.memory_budget
    total = auto_budget_bytes() if budget_text == "auto" else parse_bytes(budget_text)
    budget = MemoryBudget(total, p.safety_buffer)
    specs = []
    for name in models:
        engine_dir = engine_dir_of(name, repos)
        specs.append(ModelSpec(name, seed_bytes(engine_dir, p.seed_base_bytes, p.seed_weight_factor),
                               str(engine_dir) if engine_dir else None))
    history_path = Path(p.history_path)
    if not history_path.is_absolute():
        history_path = settings.data_base / history_path
    try:
        policy = RuntimePolicy.load(settings.policy_file)
        events = EventLog.from_settings(policy.events, base_dir=settings.data_base)
    except Exception as e:  # noqa: BLE001 - no policy file: events only where the environment says
        log.warning("runtime policy not loaded (%s): events go to $RAGSTACK_EVENT_LOG only", e)
        events = EventLog(settings.event_log or None)
    if p.load_api == "pb":
        loader = HelperLoader(pb, repos, probe, p.unload_timeout_s)
    elif p.load_api == "http":
        loader = HttpLoader(pb, repos, probe, p.unload_timeout_s, url=p.server_url)
    else:
        loader = GrpcLoader(pb, repos, probe, p.unload_timeout_s, url=p.server_url)
    manager = ModelManager(
        specs, budget=budget, loader=loader, probe=probe, sink=TritonSink(pb, events),
        history=VersionHistory(history_path), mode=p.mode, phases=p.phases, cooldown_s=p.cooldown_s,
        lease_ttl_s=p.lease_ttl_s, slow_load_s=p.slow_load_s, tick_s=p.tick_s,
        parallel_loads=p.parallel_loads if loader.concurrent_loads else 1)

    def resolve(model, value):
        try:
            return ta.engine_dir_path(value)
        except RuntimeError:          # relative, and no ENGINE_PATH: as given
            return Path(value)

    # Every other Python model of the server is watched for dead stubs and reloaded (never budgeted).
    watched = [m for m in (p.watched_models or DEFAULT_WATCHED) if m not in models]
    watchdog = StubWatchdog(watched, probe=probe, loader=loader, sink=manager.sink, tick_s=p.tick_s)
    manager.start()        # its first ticks adopt the engines Triton loaded at start (once the server is up)
    watchdog.start()
    return manager, ManagerService(manager, resolve, watchdog), events
