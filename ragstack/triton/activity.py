"""Which urgent requests are in flight in this server, so that background work can run in the gaps.

Triton's priority queues order the requests that *wait* for a model; on a CPU (the reference profile, 2 cores) the
interference of a bulk ingest with a query is mostly elsewhere: the two run at once on different models (the
ingest's embed batches, the query's decode steps) and share the cores. So background work also yields: before
each engine batch it waits, up to a bound, until no urgent request is in flight (:meth:`ActivityBoard.wait_quiet`).
The bound keeps background work from starving: it always makes progress, at least one batch per bound.

The board is one tiny file per process (the count of urgent requests that process has in flight, as fixed-width
decimal text) in a folder named after the server's PID (the stubs' parent), on tmpfs when there is one. The
process maps its file into memory once, so marking a request is a 12-byte store (no system call on the request's
path: a write and a rename per begin and end cost ~0.2 ms each, measured in the orchestrator stub); a reader sums
the files of live processes (a stub that died leaves a file that is ignored and removed). Nothing here imports
Triton.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

DIR_ENV = "RAG_ACTIVITY_DIR"
WIDTH = 12          # digits of a count: a reader parses the file as text


def default_root() -> Path:
    from ragstack.settings import current

    base = current().activity_dir
    if base is not None:
        return base
    shm = Path("/dev/shm")
    if not shm.is_dir():
        import tempfile                  # only here: it imports shutil, random and the compression modules

        shm = Path(tempfile.gettempdir())
    return shm / f"ragstack-activity-{os.getppid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ActivityBoard:
    def __init__(self, root: Optional[Path] = None, pid: Optional[int] = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.pid = pid if pid is not None else os.getpid()
        self._path = self.root / str(self.pid)
        self._lock = threading.Lock()
        self._count = 0
        self._map: Optional[mmap.mmap] = None

    # ------------------------------------------------------------------------------------- urgent side
    def _write(self) -> None:
        if self._map is None:       # first use: the file is created whole (a reader never sees it half-written)
            tmp = self.root / f".{self.pid}.{threading.get_ident()}"
            tmp.write_bytes(b"%0*d" % (WIDTH, 0))
            os.replace(tmp, self._path)
            with open(self._path, "r+b") as f:
                self._map = mmap.mmap(f.fileno(), WIDTH)
        self._map[:WIDTH] = b"%0*d" % (WIDTH, self._count)

    def begin(self) -> None:
        with self._lock:
            self._count += 1
            self._write()

    def end(self) -> None:
        with self._lock:
            self._count = max(0, self._count - 1)
            self._write()

    @contextlib.contextmanager
    def urgent(self):
        """Marks one urgent request in flight for the duration of the block."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def close(self) -> None:
        """This process is done: its entry goes (the folder stays; others may still use it)."""
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)

    # --------------------------------------------------------------------------------- background side
    def in_flight(self) -> int:
        """Urgent requests in flight in every live process of this server."""
        total = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid != self.pid and not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            try:
                total += int(Path(entry.path).read_text() or 0)
            except (OSError, ValueError):
                continue
        return total

    def wait_quiet(self, max_wait_s: float, poll_s: float = 0.01, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> float:
        """Wait until no urgent request is in flight, at most ``max_wait_s``; returns the seconds waited."""
        if max_wait_s <= 0:
            return 0.0
        start = clock()
        while self.in_flight() > 0:
            waited = clock() - start
            if waited >= max_wait_s:
                return waited
            sleep(min(poll_s, max_wait_s - waited))
        return clock() - start
