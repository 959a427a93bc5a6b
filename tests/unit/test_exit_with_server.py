"""A stub ends when the tritonserver that started it is gone (ragstack.triton.adapter.exit_with_server): the\nwatcher process is real, the 'server' and 'stub' are sleep processes."""
import ast
import subprocess
import time
from pathlib import Path

import pytest

from ragstack.triton import adapter as ta
from ragstack_dev.soak import pid_alive

ROOT = Path(__file__).resolve().parents[2]



def _wait(cond, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.fixture
def procs():
    started = []

    def spawn():
        p = subprocess.Popen(["sleep", "300"])
        started.append(p)
        return p
    yield spawn
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_the_stub_is_killed_a_grace_period_after_the_server_is_gone(procs):
    server, stub = procs(), procs()
    watcher = ta.watch_server(server.pid, stub.pid, check_s=0.1, grace_s=1.0)
    time.sleep(0.5)
    assert pid_alive(stub.pid) and watcher.poll() is None      # the server lives: nothing happens
    server.kill()
    server.wait()
    t0 = time.monotonic()
    assert _wait(lambda: stub.poll() is not None, 10), "the stub outlived its server"
    assert time.monotonic() - t0 >= 0.9                      # the grace leaves the stub's own exit a chance
    assert stub.returncode == -9
    assert watcher.wait(5) == 0


def test_a_zombie_server_counts_as_gone(procs):
    server, stub = procs(), procs()
    watcher = ta.watch_server(server.pid, stub.pid, check_s=0.1, grace_s=0.2)
    server.kill()                                            # not reaped yet: a zombie still has /proc/<pid>
    assert _wait(lambda: stub.poll() is not None, 10)
    server.wait()
    assert watcher.wait(5) == 0


def test_the_watcher_ends_with_the_stub(procs):
    server, stub = procs(), procs()
    watcher = ta.watch_server(server.pid, stub.pid, check_s=0.1, grace_s=0.2)
    stub.kill()
    stub.wait()
    assert watcher.wait(5) == 0
    assert server.poll() is None                             # the server is never touched


def test_one_watcher_per_process():
    first = ta.exit_with_server()
    try:
        assert ta.exit_with_server() is first and first.poll() is None
    finally:
        first.kill()
        first.wait()
        ta._watcher = None


def _calls_exit_with_server(tree) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "exit_with_server" for n in ast.walk(tree))


def test_every_python_model_starts_the_guard_in_initialize():
    """Each model.py calls ta.exit_with_server() in initialize, or subclasses a core model whose initialize does."""
    core = {"OrchestratorModel": ROOT / "ragstack" / "triton" / "orchestrator.py"}
    for name, path in core.items():
        tree = ast.parse(path.read_text())
        init = next(n for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == name
                    for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "initialize")
        assert _calls_exit_with_server(init), f"{name}.initialize must call exit_with_server"
    models = sorted(ROOT.glob("bls_models/*/1/model.py")) + sorted(ROOT.glob("model_repository/*/*/1/model.py"))
    assert len(models) >= 10
    missing = []
    for path in models:
        tree = ast.parse(path.read_text())
        cls = next(c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "TritonPythonModel")
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "initialize"), None)
        bases = {getattr(b, "id", None) for b in cls.bases}
        if init is not None:
            ok = _calls_exit_with_server(init)
        else:
            ok = bool(bases & set(core))
        if not ok:
            missing.append(str(path.relative_to(ROOT)))
    assert missing == []
