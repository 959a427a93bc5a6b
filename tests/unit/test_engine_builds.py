"""engine_builds: the ONNX graphs equal the reference engines; the trtexec and TensorRT-LLM command lines of every
build spec are pinned; the real-run path (attempts, fallback, manifest) works with stand-in tools."""
import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from engine_builds import onnx_export, tools, trtexec, trtllm  # noqa: E402
from engine_builds.build import main as build_main  # noqa: E402
from engine_builds.specs import load_spec, model_set, set_names, spec_names  # noqa: E402
from ragstack.contracts import tensors as contracts  # noqa: E402
from ragstack.governance.engine_spec import EngineSpec  # noqa: E402
from ragstack.engines.embedding import EmbeddingEngine  # noqa: E402
from ragstack.engines.reranking import RerankEngine  # noqa: E402
from ragstack.governance.manifest import read_manifest, sha256_file, verify_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "build" / "models" / "tiny"
needs_tiny = pytest.mark.skipif(not (TINY / "embed" / "engine.json").is_file(), reason="tiny models not built")
TOL = 1e-4


# --------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny embed and rerank models exported once: {kind: engine folder}."""
    if not (TINY / "embed" / "engine.json").is_file():
        pytest.skip("tiny models not built: run tools/build_models.py tiny")
    root = tmp_path_factory.mktemp("engines")
    return {kind: onnx_export.export(load_spec(f"tiny-{kind}"), TINY / kind, root / kind).parent
            for kind in ("embed", "rerank")}


@pytest.fixture(scope="module")
def references():
    return {"embed": EmbeddingEngine(TINY / "embed"), "rerank": RerankEngine(TINY / "rerank")}


@pytest.mark.parametrize("kind", ["embed", "rerank"])
def test_onnx_io_is_the_triton_contract(exported, kind):
    model = onnx.load(str(exported[kind] / onnx_export.ONNX_FILE))
    contract = contracts.ENGINES[kind]
    int32, fp32 = onnx.TensorProto.INT32, onnx.TensorProto.FLOAT

    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    assert signature(model.graph.input) == [(t.name, int32, ["batch", "sequence"]) for t in contract.inputs]
    width = EngineSpec.read(TINY / "embed").dim if kind == "embed" else 1
    assert signature(model.graph.output) == [(contract.outputs[0].name, fp32, ["batch", width])]


@pytest.mark.parametrize("kind", ["embed", "rerank"])
def test_onnx_runtime_equals_the_reference_engine(exported, references, kind):
    """Batches 1, 3, 8 x lengths 5, 37, 130, rows left-padded to random lengths."""
    session = onnx_export.onnx_session(exported[kind] / onnx_export.ONNX_FILE)
    reference = references[kind]
    worst = onnx_export.verify(session, reference, reference.vocab_size, reference.spec.max_length)
    assert worst <= TOL


@pytest.mark.parametrize("kind", ["embed", "rerank"])
def test_left_padding_does_not_change_a_row(exported, kind):
    session = onnx_export.onnx_session(exported[kind] / onnx_export.ONNX_FILE)
    ids = np.arange(10, 40, dtype=np.int32).reshape(1, -1)
    alone = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    padded_ids = np.concatenate([np.zeros((1, 17), np.int32), ids], axis=1)
    mask = (padded_ids != 0).astype(np.int32)
    mask[0, 17:] = 1
    padded = session.run(None, {"input_ids": padded_ids, "attention_mask": mask})[0]
    np.testing.assert_allclose(padded, alone, atol=TOL)
    if kind == "embed":
        np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-5)
    else:
        assert 0.0 < float(alone[0, 0]) < 1.0


def test_export_writes_an_engine_folder_with_its_manifest(exported):
    folder = exported["embed"]
    assert EngineSpec.read(folder) == EngineSpec.read(TINY / "embed")
    assert (folder / "tokenizer.json").read_bytes() == (TINY / "embed" / "tokenizer.json").read_bytes()
    manifest = read_manifest(folder)
    assert manifest.files["model.onnx"] == sha256_file(folder / "model.onnx")
    assert manifest.quantisation == "none (fp32 ONNX)" and manifest.steps["onnx"]["args"]["dim"] == 48
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest.steps["onnx"]["tools"])
    assert verify_manifest(folder) == []


