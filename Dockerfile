# The production (trtllm profile) server: the pinned Triton + TensorRT-LLM container plus this project's BLS models.
#
# The image holds code and configs only. The engines built by engine_builds/ (docs/gpu-deployment.md) are mounted
# at run time: the engine set at /workspace/engines and the generator's folder, which holds its tokenizer and
# tokenizer_info.json, at /workspace/tokenizer (docker-compose.triton.yml does both).
#
# The base must stay ragstack.contracts.tensors.TRTLLM_CONTAINER (tests/unit/test_deployment.py checks).
FROM nvcr.io/nvidia/tritonserver:25.10-trtllm-python-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/ragstack

# The Python models' dependencies (BLS models, model_manager, the plan-serving embed/rerank models) go into their own
# environment: TensorRT-LLM pins an older transformers than the project's (>=5). requirements-triton-models.txt is
# the one list (tests/unit/test_runtime_requirements.py builds a venv from exactly it and runs every model's code).
# The venv sees the system site-packages, after its own: the embed/rerank models use the container's tensorrt and
# torch (the TensorRT runtime TensorRT-LLM itself runs on), which are not reinstalled.
# tools/serve_triton.sh puts /opt/ragstack/.venv/bin first on PATH, which is how the Python backend stub finds it.
# A constraint file the base image may set for its own packages (PIP_CONSTRAINT) does not apply to this environment.
COPY requirements-triton-models.txt pyproject.toml ./
COPY ragstack/ ragstack/
RUN python3 -m venv --without-pip --system-site-packages .venv \
    && env -u PIP_CONSTRAINT python3 -m pip --python .venv/bin/python install --no-cache-dir \
        -r requirements-triton-models.txt \
    && env -u PIP_CONSTRAINT python3 -m pip --python .venv/bin/python install --no-cache-dir --no-deps .

COPY config/ config/
COPY bls_models/ bls_models/
COPY model_repository/trtllm/ model_repository/trtllm/
COPY tools/serve_triton.sh tools/serve_triton.sh
# The Kubernetes liveness probe (deploy/k8s/deployment.yaml): not ready or a dead Python stub -> exit 1.
COPY tools/health_check.py tools/health_check.py

# TOKENIZER_DIR names a folder, not a secret (DL3064 matches the word "TOKEN").
# hadolint ignore=DL3064
ENV PROFILE=trtllm \
    ENGINE_PATH=/workspace/engines \
    TOKENIZER_DIR=/workspace/tokenizer \
    RAG_DATA_PATH=/workspace/data \
    TRITON_HTTP_PORT=8000 \
    TRITON_GRPC_PORT=8001 \
    TRITON_METRICS_PORT=8002 \
    TRITON_BIND_ADDRESS=0.0.0.0

# Inside the container the server listens on the container's interfaces; what is published is the deployment's
# choice (tools/serve_triton.sh and docker-compose.triton.yml publish on 127.0.0.1 unless told). The admin APIs stay
# restricted by key (README "Security"): mount RAG_ADMIN_KEY_FILE to turn them on.

EXPOSE 8000 8001 8002

# Ready means every model loaded; engines take minutes to deserialise, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TRITON_HTTP_PORT', '8000'), timeout=4)"]

# NVIDIA's entrypoint first: it sets up CUDA forward compatibility (a data-centre GPU whose driver is older than the
# container's CUDA) and prints the banner, then runs the launcher.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/ragstack/tools/serve_triton.sh"]
