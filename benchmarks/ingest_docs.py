#!/usr/bin/env python3
"""End-to-end ingest throughput through Triton: one document per request vs batches (client → ingest → docling /
embed → vector_index), on data/corpus repeated (Markdown, the plain-text path) and on generated office documents
and PDFs (the Docling path). Demo models (all-MiniLM-L6-v2), flat-file store, one server, fresh collections.

  .venv/bin/python benchmarks/ingest_docs.py [--repeat 8] [--batch 16]   → results/ingest_docs.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, key_headers, machine_info, now_iso, progress, write_json  # noqa: E402
from ragstack.contracts import client as client_io  # noqa: E402
from ragstack_dev.server import TritonProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import rag_client  # noqa: E402

DEMO = ROOT / "build" / "models" / "demo"
MODELS = "embed embed_text vector_index docling ingest"


def make_files(out: Path, repeat: int) -> dict:
    from tests import docgen

    corpus = sorted((ROOT / "data" / "corpus").glob("*.md"))
    md = out / "md"
    docs = out / "docs"
    md.mkdir()
    docs.mkdir()
    for r in range(repeat):
        for p in corpus:
            (md / f"{p.stem}-{r}.md").write_text(p.read_text() + f"\n\nCopy {r}.\n")
        for name, make in (("pdf", docgen.pdf), ("docx", docgen.docx), ("pptx", docgen.pptx), ("html", docgen.html)):
            (docs / f"{name}-{r}.{name}").write_bytes(make())
    return {"markdown": md, "documents": docs}


def run(client, mod, paths, collection, batch) -> dict:
    t0 = time.monotonic()
    chunks = requests = 0
    for group in rag_client.batches(paths, batch, 32 * 1024 * 1024):
        inputs = client_io.infer_inputs(mod, "ingest", rag_client.ingest_request(group, collection))
        report = client_io.output_json(client.infer("ingest", inputs, headers=key_headers()), "report")
        chunks += sum(d["chunks"] for d in report["documents"])
        requests += 1
    dt = time.monotonic() - t0
    return {"documents": len(paths), "chunks": chunks, "requests": requests, "seconds": round(dt, 3),
            "docs_per_s": round(len(paths) / dt, 2), "chunks_per_s": round(chunks / dt, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "ingest_docs.json")
    args = ap.parse_args()
    import tritonclient.http as mod

    tmp = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        sets = make_files(tmp, args.repeat)
        server = TritonProcess(DEMO, load_models=MODELS, log_path=ROOT / "build" / "logs" / "bench-ingest.log",
                               env={"RAG_DATA_PATH": str(tmp / "data")})
        with server:
            client = mod.InferenceServerClient(server.http_url, network_timeout=600)
            # warm-up: first docling call imports Docling, first embed call warms the engine
            run(client, mod, rag_client.collect([sets["documents"]])[:4], "warmup", 4)
            results = {}
            for kind, folder in sets.items():
                paths = rag_client.collect([folder])
                for label, batch in (("one_per_request", 1), (f"batch_{args.batch}", args.batch)):
                    progress(f"{kind}: {label}, {len(paths)} files")
                    results.setdefault(kind, {})[label] = run(client, mod, paths, f"{kind}-{label}", batch)
                    progress(f"  {results[kind][label]}")
                one, many = results[kind]["one_per_request"], results[kind][f"batch_{args.batch}"]
                results[kind]["speedup"] = round(many["docs_per_s"] / one["docs_per_s"], 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, {"benchmark": "ingest_docs", "when": now_iso(), "machine": machine_info(),
                          "models": "demo (all-MiniLM-L6-v2 embedder), flat-file store", "repeat": args.repeat,
                          "batch": args.batch, "results": results})
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