@needs_tiny
def test_a_hub_folder_is_exported_with_the_specs_engine_json(tmp_path):
    """A production folder has no engine.json: the spec supplies it (here with another Matryoshka dim), and
    --verify checks the graph against the reference engine served with that engine.json."""
    hub = shutil.copytree(TINY / "embed", tmp_path / "hub", ignore=shutil.ignore_patterns("engine.json"))
    fields = json.loads((TINY / "embed" / "engine.json").read_text())
    fields.pop("kind")
    spec_file = tmp_path / "hub-embed.json"
    spec_file.write_text(json.dumps({"name": "hub-embed", "kind": "embed", "source": "test",
                                     "engine": {**fields, "dim": 32}, "plan": {"precision": "fp16"}}))
    out = tmp_path / "engines" / "embed"
    assert build_main(["export", "--spec", str(spec_file), "--model-dir", str(hub), "--out", str(out),
                       "--verify"]) == 0
    assert EngineSpec.read(out).dim == 32 and not (hub / "engine.json").exists()
    session = onnx_export.onnx_session(out / onnx_export.ONNX_FILE)
    ids = np.array([[5, 6, 7]], np.int32)
    assert session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].shape == (1, 32)


def test_only_qwen3_style_models_export():
    from engine_builds.graphs import EmbedGraph, RerankGraph

    with pytest.raises(ValueError, match="last-token"):
        EmbedGraph(None, EngineSpec(kind="embed", name="bert", pooling="mean"))
    with pytest.raises(ValueError, match="qwen3_yes_no"):
        RerankGraph(None, EngineSpec(kind="rerank", name="bert", scoring="bi_encoder_cosine", pooling="mean"), 0, 1)


# ------------------------------------------------------------------------------------------ specs
def test_every_spec_and_set_loads():
    assert set(set_names()) == {"production", "production-16gb", "production-w4a8", "tiny"}
    for name in spec_names():
        load_spec(name)
    for name in set_names():
        assert set(model_set(name)) == {"embed", "rerank", "generate"}


def test_profiles_are_bounded_by_the_contract_and_the_engine():
    for name in ("qwen3-embedding-4b", "qwen3-reranker-0.6b"):
        spec = load_spec(name)
        engine = spec.engine_spec()
        shapes = trtexec.profile(spec, engine.max_length)
        assert shapes["max"] == (contracts.ENGINES[spec.kind].max_batch_size, engine.max_length)
        assert shapes["min"] <= shapes["opt"] <= shapes["max"]


def test_production_engine_facts_match_the_specs():
    assert load_spec("qwen3-embedding-4b").engine_spec().dim == 2000
    for name in ("qwen3-32b-fp8", "qwen3-32b-w4a8", "qwen3-4b-fp8", "qwen3-4b-w4a8"):
        generate = load_spec(name).engine_spec()
        assert (generate.max_input_len, generate.max_seq_len, generate.max_batch_size) == (4096, 6000, 4)


# ------------------------------------------------------------------------- generator quantisation (issue 13.6)
def test_fp8_is_the_default_generator_build_and_w4a8_an_explicit_set():
    """Dense Qwen3 TensorRT-engine support in TensorRT-LLM 1.0 was validated at FP16/FP8; AWQ is not listed for
    Qwen3-32B. So every default set builds FP8, and W4A8 is only built when its set is named."""
    for name in ("production", "production-16gb"):
        assert model_set(name)["generate"].trtllm.qformat == "fp8", name
    assert model_set("production-w4a8")["generate"].trtllm.qformat == "w4a8_awq"


@pytest.mark.parametrize("sm, refused", [(89, False), (90, False), (100, True), (103, True), (110, True),
                                         (119, True), (120, False), (None, False)])
def test_w4a8_is_refused_on_sm_100_to_119_with_a_clear_message(sm, refused, tmp_path, capsys):
    argv = ["trtllm", "--spec", "qwen3-32b-w4a8", "--model-dir", "/m", "--out", str(tmp_path / "g"),
            "--trtllm-examples", "/x", "--dry-run"] + ([] if sm is None else ["--sm", str(sm)])
    code = build_main(argv)
    err = capsys.readouterr().err
    if refused:
        assert code == 1
        assert f"SM {sm}" in err and "INT4/INT8" in err and "SM 100-119" in err and "qwen3-32b-fp8" in err
    else:
        assert code == 0, err


