"""ragstack.governance.manifest: real hashes of real files, and every change to a file shows in the manifest."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ragstack.governance.manifest import (MANIFEST_FILE, build_manifest, combined_hash, engine_files, read_manifest,
                               sha256_file, tokenizer_hash, update_manifest, verify_manifest, write_manifest)

TINY = Path(__file__).resolve().parents[2] / "build" / "models" / "tiny"
TOOLS = {"torch": "2.13.0", "onnx": "1.22.0"}


@pytest.fixture
def folder(tmp_path):
    """An engine folder: a plan, an ONNX graph with external data, engine.json, a tokenizer."""
    (tmp_path / "model.plan").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "model.onnx").write_bytes(b"onnx graph")
    (tmp_path / "model.onnx.data").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "engine.json").write_text('{"kind": "embed"}\n')
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "X"}')
    (tmp_path / "notes.txt").write_text("not part of the engine")
    return tmp_path


def _flip_one_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_file_hashes_are_sha256_of_the_bytes(folder):
    files = engine_files(folder)
    assert sorted(files) == ["engine.json", "model.onnx", "model.onnx.data", "model.plan"]
    for name, digest in files.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_manifest_records_hashes_tokenizer_and_build(folder):
    m = build_manifest(folder, kind="embed", name="tiny", step="plan", args={"precision": "fp8", "out": folder},
                       tools=TOOLS, quantisation="fp8", now="2026-01-01T00:00:00Z")
    assert m.engine_hash == combined_hash(m.files)
    assert m.tokenizer_files == {"tokenizer.json": sha256_file(folder / "tokenizer.json"),
                                 "tokenizer_config.json": sha256_file(folder / "tokenizer_config.json")}
    assert m.tokenizer_hash == tokenizer_hash(folder)
    assert m.tokenizer_info_hash is None
    assert m.steps["plan"] == {"args": {"precision": "fp8", "out": str(folder)}, "tools": TOOLS,
                               "utc": "2026-01-01T00:00:00Z"}
    assert m.headers() == {"X-Engine-Hash": m.engine_hash, "X-Quantisation": "fp8"}


@pytest.mark.parametrize("name", ["model.plan", "model.onnx.data", "engine.json"])
def test_changing_one_byte_of_an_engine_file_changes_the_engine_hash(folder, name):
    before = build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={})
    _flip_one_byte(folder / name, offset=len((folder / name).read_bytes()) // 2)
    after = build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={})
    assert after.files[name] != before.files[name]
    assert after.engine_hash != before.engine_hash
    assert {k: v for k, v in after.files.items() if k != name} == \
           {k: v for k, v in before.files.items() if k != name}


def test_changing_the_tokenizer_changes_only_the_tokenizer_hash(folder):
    before = build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={})
    _flip_one_byte(folder / "tokenizer.json", offset=2)
    after = build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={})
    assert after.tokenizer_hash != before.tokenizer_hash
    assert after.engine_hash == before.engine_hash


def test_renaming_or_adding_a_file_changes_the_engine_hash(folder):
    before = combined_hash(engine_files(folder))
    (folder / "model.plan").rename(folder / "other.plan")
    renamed = combined_hash(engine_files(folder))
    (folder / "extra.engine").write_bytes(b"x")
    assert len({before, renamed, combined_hash(engine_files(folder))}) == 3


def test_combined_hash_ignores_listing_order():
    a = {"b.plan": "1" * 64, "a.onnx": "2" * 64}
    assert combined_hash(a) == combined_hash(dict(reversed(list(a.items()))))


def test_hidden_work_folders_are_not_engine_files(folder):
    (folder / ".work").mkdir()
    (folder / ".work" / "checkpoint.safetensors").write_bytes(b"w")
    (folder / "trtllm").mkdir()
    (folder / "trtllm" / "rank0.engine").write_bytes(b"e")
    (folder / "trtllm" / "config.json").write_text("{}")
    files = engine_files(folder)
    assert "trtllm/rank0.engine" in files and "trtllm/config.json" in files
    assert not any(name.startswith(".work") for name in files)


def test_round_trip_and_steps_accumulate(folder):
    update_manifest(folder, kind="embed", name="tiny", step="onnx", args={"opset": 18}, tools=TOOLS,
                    quantisation="none (fp32 ONNX)")
    update_manifest(folder, kind="embed", name="tiny", step="plan", args={"attempt": "fp16"}, tools={},
                    quantisation="fp16")
    m = read_manifest(folder)
    assert set(m.steps) == {"onnx", "plan"} and m.quantisation == "fp16"
    assert json.loads((folder / MANIFEST_FILE).read_text())["engine_hash"] == m.engine_hash
    assert read_manifest(folder / MANIFEST_FILE) == m
    # A later step without a quantisation of its own keeps the recorded one.
    (folder / "tokenizer_info.json").write_text("{}")
    m2 = update_manifest(folder, kind="embed", name="tiny", step="tokenizer_info", args={}, tools={})
    assert m2.quantisation == "fp16" and m2.tokenizer_info_hash == sha256_file(folder / "tokenizer_info.json")


def test_verify_names_what_changed(folder):
    write_manifest(folder, build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={}))
    assert verify_manifest(folder) == []
    _flip_one_byte(folder / "model.plan")
    (folder / "model.onnx").unlink()
    (folder / "new.plan").write_bytes(b"n")
    _flip_one_byte(folder / "tokenizer_config.json", offset=3)
    problems = "\n".join(verify_manifest(folder))
    assert "model.plan has changed" in problems
    assert "model.onnx is missing" in problems
    assert "new.plan is not in the manifest" in problems
    assert "tokenizer_config.json has changed" in problems


def test_a_folder_without_engine_files_has_no_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no engine files"):
        build_manifest(tmp_path, kind="embed", name="t", step="s", args={}, tools={})


def test_unknown_fields_and_schemas_are_refused(folder):
    write_manifest(folder, build_manifest(folder, kind="embed", name="t", step="s", args={}, tools={}))
    data = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(ValueError, match="unknown manifest fields"):
        read_manifest(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({**data, "schema": 99}))
    with pytest.raises(ValueError, match="schema"):
        read_manifest(folder)


@pytest.mark.skipif(not (TINY / "embed" / "engine.json").is_file(), reason="tiny models not built")
def test_a_reference_model_folder_gets_a_manifest(tmp_path):
    folder = shutil.copytree(TINY / "embed", tmp_path / "embed", ignore=shutil.ignore_patterns(MANIFEST_FILE))
    m = update_manifest(folder, kind="embed", name="tiny", step="reference", args={}, tools={})
    assert {"model.safetensors", "config.json", "engine.json"} <= set(m.files)
    assert m.files["model.safetensors"] == sha256_file(TINY / "embed" / "model.safetensors")
    assert m.tokenizer_hash == tokenizer_hash(TINY / "embed") and m.quantisation == "none"


@pytest.mark.skipif(not (TINY / "generate" / "engine.json").is_file(), reason="tiny models not built")
def test_cli_sets_the_prices_the_cost_policy_reads(tmp_path):
    from engine_builds.build import main as build_main

    folder = shutil.copytree(TINY / "generate", tmp_path / "generate", ignore=shutil.ignore_patterns(MANIFEST_FILE))
    assert build_main(["manifest", str(folder), "--quantisation", "w4a8_awq, kv fp8", "--price-per-1k-input", "0.2",
                       "--price-per-1k-output", "0.6"]) == 0
    m = read_manifest(folder)
    assert m.pricing == {"price_per_1k_input_usd": 0.2, "price_per_1k_output_usd": 0.6}
    assert m.quantisation == "w4a8_awq, kv fp8" and m.kind == "generate" and verify_manifest(folder) == []
    assert build_main(["manifest", str(folder), "--price-per-1k-input", "0.2"]) == 2
