"""Per-model memory and liveness on the reference profile, read from /proc (Linux; no Triton import).

Each Python-backend model instance runs in its own ``triton_python_backend_stub`` process, a child of
tritonserver, whose command line reads::

    .../triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> ... <model>_<group>_<index> DEFAULT

so the model, the version and the instance ("slot") of every stub can be read without asking Triton. A killed
stub disappears from the list (Triton reaps it), which is how a dead stub is noticed even though Triton 2.51
keeps reporting the model ready. Only children of *our* server are counted: other servers on the same machine
run stubs with the same command lines.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Dict, Iterable, Optional

STUB_NAME = "triton_python_backend_stub"
_INSTANCE = re.compile(r"^(?P<model>.+)_(?P<group>\d+)_(?P<index>\d+)$")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclasses.dataclass(frozen=True)
class StubProcess:
    pid: int
    model: str
    version: Optional[int]
    instance: str
    rss_bytes: int
    pss_bytes: Optional[int]
    start_ticks: int

    @property
    def slot(self) -> tuple:
        return (self.version, self.instance)


@dataclasses.dataclass(frozen=True)
class ModelUsage:
    """What one model's live stubs hold: bytes (newest process per slot) and the slots that are alive."""
    bytes: int
    slots: frozenset
    pids: tuple


def _children(server_pid: int, proc: Path) -> Iterable[int]:
    tasks = proc / str(server_pid) / "task"
    found = False
    pids = set()
    try:
        for task in tasks.iterdir():
            try:
                text = (task / "children").read_text()
                found = True
                pids.update(int(p) for p in text.split())
            except OSError:
                continue
    except OSError:
        return []
    if found:
        return sorted(pids)
    # No /proc/<pid>/task/<tid>/children (kernel without CONFIG_PROC_CHILDREN): scan every process's parent.
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _stat(entry)
            if stat and stat[1] == server_pid:
                out.append(int(entry.name))
    return out


def _stat(path: Path):
    """(state, ppid, start_ticks) from /proc/<pid>/stat, or None."""
    try:
        text = (path / "stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return rest[0], int(rest[1]), int(rest[19])


def _rss(path: Path) -> int:
    try:
        return int((path / "statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(path: Path) -> Optional[int]:
    try:
        for line in (path / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parse_stub_cmdline(args: list) -> Optional[tuple]:
    """(model, version, instance) from a stub's argv, or None if it is not a Python-backend stub."""
    if not args or not args[0].endswith(STUB_NAME) or len(args) < 3:
        return None
    model_file = Path(args[1])
    version = int(model_file.parent.name) if model_file.parent.name.isdigit() else None
    for arg in reversed(args[2:]):
        m = _INSTANCE.match(arg)
        if m:
            return m.group("model"), version, arg
    return model_file.parent.parent.name, version, model_file.parent.parent.name


def stub_processes(server_pid: int, proc: Path = Path("/proc"), with_pss: bool = False) -> list:
    """Every live Python-backend stub that is a child of ``server_pid``."""
    out = []
    for pid in _children(server_pid, proc):
        path = proc / str(pid)
        stat = _stat(path)
        if stat is None or stat[0] in ("Z", "X"):
            continue          # gone, or dead and not yet reaped
        try:
            args = [a for a in (path / "cmdline").read_bytes().decode("utf-8", "replace").split("\0") if a]
        except OSError:
            continue
        parsed = parse_stub_cmdline(args)
        if parsed is None:
            continue
        model, version, instance = parsed
        out.append(StubProcess(pid, model, version, instance, _rss(path), _pss(path) if with_pss else None,
                               stat[2]))
    return out


class ProcMemoryProbe:
    """The manager's memory probe on the reference profile: {model: ModelUsage} for one server's stubs.

    ``metric`` is ``rss`` (resident set, stable and conservative: shared libraries count in every stub) or
    ``pss`` (proportional set: shared pages divided among the processes sharing them; sums to the true total).
    When a model is reloaded, the old and new stub of a slot live side by side for a moment: only the newest
    process of each slot is counted.
    """

    def __init__(self, server_pid: Optional[int] = None, metric: str = "rss", proc: Path = Path("/proc")):
        if metric not in ("rss", "pss"):
            raise ValueError(f"memory metric must be rss or pss, got {metric!r}")
        self.server_pid = server_pid if server_pid is not None else os.getppid()
        self.metric = metric
        self.proc = Path(proc)

    def snapshot(self) -> Dict[str, ModelUsage]:
        newest: Dict[tuple, StubProcess] = {}
        for p in stub_processes(self.server_pid, self.proc, with_pss=self.metric == "pss"):
            key = (p.model, p.slot)
            if key not in newest or p.start_ticks > newest[key].start_ticks:
                newest[key] = p
        usage: Dict[str, list] = {}
        for (model, _), p in newest.items():
            usage.setdefault(model, []).append(p)
        out = {}
        for model, procs in usage.items():
            size = sum((p.pss_bytes if p.pss_bytes is not None else p.rss_bytes) if self.metric == "pss"
                       else p.rss_bytes for p in procs)
            out[model] = ModelUsage(size, frozenset(p.slot for p in procs), tuple(sorted(p.pid for p in procs)))
        return out
