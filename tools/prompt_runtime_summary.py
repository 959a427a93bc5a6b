#!/usr/bin/env python3
"""Check the evaluation tool's prompt runtime manifests (docs/design-notes.md#evaluation) against the
served engine and the runtime policy (sign-off).

Exit status: 0 aligned, 1 not aligned, 2 the engine manifest or policy could not be read.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.pipeline.prompt_runtime import PromptRuntimeManager, format_summary  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-manifest", required=True, help="build manifest of the served engine (JSON)")
    ap.add_argument("--policy", default=str(ROOT / "config" / "runtime_policy.json"), help="runtime policy file")
    ap.add_argument("--manifests", required=True, help="folder of prompt runtime manifests (*.json)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")
    args = ap.parse_args(argv)
    try:
        manager = PromptRuntimeManager.from_files(args.engine_manifest, args.policy, args.manifests)
    except ValueError as e:  # PolicyError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = manager.summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0 if summary["aligned"] else 1


if __name__ == "__main__":
    sys.exit(main())
