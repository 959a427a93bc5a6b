"""Start and stop a real tritonserver through tools/serve_triton.sh (tests, benchmarks, the demo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "tools" / "serve_triton.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AccessKeys:
    """Keys for the servers this process starts (tests, benchmarks, the demo): one admin key, one writer key and
    one internal secret in 0600 files of a 0700 folder, shared by every server of the process; and an empty
    reader-key file (reading stays open until a key is written into it: the servers re-read it)."""

    def __init__(self):
        import secrets
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="ragstack-keys-"))
        os.chmod(self.dir, 0o700)
        self.admin_key, self.writer_key, self.internal = (secrets.token_hex(24) for _ in range(3))
        for name, value in (("admin_key", self.admin_key), ("writer_keys", self.writer_key),
                            ("internal_secret", self.internal), ("reader_keys", None)):
            path = self.dir / name
            path.touch(0o600)
            path.write_text(value + "\n" if value else "")

    def env(self) -> dict:
        return {"RAG_ADMIN_KEY_FILE": str(self.dir / "admin_key"), "RAG_WRITER_KEY_FILE": str(self.dir / "writer_keys"),
                "RAG_API_KEY_FILE": str(self.dir / "reader_keys"),
                "RAG_INTERNAL_SECRET_FILE": str(self.dir / "internal_secret")}

    def headers(self, internal: bool = True) -> dict:
        """What an operator's client sends: the admin key (and, to reach internal models, the internal proof)."""
        out = {"x-api-key": self.admin_key}
        if internal:
            out["x-ragstack-internal"] = self.internal
        return out


_KEYS: Optional[AccessKeys] = None


def access_keys() -> AccessKeys:
    global _KEYS
    if _KEYS is None:
        _KEYS = AccessKeys()
    return _KEYS


class TritonProcess:
    """One tritonserver process on free loopback ports; its log goes to ``log_path``."""

    def __init__(self, engine_path: Path, load_models: str = "*", log_path: Optional[Path] = None,
                 env: Optional[dict] = None, extra_args: tuple = ()):
        self.engine_path = Path(engine_path)
        self.load_models = load_models
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = Path(log_path or ROOT / "build" / "logs" / f"triton-{self.http_port}.log")
        self.env = env or {}
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 300.0) -> "TritonProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, ENGINE_PATH=str(self.engine_path), LOAD_MODELS=self.load_models,
                   TRITON_HTTP_PORT=str(self.http_port), TRITON_GRPC_PORT=str(self.grpc_port),
                   TRITON_METRICS_PORT=str(self.metrics_port), **{**access_keys().env(), **self.env})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["bash", str(LAUNCHER), *self.extra_args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()              # also after the process died by itself (or was killed by a test)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def progress(msg: str) -> None:
    print(f"[ragstack] {msg}", file=sys.stderr, flush=True)
