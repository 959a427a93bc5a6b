#!/usr/bin/env python3
"""Write every config.pbtxt, and the README.md next to it, from ragstack/contracts/tensors.py and ragstack/contracts/model_config.py
(the single source of truth). --check: fail on drift."""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ragstack.contracts.model_config import all_targets  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if any file differs")
    args = ap.parse_args()
    stale = []
    for path, text in all_targets(ROOT).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "out of date" if args.check else "written"
    for p in stale:
        print(f"{verb}: {p}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
