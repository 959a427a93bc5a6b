#!/usr/bin/env bash
# GPU smoke test of the trtllm profile, end to end, in the real containers: build the tiny engine set (ONNX export
# on the CPU, plans in the TensorRT container, the generator in the trtllm container), serve it with the image
# built from the Dockerfile, then check embed, a `rag` request, guided decoding and perf_analyzer.
#
#   TRTLLM_EXAMPLES=$PWD/TensorRT-LLM/examples tools/gpu_smoke.sh
#   tools/gpu_smoke.sh --served      # only the request checks, against a server already on HTTP_PORT
#
# Needs: docker with the NVIDIA container runtime and one GPU; the project venv (bash tools/setup.sh) for the tiny
# models and their ONNX export; a checkout of NVIDIA/TensorRT-LLM at the container's release (v1.0.0), whose
# examples/ folder holds convert_checkpoint.py (not in the installed package). Internet access for the images.
# Prints one line per check, "PASS <check> <detail>" or "FAIL <check> <detail>", then a summary; exits 1 on any
# failure. Environment: GPU [0], WORK [build/gpu-smoke], IMAGE [ragstack-triton:smoke], HTTP_PORT [18000],
# GRPC_PORT [18001], METRICS_PORT [18002], SDK_IMAGE [the trtllm container's -py3-sdk twin, for perf_analyzer],
# GENERATE_DIR [$WORK/engines/generate: the generator folder whose manifest names the engine in the headers].
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
contract() { sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" "$ROOT/ragstack/contracts/tensors.py"; }
TRTLLM_CONTAINER="$(contract TRTLLM_CONTAINER)"
RELEASE="${TRTLLM_CONTAINER##*:}"; RELEASE="${RELEASE%%-*}"
SDK_IMAGE="${SDK_IMAGE:-nvcr.io/nvidia/tritonserver:${RELEASE}-py3-sdk}"
GPU="${GPU:-0}"
WORK="${WORK:-$ROOT/build/gpu-smoke}"
SET="$WORK/engines"
GENERATE_DIR="${GENERATE_DIR:-$SET/generate}"   # whose manifest gives the identity headers
IMAGE="${IMAGE:-ragstack-triton:smoke}"
HTTP_PORT="${HTTP_PORT:-18000}"
GRPC_PORT="${GRPC_PORT:-18001}"
METRICS_PORT="${METRICS_PORT:-18002}"
EXAMPLES="${TRTLLM_EXAMPLES:-$ROOT/TensorRT-LLM/examples}"
PY="$ROOT/.venv/bin/python"
NAME="ragstack-smoke-$$"
URL="http://127.0.0.1:$HTTP_PORT"
LOG="$WORK/log"
passed=0
failed=0
mkdir -p "$WORK" "$LOG"

cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# check NAME COMMAND...: run it with its output in $LOG/NAME.log; the last output line is the detail.
check() {
  local name="$1"; shift
  if "$@" >"$LOG/$name.log" 2>&1; then
    passed=$((passed + 1)); echo "PASS $name $(tail -n 1 "$LOG/$name.log")"
  else
    failed=$((failed + 1)); echo "FAIL $name $(tail -n 3 "$LOG/$name.log" | tr '\n' ' ')(log: $LOG/$name.log)"
  fi
}
# require NAME COMMAND...: a check whose failure makes every later one meaningless.
require() {
  check "$@"
  if [ "$failed" -gt 0 ]; then
    echo "SUMMARY $passed passed, $failed failed (stopped at $1)"; exit 1
  fi
}

prerequisites() {
  docker info >/dev/null
  docker run --rm --gpus "device=$GPU" --entrypoint nvidia-smi "$TRTLLM_CONTAINER" -L
  [ -x "$PY" ] || { echo "no project venv: bash tools/setup.sh"; return 1; }
  [ -f "$EXAMPLES/models/core/qwen/convert_checkpoint.py" ] || {
    echo "no TensorRT-LLM examples at $EXAMPLES: set TRTLLM_EXAMPLES (a v1.0.0 checkout's examples/)"; return 1; }
}

tiny_models() {
  HF_HUB_OFFLINE=1 "$PY" tools/build_models.py tiny
  echo "build/models/tiny"
}

onnx_export() {
  local kind
  for kind in embed rerank; do
    "$PY" engine_builds/build.py export --spec "tiny-$kind" --model-dir "build/models/tiny/$kind" \
      --out "$SET/$kind" --verify || return 1
  done
  echo "$SET/{embed,rerank}/model.onnx"
}

plans() {
  tools/build_plans.sh "$SET" tiny-embed tiny-rerank && ls -l "$SET/embed/model.plan" "$SET/rerank/model.plan"
}

generator() {
  # The trtllm container's own python3 (TensorRT-LLM and its transformers) runs convert_checkpoint + trtllm-build.
  docker run --rm --gpus "device=$GPU" --shm-size=2g -v "$ROOT:/work" -v "$SET:/engines" \
    -v "$(cd "$EXAMPLES" && pwd):/examples:ro" -w /work -e PYTHONDONTWRITEBYTECODE=1 --entrypoint bash \
    "$TRTLLM_CONTAINER" -c '
      python3 engine_builds/build.py trtllm --spec tiny-generate --model-dir /work/build/models/tiny/generate \
        --out /engines/generate --trtllm-examples /examples; rc=$?
      chown -R "$1" /engines/generate; exit $rc' _ "$(id -u):$(id -g)"
  local rc=$?
  if [ ! -f "$SET/generate/tokenizer_info.json" ] && [ -d "$SET/generate/trtllm" ]; then
    # The tiny tokenizer is saved by transformers 5, which the container's TensorRT-LLM transformers may not
    # read: write the xgrammar tokenizer info (and the engine.json) with the project venv instead.
    cp build/models/tiny/generate/engine.json "$SET/generate/" 2>/dev/null || true
    "$PY" engine_builds/build.py tokenizer-info --tokenizer-dir "$SET/generate" || return 1
    rc=0
  fi
  [ "$rc" -eq 0 ] && ls -d "$SET/generate/trtllm" "$SET/generate/tokenizer_info.json"
}

image() {
  docker build -t "$IMAGE" . && echo "$IMAGE"
}

serve() {
  cleanup
  docker run -d --name "$NAME" --gpus "device=$GPU" --shm-size=2g \
    -p "127.0.0.1:$HTTP_PORT:8000" -p "127.0.0.1:$GRPC_PORT:8001" -p "127.0.0.1:$METRICS_PORT:8002" \
    -v "$SET:/workspace/engines:ro" -v "$SET/generate:/workspace/tokenizer:ro" "$IMAGE" >/dev/null || return 1
  local waited=0
  until curl -fsS "$URL/v2/health/ready" >/dev/null 2>&1; do
    if ! docker inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null | grep -q true || [ "$waited" -ge 900 ]; then
      docker logs --tail 40 "$NAME"; echo "not ready after ${waited}s"; return 1
    fi
    sleep 5; waited=$((waited + 5))
  done
  echo "ready after ${waited}s"
}

# POST a JSON body to $1 (a path under $URL), with the generator's identity headers (spec 004: the rag models
# refuse a request that does not name the engine it expects); the response body on stdout, an error body on stderr.
identity_headers() {
  "$PY" -c 'import sys; from ragstack.governance.manifest import read_manifest
for k, v in read_manifest(sys.argv[1]).headers().items(): print(f"-H\n{k}: {v}")' "$GENERATE_DIR"
}
post() {
  local headers=()
  mapfile -t headers < <(identity_headers)
  curl -sS --fail-with-body -H 'Content-Type: application/json' "${headers[@]}" -X POST "$URL$1" -d "$2"
}

embed() {
  post /v2/models/embed_text/infer \
    '{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["Triton serves the engines"]}]}' \
    | "$PY" -c '
import json, math, sys
out = {o["name"]: o for o in json.load(sys.stdin)["outputs"]}
vec = out["embedding"]["data"]
norm = math.sqrt(sum(v * v for v in vec))
assert abs(norm - 1) < 1e-2, norm
print(f"{len(vec)} dims, norm {norm:.4f}")'
}

rag() {
  post /v2/models/rag/infer '{"inputs": [
    {"name": "query", "shape": [1, 1], "datatype": "BYTES", "data": ["What serves the engines?"]},
    {"name": "documents", "shape": [1, 2], "datatype": "BYTES",
     "data": ["Triton Inference Server serves the engines.", "Bananas are yellow."]},
    {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [64]}]}' \
    | "$PY" -c '
