#!/usr/bin/env python3
"""Show the per-stage span tree of traced requests (server started with TRITON_TRACE_FILE=F).

  tools/trace_spans.py F                   # one tree per client request, durations in ms
  tools/trace_spans.py F --chrome out.json # export for ui.perfetto.dev / chrome://tracing
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ragstack.triton.tracing import build_spans, load_records, to_chrome_trace, walk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace_file", type=Path)
    ap.add_argument("--chrome", type=Path, help="write Chrome trace events here")
    ap.add_argument("--last", type=int, default=5, help="show the last N requests")
    args = ap.parse_args()
    roots = build_spans(load_records(args.trace_file))
    if args.chrome:
        args.chrome.write_text(json.dumps(to_chrome_trace(roots)))
    for root in roots[-args.last:]:
        for depth, span in walk(root):
            label = f"{span.model}" + (f" [{span.stage}]" if span.stage else "")
            dur = f"{span.duration_ms:9.3f} ms" if span.duration_ms is not None else "        ?"
            print(f"{dur}  {'  ' * depth}{label}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