@pytest.mark.parametrize("sm", [90, 100, 120])
def test_fp8_builds_on_every_fp8_gpu(sm, tmp_path, capsys):
    assert build_main(["trtllm", "--spec", "qwen3-32b-fp8", "--model-dir", "/m", "--out", str(tmp_path / "g"),
                       "--trtllm-examples", "/x", "--dry-run", "--sm", str(sm)]) == 0
    assert "--qformat fp8" in capsys.readouterr().out


def test_a_real_w4a8_build_asks_the_gpu_for_its_sm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trtllm, "detect_sm", lambda device=0: 100)
    assert build_main(["trtllm", "--spec", "qwen3-32b-w4a8", "--model-dir", "/m", "--out", str(tmp_path / "g"),
                       "--trtllm-examples", "/x"]) == 1
    assert "cannot be built on this GPU (SM 100)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- trtexec lines
def _shape(batch, length):
    return f"input_ids:{batch}x{length},attention_mask:{batch}x{length}"


def _trtexec(onnx_name, flags, opt, max_, folder="/e"):
    return ["trtexec", f"--onnx={folder}/{onnx_name}", f"--saveEngine={folder}/model.plan", "--device=0", *flags,
            f"--minShapes={_shape(1, 1)}", f"--optShapes={_shape(*opt)}", f"--maxShapes={_shape(*max_)}",
            "--memPoolSize=workspace:4096", "--builderOptimizationLevel=5", "--hardwareCompatibilityLevel=none",
            "--skipInference"]


FP8_WEAK = ["--fp8", "--fp16", "--precisionConstraints=prefer"]
FP16 = ["--fp16", "--precisionConstraints=prefer"]
PINNED_PLANS = {
    "qwen3-embedding-4b": [("model.fp8.onnx", ["--stronglyTyped"]), ("model.onnx", FP8_WEAK), ("model.onnx", FP16)],
    "qwen3-reranker-0.6b": [("model.nvfp4.onnx", ["--stronglyTyped"]), ("model.onnx", FP16)],
    "tiny-embed": [("model.fp8.onnx", ["--stronglyTyped"]), ("model.onnx", FP8_WEAK), ("model.onnx", FP16)],
    "tiny-rerank": [("model.nvfp4.onnx", ["--stronglyTyped"]), ("model.onnx", FP16)],
}
PINNED_SHAPES = {"qwen3-embedding-4b": ((8, 512), (32, 1024)), "qwen3-reranker-0.6b": ((8, 512), (16, 1024)),
                 "tiny-embed": ((8, 128), (32, 512)), "tiny-rerank": ((8, 128), (16, 512))}


@pytest.mark.parametrize("name", sorted(PINNED_PLANS))
def test_trtexec_command_lines_are_pinned(name):
    spec = load_spec(name)
    max_length = PINNED_SHAPES[name][1][1]
    got = [list(a.argv) for a in trtexec.attempts(spec, Path("/e"), max_length)]
    opt, max_ = PINNED_SHAPES[name]
    assert got == [_trtexec(onnx_name, flags, opt, max_) for onnx_name, flags in PINNED_PLANS[name]]


def test_attempt_labels_say_what_the_plan_will_be():
    labels = [a.label for a in trtexec.attempts(load_spec("qwen3-reranker-0.6b"), Path("/e"), 1024)]
    assert labels == ["nvfp4 (strongly typed, ModelOpt Q/DQ graph)", "fp16 (fallback from nvfp4)"]


# ------------------------------------------------------------------------------- TensorRT-LLM lines
@pytest.mark.parametrize("name", ["qwen3-32b-w4a8", "qwen3-4b-w4a8"])
def test_w4a8_generator_command_lines_are_pinned(name):
    spec = load_spec(name)
    steps = trtllm.commands(spec, spec.engine_spec(), Path("/hf/qwen3-32b"), Path("/e/generate"), Path("/w"),
                            Path("/trtllm/examples"))
    assert [s.label for s in steps] == ["quantize (w4a8_awq, kv fp8)", "trtllm-build"]
    assert list(steps[0].argv) == [
        "python3", "/trtllm/examples/quantization/quantize.py", "--model_dir", "/hf/qwen3-32b",
        "--output_dir", "/w/checkpoint", "--dtype", "bfloat16", "--qformat", "w4a8_awq", "--awq_block_size", "128",
        "--kv_cache_dtype", "fp8", "--calib_size", "512", "--tp_size", "1"]
    assert list(steps[1].argv) == [
        "trtllm-build", "--checkpoint_dir", "/w/checkpoint", "--output_dir", "/e/generate/trtllm",
        "--max_batch_size", "4", "--max_input_len", "4096", "--max_seq_len", "6000", "--max_num_tokens", "4096",
        "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable", "--remove_input_padding", "enable",
        "--gpt_attention_plugin", "auto", "--gemm_plugin", "auto", "--workers", "1"]


