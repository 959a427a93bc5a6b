"""Only the Triton layer imports ``triton_python_backend_utils``: everything else is plain Python.

The module exists only inside a Python-backend stub. The models' ``model.py`` files import it and pass it down as
an argument (``pb``) to ragstack, so the pipeline, index, lifecycle and policies import and test without Triton.
Only imports count here; a function that takes ``pb`` is fine.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRITON_MODULES = ("triton_python_backend_utils", "pb_utils")
SCANNED = ("ragstack", "ragstack_dev", "benchmarks", "tools", "engine_builds", "monitoring", "bls_models", "model_repository")
# Not a model.py, yet run by Triton as one: model_manager creates the model_manager_loader model from this file at
# run time (pb.load_model(..., files=...), ragstack/lifecycle/triton_io.py), so it needs pb of its own.
# benchmarks/floor_model/model.py: benchmarks/rag.py's no-op model, served from a model repository it writes.
ALLOWED = {"bls_models/model_manager/loader.py", "benchmarks/floor_model/model.py"}


def is_model_file(rel: Path) -> bool:
    """``<repo>/<model>/<version>/model.py`` in bls_models/ or ``model_repository/<profile>/``."""
    parts = rel.parts
    return rel.name == "model.py" and (
        (parts[0] == "bls_models" and len(parts) == 4)
        or (parts[0] == "model_repository" and len(parts) == 5))


def triton_imports(source: str) -> list:
    """The Triton utility modules ``source`` imports, as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if n.split(".")[0] in TRITON_MODULES]
    return found


def python_files():
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("source, expected", [
    ("import triton_python_backend_utils as pb", 1),
    ("def f():\n    from triton_python_backend_utils import Tensor", 1),
    ("import os, pb_utils", 1),
    ("import numpy as np\ndef f(pb):\n    return pb.Tensor('x', np.zeros(1))", 0),
])
def test_the_scanner_sees_imports_and_only_imports(source, expected):
    assert len(triton_imports(source)) == expected


def test_only_the_triton_layer_imports_python_backend_utils():
    offenders = {}
    for path in python_files():
        rel = path.relative_to(ROOT)
        if is_model_file(rel) or rel.as_posix() in ALLOWED:
            continue
        found = triton_imports(path.read_text())
        if found:
            offenders[rel.as_posix()] = found
    assert not offenders, f"take pb as an argument instead (only model.py files import it): {offenders}"


def test_the_allow_list_is_still_needed():
    for rel in ALLOWED:
        assert triton_imports((ROOT / rel).read_text()), f"{rel} no longer imports pb: drop it from ALLOWED"


@pytest.mark.parametrize("rel, expected", [
    ("bls_models/rag_orchestrator/1/model.py", True),
    ("model_repository/reference/embed/1/model.py", True),
    ("bls_models/model_manager/loader.py", False),
    ("ragstack/model.py", False),
    ("tools/model.py", False),
])
def test_model_files_are_told_apart(rel, expected):
    assert is_model_file(Path(rel)) is expected


def test_every_python_model_freezes_its_startup_heap_last_in_initialize():
    """ta.freeze_startup_heap() is the last statement of every model's initialize (and of the orchestrators'
    shared one): a full garbage collection over what loading built otherwise lands inside requests (13-14 ms in
    the orchestrator's stub, measured)."""
    sources = [p for p in python_files() if is_model_file(p.relative_to(ROOT))]
    sources.append(ROOT / "ragstack" / "triton" / "orchestrator.py")
    checked = 0
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "initialize":
                last = node.body[-1]
                call = last.value if isinstance(last, ast.Expr) else None
                assert isinstance(call, ast.Call) and ast.unparse(call.func) == "ta.freeze_startup_heap", \
                    f"{path.relative_to(ROOT)}: initialize does not end with ta.freeze_startup_heap()"
                checked += 1
    assert checked >= 12


def test_freeze_startup_heap_leaves_the_loaded_objects_out_of_collections():
    import subprocess
    import sys

    code = ("import gc\nfrom ragstack.triton import adapter as ta\nloaded = [[i] for i in range(10000)]\n"
            "assert gc.get_freeze_count() == 0\nta.freeze_startup_heap()\nassert gc.get_freeze_count() >= 10000\n"
            "assert sum(gc.get_count()) < 100\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
