"""Run in a fresh interpreter: import one BLS model file (with a stand-in for triton_python_backend_utils, as in
tests/runtime/exercise_models.py), optionally run the tokenization its stub does, and print which heavy modules
ended up in sys.modules, as JSON.      (tests/unit/test_lean_imports.py)

    python bls_imports.py <project root> <model name> [<model set folder> <what>]

<what>: ``embed`` (EmbedTokenizer: encode, count, chunk_text), ``rerank`` (RerankTokenizer.encode_pairs) or
``generate`` (GeneratorTokenizer: chat-template prompt, decode, incremental detokenizer) or ``convert`` (the
docling model's Converter on a PDF, DOCX, PPTX, XLSX and HTML file; the folder is not used).
"""
import importlib.util
import json
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "docling", "sentence_transformers", "xgrammar")
ROOT, MODEL = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(ROOT))

from tests.runtime import pb_stand_in  # noqa: E402

pb_stand_in.install()
path = ROOT / "bls_models" / MODEL / "1" / "model.py"
spec = importlib.util.spec_from_file_location(f"model_{MODEL}", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert hasattr(module, "TritonPythonModel"), path

ran = None
if len(sys.argv) > 3:
    folder, ran = Path(sys.argv[3]), sys.argv[4]
    if ran == "embed":
        from ragstack.pipeline.chunking import chunk_text
        from ragstack.tokenization.retrieval import EmbedTokenizer

        tok = EmbedTokenizer(folder)
        tok.encode(["Triton serves the engines", "a second, longer document"], "document")
        tok.encode(["what serves the engines?"], "query")
        assert chunk_text("# Title\n\nSome text about engines. " * 40, tok, 32, 4)
    elif ran == "rerank":
        from ragstack.tokenization.retrieval import RerankTokenizer

        RerankTokenizer(folder).encode_pairs("what serves?", ["Triton.", "Bananas."])
    elif ran == "generate":
        from ragstack.tokenization.generation import GeneratorTokenizer

        gen = GeneratorTokenizer(folder)
        ids = gen.prompt_ids("Name a colour.", system="Answer in JSON.")
        gen.decode(ids)
        detok = gen.detokenizer()
        detok.push(ids[:3])
        detok.flush()
    elif ran == "convert":
        from ragstack.pipeline.documents import Converter
        from tests import docgen

        converter = Converter()
        for fmt in ("pdf", "docx", "pptx", "xlsx", "html"):
            converter.convert(getattr(docgen, fmt)(), fmt, f"file.{fmt}")
    else:
        raise SystemExit(f"unknown step {ran!r}")

print(json.dumps({"model": MODEL, "ran": ran, "loaded": sorted(m for m in HEAVY if m in sys.modules)}))
