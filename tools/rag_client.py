#!/usr/bin/env python3
"""Talk to the RAG endpoint of a running server (tools/serve_triton.sh).

  tools/rag_client.py ingest data/corpus report.pdf [--collection default] [--batch-size 16]
      # files, and every .md .txt .pdf .docx .pptx .xlsx .html file under each folder; batches per request
  tools/rag_client.py delete DOC_ID [DOC_ID ...]
  tools/rag_client.py ask "How long is an on-call shift?" [--task answer] [--schema FILE] [--stream] [--grpc]
  tools/rag_client.py ask "..." --document "caller text" --document "another"   # bypass the index
"""
import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ragstack.contracts import client as client_io  # noqa: E402


def _identity(args) -> dict:
    """The engine identity headers (X-Engine-Hash, X-Quantisation), from the flags or the served generator's
    manifest."""
    if args.engine_hash and args.quantisation:
        values = {"x-engine-hash": args.engine_hash, "x-quantisation": args.quantisation}
    else:
        from ragstack.governance.manifest import read_manifest

        m = read_manifest(Path(args.engine_path) / "generate")
        values = {"x-engine-hash": args.engine_hash or m.engine_hash, "x-quantisation": args.quantisation or m.quantisation}
    return {**values, **_key(args)}


def _key(args) -> dict:
    """The X-Api-Key header: --api-key, else $RAG_API_KEY, else the first line of $RAG_API_KEY_FILE (a writer or
    admin key for ingest/delete; a reader key where the server requires one for rag)."""
    if args.api_key:
        return {"x-api-key": args.api_key}
    from ragstack.lifecycle.client import env_key

    key = env_key("RAG_API_KEY")
    return {"x-api-key": key} if key else {}


def _client(args):
    if args.grpc:
        import tritonclient.grpc as mod
        return mod, mod.InferenceServerClient(args.grpc_url)
    import tritonclient.http as mod
    return mod, mod.InferenceServerClient(args.url, network_timeout=600, connection_timeout=600)


SUFFIXES = (".md", ".markdown", ".txt", ".pdf", ".docx", ".pptx", ".xlsx", ".html", ".htm")
TEXT_SUFFIXES = (".md", ".markdown", ".txt")


def collect(paths) -> list:
    """Files to ingest: each file named, and every file of a supported type under each folder named."""
    out = []
    for p in map(Path, paths):
        out += sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in SUFFIXES) if p.is_dir() else [p]
    return out


