"""The BLS and orchestration stubs load neither torch nor transformers (issue 17's lean BLS tier).

Each check runs in a fresh interpreter (tests/runtime/bls_imports.py), so what this test process has imported
cannot hide an import. Importing a model file is checked for every BLS model; the tokenization a stub runs at
load and per request (embed/rerank formatting, chunking, the generator's chat template and detokenizer) is
checked on both model sets, since that is where transformers used to come in."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "build" / "models"
SCRIPT = ROOT / "tests" / "runtime" / "bls_imports.py"
FORBIDDEN = {"torch", "transformers"}
BLS_MODELS = sorted(p.parts[-3] for p in ROOT.glob("bls_models/*/1/model.py"))


def _run(*args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, str(SCRIPT), str(ROOT), *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_bls_model_is_checked():
    assert {"embed_text", "rerank_text", "generate_text", "ingest", "rag_orchestrator", "rag_stream_orchestrator",
            "vector_index", "model_manager", "docling"} <= set(BLS_MODELS)


@pytest.mark.parametrize("model", BLS_MODELS)
def test_importing_a_bls_model_loads_no_torch_or_transformers(model):
    out = _run(model)
    assert not FORBIDDEN & set(out["loaded"]), out


@pytest.mark.parametrize("model_set", ["tiny", "demo"])
@pytest.mark.parametrize("model,what", [("embed_text", "embed"), ("ingest", "embed"), ("rerank_text", "rerank"),
                                        ("generate_text", "generate"), ("rag_orchestrator", "generate")])
def test_stub_tokenization_loads_no_torch_or_transformers(model, what, model_set):
    folder = MODELS / model_set / what
    if not (folder / "engine.json").is_file():
        pytest.skip(f"{model_set} models not built (tools/build_models.py {model_set})")
    out = _run(model, folder, what)
    assert out["ran"] == what and not FORBIDDEN & set(out["loaded"]), out


def test_docling_conversion_loads_no_torch_or_transformers():
    """The docling stub converts every format it serves without Docling's DocumentConverter (which imports torch
    through its ASR pipeline): ragstack.pipeline.documents.Converter runs the backends and pipelines itself."""
    out = _run("docling", MODELS, "convert")
    assert out["ran"] == "convert" and "docling" in out["loaded"] and not FORBIDDEN & set(out["loaded"]), out
