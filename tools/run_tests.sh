#!/usr/bin/env bash
# The test command: set up (if needed), build the model sets (if needed), run unit + integration tests.
# Extra arguments go to pytest (e.g. tools/run_tests.sh tests/unit -k policy).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup.sh
# tiny: the test models; demo: the retrieval-quality and bi-encoder checks run on the real small models too.
.venv/bin/python tools/build_models.py all
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -p no:cacheprovider -rs "${@:-tests}"