def batches(paths, max_docs: int, max_bytes: int):
    """Consecutive runs of files: at most ``max_docs`` documents and about ``max_bytes`` bytes per request."""
    batch, size = [], 0
    for path in paths:
        n = path.stat().st_size
        if batch and (len(batch) >= max_docs or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += n
    if batch:
        yield batch


def ingest_request(paths, collection: str) -> dict:
    """One ingest request for these files: plain text/Markdown as texts when the whole batch is text, otherwise
    every file as bytes with its name (the server converts non-text files through `docling`)."""
    values = {"doc_ids": [p.stem for p in paths], "collection": collection,
              "metadata": [json.dumps({"source": str(p), "title": p.stem}) for p in paths]}
    if all(p.suffix.lower() in TEXT_SUFFIXES for p in paths):
        values["texts"] = [p.read_text(encoding="utf-8") for p in paths]
    else:
        values["files"] = [p.read_bytes() for p in paths]
        values["file_names"] = [p.name for p in paths]
    return values


def ingest(args) -> int:
    import time

    mod, client = _client(args)
    paths = collect(args.paths)
    if not paths:
        print(f"no files of a supported type ({' '.join(SUFFIXES)}) found", file=sys.stderr)
        return 2
    if len({p.stem for p in paths}) != len(paths):
        print("two files share a name (the doc id is the file name without its suffix)", file=sys.stderr)
        return 2
    total, done, failed, t0 = 0, 0, 0, time.monotonic()
    for batch in batches(paths, args.batch_size, args.batch_bytes):
        try:
            inputs = client_io.infer_inputs(mod, "ingest", ingest_request(batch, args.collection))
            result = client.infer("ingest", inputs, headers=_key(args))
        except Exception as e:  # noqa: BLE001 - a refused batch names its files and the reason; the rest go on
            failed += len(batch)
            done += len(batch)
            print(f"[ingest {done}/{len(paths)}] FAILED {', '.join(p.name for p in batch)}: {e}", file=sys.stderr)
            continue
        report = client_io.output_json(result, "report")
        for path, doc in zip(batch, report["documents"]):
            done += 1
            total += doc["chunks"]
            print(f"[ingest {done}/{len(paths)}] {path.name}: {doc['status']}, {doc['chunks']} chunks",
                  file=sys.stderr)
    dt = time.monotonic() - t0
    print(f"[ingest] {len(paths) - failed} documents, {total} chunks in collection {args.collection!r} "
          f"in {dt:.1f}s ({len(paths) / max(dt, 1e-9):.1f} documents/s){f'; {failed} failed' if failed else ''}",
          file=sys.stderr)
    return 1 if failed else 0


def delete(args) -> int:
    mod, client = _client(args)
    values = {"doc_ids": args.doc_ids, "op": "delete", "collection": args.collection}
    print(client_io.output_string(client.infer("ingest", client_io.infer_inputs(mod, "ingest", values),
                                               headers=_key(args)), "report"))
    return 0


def ask(args) -> int:
    mod, client = _client(args)
    values = {"query": args.question, "task": args.task, "collection": args.collection, "top_k": args.top_k,
              "top_n": args.top_n, "schema": Path(args.schema).read_text() if args.schema else None,
              "max_tokens": args.max_tokens or None, "documents": args.document or None}
    if args.stream:
        return _ask_stream(args, values)
    result = client.infer("rag", client_io.infer_inputs(mod, "rag", values), headers=_identity(args))
    out = {name: client_io.output_json(result, name) for name in ("answer", "contexts", "usage")}
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


def _ask_stream(args, values) -> int:
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(args.grpc_url)
    responses = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=_identity(args))
    client.async_stream_infer("rag_stream", client_io.infer_inputs(grpcclient, "rag_stream", values))
    try:
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                print(f"\nerror: {error}", file=sys.stderr)
                return 1
            if result.as_numpy("usage") is None:
                sys.stdout.write(client_io.output_string(result, "answer"))
                sys.stdout.flush()
                continue
            out = {n: client_io.output_json(result, n) for n in ("answer", "contexts", "usage")}
            print("\n" + json.dumps(out, indent=2, ensure_ascii=False))
            return 0
    finally:
        client.stop_stream()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="localhost:8000", help="HTTP endpoint")
    ap.add_argument("--grpc-url", default="localhost:8001")
    ap.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    ap.add_argument("--collection", default="default")
    ap.add_argument("--api-key", help="X-Api-Key to send (default: $RAG_API_KEY or the file $RAG_API_KEY_FILE); "
                    "prefer the environment: a flag shows in the process list")
    ap.add_argument("--engine-path", default=os.environ.get("ENGINE_PATH", str(ROOT / "build" / "models" / "demo")),
                    help="the served engines; identity headers come from its generate/manifest.json")
    ap.add_argument("--engine-hash", help="X-Engine-Hash to send (default: from the manifest)")
    ap.add_argument("--quantisation", help="X-Quantisation to send (default: from the manifest)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ingest", help="files (.md .txt .pdf .docx .pptx .xlsx .html) and folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch-size", type=int, default=16, help="documents per request")
    p.add_argument("--batch-bytes", type=int, default=32 * 1024 * 1024, help="about this many bytes per request")
    p = sub.add_parser("delete")
    p.add_argument("doc_ids", nargs="+")
    p = sub.add_parser("ask")
    p.add_argument("question")
    p.add_argument("--task", default="answer", choices=["answer", "generate_json", "rank_candidates", "judge", "quote"])
    p.add_argument("--schema", help="a JSON Schema file for the answer")
    p.add_argument("--document", action="append", help="a caller document (repeat); bypasses the index")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--top-n", type=int, default=3)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--stream", action="store_true", help="stream the answer's tokens (gRPC, rag_stream)")
    args = ap.parse_args()
    return {"ingest": ingest, "delete": delete, "ask": ask}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
