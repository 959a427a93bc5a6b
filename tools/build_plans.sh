#!/usr/bin/env bash
# Build the embed and rerank TensorRT plans of an engine set in the TensorRT container whose TensorRT is the one
# the serving (trtllm) container runs them on. The trtllm image has no trtexec (server r25.10 build.py removes
# TensorRT's bin/ from trtllm images), and a plan only deserializes in the TensorRT release that built it, so the
# script first checks that both containers report the same TensorRT version and refuses otherwise.
#
#   tools/build_plans.sh ENGINE_SET [EMBED_SPEC] [RERANK_SPEC]
#   e.g. tools/build_plans.sh build/engines/production qwen3-embedding-4b qwen3-reranker-0.6b
#
# ENGINE_SET/{embed,rerank} must hold the ONNX export (engine_builds/build.py export, CPU, project venv).
# Needs docker with the NVIDIA container runtime, on the GPU model that will serve (plans are GPU-specific).
# Environment: GPU (device index, [0]); TENSORRT_CONTAINER / TRTLLM_CONTAINER override ragstack/contracts/tensors.py's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SET="${1:?usage: tools/build_plans.sh ENGINE_SET [EMBED_SPEC] [RERANK_SPEC]}"
EMBED_SPEC="${2:-qwen3-embedding-4b}"
RERANK_SPEC="${3:-qwen3-reranker-0.6b}"
GPU="${GPU:-0}"
contract() { sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" "$ROOT/ragstack/contracts/tensors.py"; }
TENSORRT_CONTAINER="${TENSORRT_CONTAINER:-$(contract TENSORRT_CONTAINER)}"
TRTLLM_CONTAINER="${TRTLLM_CONTAINER:-$(contract TRTLLM_CONTAINER)}"
SET="$(cd "$SET" && pwd)"
log() { printf '[build_plans] %s\n' "$*" >&2; }

trt_version() {
  docker run --rm --gpus "device=$GPU" --entrypoint python3 "$1" -c 'import tensorrt; print(tensorrt.__version__)' \
    | tail -n 1
}
serving="$(trt_version "$TRTLLM_CONTAINER")"
building="$(trt_version "$TENSORRT_CONTAINER")"
log "TensorRT $serving in $TRTLLM_CONTAINER (serves), $building in $TENSORRT_CONTAINER (builds)"
if [ "$serving" != "$building" ]; then
  log "error: the plans would not load: set TENSORRT_CONTAINER to the TensorRT container of TensorRT $serving"
  exit 1
fi

for pair in "embed:$EMBED_SPEC" "rerank:$RERANK_SPEC"; do
  kind="${pair%%:*}"
  spec="${pair#*:}"
  [ -f "$SET/$kind/model.onnx" ] || { log "error: $SET/$kind/model.onnx is missing: run engine_builds/build.py export"; exit 1; }
  log "$kind: plan from $spec"
  # build.py plan needs numpy only (no torch): install it if the image lacks it; hand the files back to the caller.
  docker run --rm --gpus "device=$GPU" --shm-size=2g -v "$ROOT:/work:ro" -v "$SET:/engines" -w /work \
    -e PYTHONDONTWRITEBYTECODE=1 --entrypoint bash "$TENSORRT_CONTAINER" -c '
      set -euo pipefail
      python3 -c "import numpy" 2>/dev/null || python3 -m pip install -q numpy
      python3 engine_builds/build.py plan --spec "$1" --out "/engines/$2" --model-dir "/engines/$2"
      chown -R "$3" "/engines/$2"' _ "$spec" "$kind" "$(id -u):$(id -g)"
done
log "built $SET/embed/model.plan and $SET/rerank/model.plan with TensorRT $building"