def test_fp8_quantisation_command_line_is_pinned():
    """The FP8 alternative (spec note: where W4A8 kernels are missing): --qformat fp8, no AWQ block size."""
    spec = load_spec("qwen3-32b-w4a8")
    fp8 = dataclasses.replace(spec, trtllm=dataclasses.replace(spec.trtllm, qformat="fp8", awq_block_size=None))
    steps = trtllm.commands(fp8, fp8.engine_spec(), Path("/m"), Path("/e"), Path("/w"), Path("/x"))
    assert list(steps[0].argv) == [
        "python3", "/x/quantization/quantize.py", "--model_dir", "/m", "--output_dir", "/w/checkpoint",
        "--dtype", "bfloat16", "--qformat", "fp8", "--kv_cache_dtype", "fp8", "--calib_size", "512", "--tp_size", "1"]
    assert trtllm.quantisation(fp8) == "fp8, kv fp8"


@needs_tiny
def test_tiny_generator_command_lines_are_pinned():
    spec = load_spec("tiny-generate")
    steps = trtllm.commands(spec, spec.engine_spec(TINY / "generate"), Path("/m"), Path("/e"), Path("/w"),
                            Path("/x"))
    assert [list(s.argv) for s in steps] == [
        ["python3", "/x/models/core/qwen/convert_checkpoint.py", "--model_dir", "/m", "--output_dir",
         "/w/checkpoint", "--dtype", "float16", "--tp_size", "1"],
        ["trtllm-build", "--checkpoint_dir", "/w/checkpoint", "--output_dir", "/e/trtllm", "--max_batch_size", "8",
         "--max_input_len", "1024", "--max_seq_len", "2048", "--max_num_tokens", "2048", "--kv_cache_type", "paged",
         "--use_paged_context_fmha", "enable", "--remove_input_padding", "enable", "--gpt_attention_plugin", "auto",
         "--gemm_plugin", "auto", "--workers", "1"]]


def test_glm_4_5_air_is_blocked_with_its_reason(capsys):
    spec = load_spec("glm-4.5-air")
    with pytest.raises(ValueError, match="Glm4MoeForCausalLM"):
        trtllm.commands(spec, None, Path("/m"), Path("/e"), Path("/w"), Path("/x"))
    assert build_main(["trtllm", "--spec", "glm-4.5-air", "--model-dir", "/m", "--out", "/e", "--dry-run"]) == 1
    assert "MODEL_MAP" in capsys.readouterr().err


# ------------------------------------------------------------------------------- dry run / real run
def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "production"
    assert build_main(["all", "--set", "production", "--models-root", "/hf", "--out", str(out), "--dry-run",
                       "--trtllm-examples", "/x"]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if not line.startswith("#")]
    spec = load_spec("qwen3-embedding-4b")
    assert tools.show(trtexec.attempts(spec, out / "embed", 1024)[0].argv) in commands
    assert any(line.startswith("trtllm-build --checkpoint_dir") for line in commands)
    assert any("quantization/quantize.py" in line for line in commands)
    assert not out.exists()


def test_real_run_without_the_tools_says_where_they_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tools, "find_tool", lambda name: None)
    assert build_main(["plan", "--spec", "tiny-embed", "--out", str(tmp_path), "--model-dir", str(TINY / "embed")]) == 3
    err = capsys.readouterr().err
    # trtexec is not in the trtllm image (server r25.10 build.py removes TensorRT's bin/ for trtllm images): the
    # message must send the user to the TensorRT container of the same TensorRT, not to the trtllm one.
    assert "trtexec is not installed" in err and f"it ships in {contracts.TENSORRT_CONTAINER}" in err
    assert f"it ships in {contracts.TRTLLM_CONTAINER}" not in err and "tools/build_plans.sh" in err


