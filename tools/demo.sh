#!/usr/bin/env bash
# The main job: set up (if needed), build the demo models, serve the RAG endpoint on the reference profile,
# ingest the bundled corpus, answer a question (JSON printed), then keep serving until Ctrl-C.
#   QUESTION="..." tools/demo.sh        # ask something else
#   DEMO_EXIT=1 tools/demo.sh           # stop the server after the answer instead of serving on
#   DEMO_TASK=answer DEMO_TOP_N=3 tools/demo.sh   # the generator's own answer instead of quotes
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUESTION="${QUESTION:-How long is a primary on-call shift for the storage team, and what is the stipend?}"
export TRITON_HTTP_PORT="${TRITON_HTTP_PORT:-8000}" TRITON_GRPC_PORT="${TRITON_GRPC_PORT:-8001}"
export TRITON_METRICS_PORT="${TRITON_METRICS_PORT:-8002}"
export ENGINE_PATH="${ENGINE_PATH:-$ROOT/build/models/demo}" RAG_DATA_PATH="${RAG_DATA_PATH:-$ROOT/build/demo-data}"

# Access control (README "Security"): the demo's admin key, made once in a 0700 folder, given to the server as a file;
# the client commands below send it (ingest is a writer operation). Bring your own with RAG_ADMIN_KEY_FILE=...
if [ -z "${RAG_ADMIN_KEY_FILE:-}" ]; then
  mkdir -p build/demo-keys && chmod 700 build/demo-keys
  [ -s build/demo-keys/admin_key ] || ( umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >build/demo-keys/admin_key )
  export RAG_ADMIN_KEY_FILE="$ROOT/build/demo-keys/admin_key"
fi

bash tools/setup.sh
.venv/bin/python tools/build_models.py demo
mkdir -p build/logs
echo "[demo] starting tritonserver (log: build/logs/demo-server.log)" >&2
bash tools/serve_triton.sh > build/logs/demo-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for i in $(seq 1 240); do
  curl -sf "localhost:$TRITON_HTTP_PORT/v2/health/ready" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "[demo] server exited; see build/logs/demo-server.log" >&2; tail -30 build/logs/demo-server.log >&2; exit 1; }
  sleep 1
done
curl -sf "localhost:$TRITON_HTTP_PORT/v2/health/ready" >/dev/null || { echo "[demo] server not ready" >&2; exit 1; }
echo "[demo] server ready on HTTP :$TRITON_HTTP_PORT, gRPC :$TRITON_GRPC_PORT, metrics :$TRITON_METRICS_PORT" >&2
C=(.venv/bin/python tools/rag_client.py --url "localhost:$TRITON_HTTP_PORT" --grpc-url "localhost:$TRITON_GRPC_PORT")
RAG_API_KEY_FILE="$RAG_ADMIN_KEY_FILE" "${C[@]}" ingest data/corpus
echo "[demo] question: $QUESTION" >&2
# The quote task with 5 contexts: the best mode on the demo models in benchmarks/answers.py (results/answers.json);
# the 135M generator's own answers (DEMO_TASK=answer) cite but rarely contain the fact.
"${C[@]}" ask --task "${DEMO_TASK:-quote}" --top-n "${DEMO_TOP_N:-5}" "$QUESTION"
if [ -n "${DEMO_EXIT:-}" ]; then exit 0; fi
echo "[demo] serving; try: .venv/bin/python tools/rag_client.py ask --task quote --top-n 5 \"What is the Pro plan rate limit?\"   (Ctrl-C stops)" >&2
echo "[demo] the admin key is in $RAG_ADMIN_KEY_FILE: RAG_API_KEY_FILE=$RAG_ADMIN_KEY_FILE tools/rag_client.py ingest ...," >&2
echo "[demo]   RAG_ADMIN_KEY_FILE=$RAG_ADMIN_KEY_FILE tools/lifecycle.py ...; the server listens on 127.0.0.1 only" >&2
wait $SERVER
