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
    paths = ["ragstack", "ragstack_dev", "tools", "bls_models", "model_repository", "tests", "engine_builds", "benchmarks",
             "monitoring"]
    result = subprocess.run([ruff, "check", "--select", "F,E9", "--no-cache", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_code_points_to_design_documents_outside_the_repository():
    """Comments state the behaviour, or point to docs/design-notes.md: never to "spec 00x" or "Module N", which
    name documents this repository does not have."""
    import re

    pattern = re.compile(r"\b[Ss]pecs? 00\d|\bspec-00\d|\bModule \d\b")
    found = []
    for top in ("ragstack", "ragstack_dev", "tools", "bls_models", "model_repository", "tests", "engine_builds", "benchmarks",
                "monitoring"):
        for path in (ROOT / top).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and path.name != "test_lint.py":
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