def test_the_tensorrt_container_is_the_one_of_the_serving_containers_tensorrt():
    """Triton's compatibility matrix: 25.10-trtllm-python-py3 carries TensorRT 10.11.0.33 (and TensorRT-LLM 1.0.0);
    NGC's 25.06 release line (the PyTorch the 25.10 trtllm image is built on, torch ...nv25.6) carries the same."""
    assert contracts.TRTLLM_CONTAINER.endswith(":25.10-trtllm-python-py3")
    assert contracts.TRTLLM_TENSORRT_VERSION.startswith("10.11.")
    assert contracts.TENSORRT_CONTAINER == "nvcr.io/nvidia/tensorrt:25.06-py3"
    script = (ROOT / "tools" / "build_plans.sh").read_text()
    assert "TENSORRT_CONTAINER" in script and "tensorrt.__version__" in script
    docs = (ROOT / "docs" / "gpu-deployment.md").read_text()
    assert contracts.TENSORRT_CONTAINER in docs and "tools/build_plans.sh" in docs


def test_the_plan_step_needs_no_torch(tmp_path):
    """The TensorRT container has no torch or transformers: build.py plan must run without them."""
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            f"sys.argv = ['build.py', 'plan', '--spec', 'qwen3-embedding-4b', '--out', {str(tmp_path)!r}, "
            "'--dry-run']; runpy.run_path('engine_builds/build.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trtexec --onnx=" in result.stdout


def _stand_in(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/usr/bin/env python3\nimport sys, pathlib\nargs = sys.argv[1:]\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@needs_tiny
def test_plan_falls_back_and_the_manifest_says_so(exported, tmp_path, monkeypatch):
    """A stand-in trtexec that cannot build strongly typed FP4: the FP16 fallback builds the plan."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "trtexec", (
        "print('&&&& RUNNING TensorRT.trtexec [TensorRT v101303] # trtexec', ' '.join(args))\n"
        "if '--stronglyTyped' in args: sys.exit('no FP4 kernels on this GPU')\n"
        "plan = next(a.split('=', 1)[1] for a in args if a.startswith('--saveEngine='))\n"
        "pathlib.Path(plan).write_bytes(b'plan:' + ' '.join(args).encode())\n"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = shutil.copytree(exported["rerank"], tmp_path / "rerank")
    (folder / "model.nvfp4.onnx").write_bytes(b"stand-in quantized graph")
    assert build_main(["plan", "--spec", "tiny-rerank", "--out", str(folder)]) == 0
    manifest = read_manifest(folder)
    assert manifest.quantisation == "fp16 (fallback from nvfp4)"
    assert manifest.files["model.plan"] == sha256_file(folder / "model.plan")
    assert manifest.steps["plan"]["tools"]["tensorrt"] == "10.13.3"
    assert manifest.steps["plan"]["args"]["argv"][0].endswith("trtexec")
    assert set(manifest.steps) == {"onnx", "plan"} and verify_manifest(folder) == []


@needs_tiny
def test_trtllm_real_run_completes_the_engine_folder(tmp_path, monkeypatch):
    """Stand-in conversion script and trtllm-build: the tool adds tokenizer, engine.json, tokenizer info, manifest."""
    examples = tmp_path / "examples"
    (examples / "models/core/qwen").mkdir(parents=True)
    _stand_in(examples / "models/core/qwen", "convert_checkpoint.py", (
        "out = pathlib.Path(args[args.index('--output_dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'config.json').write_text('{}'); (out / 'rank0.safetensors').write_bytes(b'w')\n"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "trtllm-build", (
        "out = pathlib.Path(args[args.index('--output_dir') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'config.json').write_text('{\"build_config\": {}}'); (out / 'rank0.engine').write_bytes(b'engine')\n"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "engines" / "generate"
    assert build_main(["trtllm", "--spec", "tiny-generate", "--model-dir", str(TINY / "generate"), "--out", str(out),
                       "--trtllm-examples", str(examples)]) == 0
    manifest = read_manifest(out)
    assert set(manifest.files) == {"engine.json", "trtllm/config.json", "trtllm/rank0.engine"}
    assert manifest.quantisation == "float16"
    assert manifest.tokenizer_info_hash == sha256_file(out / "tokenizer_info.json")
    info = json.loads((out / "tokenizer_info.json").read_text())
    assert info["stop_token_ids"] == [EngineSpec.read(TINY / "generate").end_id]
    assert not (out.parent / ".generate-work").exists()
    from ragstack.tokenization.generation import GeneratorTokenizer        # the BLS side reads the folder as it is

    assert GeneratorTokenizer(out).end_id == EngineSpec.read(TINY / "generate").end_id
