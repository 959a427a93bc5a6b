"""requirements-triton-models.txt is complete: a fresh venv made from exactly that file (CPU wheels, no torch) runs
every Python model the production image serves (tests/runtime/exercise_models.py).

The venv is cached under build/ keyed by the file's hash (and the interpreter), so only a changed file pays for
pip again. It needs a package index (pip's local caches make it fast); RAGSTACK_OFFLINE=1 skips it on a machine
without one. CI here runs it.
"""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements-triton-models.txt"
TINY = ROOT / "build" / "models" / "tiny"
PYTHON = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else sys.executable

pytestmark = [pytest.mark.runtime_env, pytest.mark.timeout(900),
              pytest.mark.skipif(os.environ.get("RAGSTACK_OFFLINE") == "1",
                                 reason="RAGSTACK_OFFLINE=1: no package index to build the venv from")]


def _venv() -> Path:
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + PYTHON.encode()).hexdigest()[:16]
    venv = ROOT / "build" / f"runtime-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([PYTHON, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar",
                             "off", "-q", "-r", str(REQUIREMENTS)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (venv / ".complete").write_text(REQUIREMENTS.read_text())
    return venv


def test_a_venv_from_exactly_the_file_runs_every_python_model():
    assert TINY.is_dir(), "build the tiny model set first: .venv/bin/python tools/build_models.py all"
    venv = _venv()
    python = venv / "bin" / "python"
    # Nothing but the file: no torch, no tensorrt (the container brings those), not the project's dev packages.
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "torch==" not in listed and "tensorrt" not in listed
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([str(python), "-I", str(ROOT / "tests" / "runtime" / "exercise_models.py"), str(ROOT),
                             str(TINY)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "every Python model's core path ran" in result.stdout
