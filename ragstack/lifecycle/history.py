"""Version history of each engine: what is served now, what it replaced, and every rollout step (JSON file).

The file is the manager's memory across restarts: the version it loads a model at, and the lineage a rollback
walks back. ``lineage`` is a stack of promoted versions (``lineage[-1]`` is current); a promotion pushes, a
rollback pops, so repeated rollbacks go back one promotion at a time. Every step is appended to ``log`` with
its reason, and each version keeps the engine folder and manifest identity it was rolled out with.

Writes are atomic (temp file + rename): a crash leaves the previous file, never half of one.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Union

SCHEMA = 1


def _utc(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def engine_info(engine_dir: Union[None, str, Path]) -> dict:
    """Identity of an engine folder from its build manifest (engine hash, quantisation), if it has one."""
    if not engine_dir:
        return {}
    info = {"engine_dir": str(engine_dir)}
    try:
        from ragstack.governance.manifest import MANIFEST_FILE, read_manifest

        path = Path(engine_dir) / MANIFEST_FILE
        if path.is_file():
            m = read_manifest(path)
            info.update(manifest=str(path), engine_hash=m.engine_hash, quantisation=m.quantisation)
    except Exception as e:  # noqa: BLE001 - identity is informative; a bad manifest must not block a rollout
        info["manifest_error"] = f"{type(e).__name__}: {e}"
    return info


class VersionHistory:
    def __init__(self, path: Union[None, str, Path] = None, clock: Callable[[], float] = time.time):
        self.path = Path(path) if path else None
        self._clock = clock
        self._lock = threading.Lock()
        self._data = {"schema": SCHEMA, "models": {}}
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(f"{self.path}: version history schema {data.get('schema')!r}, expected {SCHEMA}")
            self._data = data

    # ----------------------------------------------------------------------------------------- queries
    def _model(self, model: str) -> dict:
        return self._data["models"].setdefault(model, {"lineage": [], "versions": {}, "log": []})

    def current(self, model: str) -> Optional[int]:
        with self._lock:
            lineage = self._data["models"].get(model, {}).get("lineage", [])
            return lineage[-1] if lineage else None

    def previous(self, model: str) -> Optional[int]:
        """The version the current one replaced (what a rollback restores), or None."""
        with self._lock:
            lineage = self._data["models"].get(model, {}).get("lineage", [])
            return lineage[-2] if len(lineage) >= 2 else None

    def version_info(self, model: str, version: int) -> dict:
        with self._lock:
            return dict(self._data["models"].get(model, {}).get("versions", {}).get(str(version), {}))

    def log(self, model: str) -> list:
        with self._lock:
            return list(self._data["models"].get(model, {}).get("log", []))

    def to_dict(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self._data))

    # ------------------------------------------------------------------------------------------ updates
    def _append(self, model: str, action: str, **fields) -> dict:
        entry = {"utc": _utc(self._clock()), "action": action, **fields}
        self._model(model)["log"].append(entry)
        return entry

    def _remember(self, model: str, version: int, info: Optional[dict]) -> None:
        versions = self._model(model)["versions"]
        if info or str(version) not in versions:
            versions[str(version)] = {**versions.get(str(version), {}), **(info or {})}

    def ensure_current(self, model: str, version: int, info: Optional[dict] = None) -> None:
        """Start a lineage at ``version`` if the model has none yet (the version served before any rollout)."""
        with self._lock:
            m = self._model(model)
            if not m["lineage"]:
                m["lineage"].append(int(version))
                self._remember(model, version, info)
                self._append(model, "baseline", version=int(version))
                self._save()

    def canary_started(self, model: str, stable: int, canary: int, info: Optional[dict] = None,
                       **settings) -> None:
        with self._lock:
            self._remember(model, canary, info)
            self._append(model, "canary_start", stable=int(stable), canary=int(canary), **settings)
            self._save()

    def canary_aborted(self, model: str, stable: int, canary: int, root_cause: str, stats: dict,
                       trigger: str) -> None:
        with self._lock:
            self._append(model, "canary_rollback", from_version=int(canary), to_version=int(stable),
                         root_cause=root_cause, trigger=trigger, stats=stats)
            self._save()

    def promoted(self, model: str, from_version: int, to_version: int, reason: str, stats: dict) -> None:
        with self._lock:
            m = self._model(model)
            if not m["lineage"] or m["lineage"][-1] != int(from_version):
                m["lineage"].append(int(from_version))
            m["lineage"].append(int(to_version))
            self._append(model, "promote", from_version=int(from_version), to_version=int(to_version),
                         reason=reason, stats=stats)
            self._save()

    def rolled_back(self, model: str, from_version: int, to_version: int, root_cause: str,
                    trigger: str) -> None:
        """A rollback of a promoted version: the lineage goes back one promotion."""
        with self._lock:
            m = self._model(model)
            if m["lineage"] and m["lineage"][-1] == int(from_version):
                m["lineage"].pop()
            if not m["lineage"] or m["lineage"][-1] != int(to_version):
                m["lineage"].append(int(to_version))
            self._append(model, "rollback", from_version=int(from_version), to_version=int(to_version),
                         root_cause=root_cause, trigger=trigger)
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)
