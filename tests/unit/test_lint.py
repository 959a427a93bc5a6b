"""Static checks over the whole project: undefined names, unused imports/variables, syntax (ruff F, E9)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff not installed (tools/setup.sh installs it)")
    paths = ["ragstack", "tools", "bls_models", "model_repository", "tests", "engine_builds", "benchmarks",
             "monitoring"]
    result = subprocess.run([ruff, "check", "--select", "F,E9", "--no-cache", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