import json, sys
out = {o["name"]: o["data"][0] for o in json.load(sys.stdin)["outputs"]}
answer, contexts, usage = (json.loads(out[k]) for k in ("answer", "contexts", "usage"))
assert contexts, "no contexts"
print(f"answer {json.dumps(answer)[:80]}; {len(contexts)} contexts; usage keys {sorted(usage)[:4]}")'
}

guided() {
  local schema='{"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"], "additionalProperties": false}'
  post /v2/models/generate_text/generate "$("$PY" -c '
import json, sys
print(json.dumps({"prompt": "Name one colour as JSON.", "max_tokens": 48, "temperature": 0,
                  "guide_type": "json_schema", "guide": sys.argv[1]}))' "$schema")" \
    | "$PY" -c '
import json, sys
reply = json.load(sys.stdin)
value = json.loads(reply["text"])
assert value["colour"] in ("red", "green", "blue") and set(value) == {"colour"}, value
text, reason = reply["text"], reply.get("finish_reason")
print(f"{text!r} finish_reason={reason}")'
}

perf() {
  printf '{"data": [{"text": {"content": ["Triton serves the engines"], "shape": [1]}}]}\n' > "$WORK/perf_input.json"
  docker run --rm --net host -v "$WORK:/smoke:ro" "$SDK_IMAGE" perf_analyzer -m embed_text -i grpc \
    -u "127.0.0.1:$GRPC_PORT" --input-data /smoke/perf_input.json -b 1 --concurrency-range 4 \
    --measurement-interval 3000 -s 30 | tee "$WORK/perf.txt" | grep -E "Throughput|p99 latency" | tr -s ' ' | paste -sd ' '
  grep -q "Throughput" "$WORK/perf.txt"
}

if [ "${1:-}" = "--served" ]; then
  # Only the request checks, against a server already listening on HTTP_PORT (e.g. the CPU reference profile:
  # PROFILE=reference ENGINE_PATH=build/models/tiny TRITON_HTTP_PORT=18000 tools/serve_triton.sh, then
  # GENERATE_DIR=build/models/tiny/generate tools/gpu_smoke.sh --served).
  check embed embed
  check rag rag
  check guided_decoding guided
  echo "SUMMARY $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
fi
require prerequisites prerequisites
require tiny_models tiny_models
require onnx_export onnx_export
require plans plans
require generator generator
require image image
require serve serve
check embed embed
check rag rag
check guided_decoding guided
check perf_analyzer perf
echo "SUMMARY $passed passed, $failed failed"
[ "$failed" -eq 0 ]
