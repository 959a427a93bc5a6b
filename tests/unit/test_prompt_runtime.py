"""ragstack.pipeline.prompt_runtime and tools/prompt_runtime_summary.py: the evaluation tool's manifests vs engine and
policy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ragstack.governance.policy import RuntimePolicy
from ragstack.pipeline.prompt_runtime import ManifestError, PromptRuntimeManager, format_summary, read_prompt_manifest

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "config" / "runtime_policy.json"
ENGINE = {"engine_hash": "e" * 64, "quantisation": "w4a8", "tokenizer_hash": "t" * 64,
          "tokenizer_info_hash": "i" * 64, "price_per_1k_input_usd": 0.001}
THRESHOLDS = {"max_queue_delay_us": 2500, "max_tokens": 6000, "max_cost_usd": 0.10}


def manifest(name, **over):
    m = {"name": name, "engine_hash": ENGINE["engine_hash"], "tokenizer_info_hash": ENGINE["tokenizer_info_hash"],
         "thresholds": dict(THRESHOLDS), "tasks": ["answer", "judge"], "description": "eval slice"}
    m.update(over)
    return m


def write(folder: Path, filename: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def policy():
    return RuntimePolicy.load(POLICY)


def test_aligned_manifests(tmp_path, policy):
    write(tmp_path, "answers.json", manifest("answers"))
    # hashes compare case-insensitively; 0.1 written as 0.10000000000000001 is the same number
    write(tmp_path, "judge.json", manifest("judge", engine_hash="E" * 64,
                                           thresholds={**THRESHOLDS, "max_cost_usd": 0.10000000000000001}))
    s = PromptRuntimeManager(ENGINE, policy, tmp_path).summary()
    assert s["aligned"] is True and s["problems"] == []
    assert [(m["name"], m["aligned"], m["mismatches"]) for m in s["manifests"]] == [
        ("answers", True, []), ("judge", True, [])]
    assert s["expected"] == {"engine_hash": ENGINE["engine_hash"], "tokenizer_info_hash": ENGINE["tokenizer_info_hash"],
                             "thresholds": THRESHOLDS}
    assert s["sources"]["policy"] == str(POLICY)


def test_mismatches_are_listed_by_field(tmp_path, policy):
    write(tmp_path, "a.json", manifest("old-engine", engine_hash="0" * 64,
                                       thresholds={"max_queue_delay_us": 3000, "max_tokens": 6000}))
    write(tmp_path, "b.json", manifest("new-tok", tokenizer_info_hash="x", tasks=["answer", "summarise"],
                                       thresholds={**THRESHOLDS, "max_tokens": "6000"}))
    write(tmp_path, "c.json", manifest("fine"))
    s = PromptRuntimeManager(ENGINE, policy, tmp_path).summary()
    assert s["aligned"] is False
    by_name = {m["name"]: m for m in s["manifests"]}
    assert by_name["old-engine"]["mismatches"] == [
        {"field": "engine_hash", "expected": "e" * 64, "found": "0" * 64},
        {"field": "thresholds.max_queue_delay_us", "expected": 2500, "found": 3000},
        {"field": "thresholds.max_cost_usd", "expected": 0.10, "found": None},
    ]
    assert by_name["new-tok"]["mismatches"] == [
        {"field": "tokenizer_info_hash", "expected": "i" * 64, "found": "x"},
        {"field": "thresholds.max_tokens", "expected": 6000, "found": "6000"},   # a string is not the number
        {"field": "tasks", "expected": "tasks of the runtime policy (answer, generate_json, judge, quote, rank_candidates)",
         "found": ["summarise"]},
    ]
    assert by_name["fine"]["aligned"] is True
    text = format_summary(s)
    assert "MISMATCH old-engine" in text and "OK       fine" in text and text.endswith("NOT aligned")
    assert "thresholds.max_queue_delay_us: expected 2500, found 3000" in text


def test_thresholds_follow_the_policy_not_hard_coded_numbers(tmp_path):
    data = json.loads(POLICY.read_text())
    data["thresholds"]["max_cost_usd"] = 0.25
    stricter = RuntimePolicy.from_dict(data)
    write(tmp_path, "a.json", manifest("a"))
    s = PromptRuntimeManager(ENGINE, stricter, tmp_path).summary()
    assert s["manifests"][0]["mismatches"] == [{"field": "thresholds.max_cost_usd", "expected": 0.25, "found": 0.10}]


@pytest.mark.parametrize("content, error", [
    ("{not json", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    (json.dumps({"name": "x"}), "missing key(s) engine_hash, tokenizer_info_hash, thresholds"),
    (json.dumps({**manifest("x"), "engine": "y"}), "unknown key(s) engine"),
    (json.dumps(manifest("x", thresholds=[])), "thresholds must be an object"),
    (json.dumps(manifest("x", tasks="answer")), "tasks must be a list"),
    (json.dumps(manifest("")), "name must be a non-empty string"),
])
def test_malformed_manifests_are_reported_not_raised(tmp_path, policy, content, error):
    path = write(tmp_path, "broken.json", content)
    with pytest.raises(ManifestError, match=error.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_manifest(path)
    s = PromptRuntimeManager(ENGINE, policy, tmp_path).summary()
    assert s["aligned"] is False
    assert s["manifests"] == [{"name": "broken", "path": str(path), "aligned": False, "mismatches": [],
                               "errors": [s["manifests"][0]["errors"][0]]}]
    assert error in s["manifests"][0]["errors"][0]


def test_folder_level_problems(tmp_path, policy):
    s = PromptRuntimeManager(ENGINE, policy, tmp_path / "nope").summary()
    assert not s["aligned"] and "does not exist" in s["problems"][0]
    s = PromptRuntimeManager(ENGINE, policy, tmp_path).summary()
    assert not s["aligned"] and "no prompt runtime manifests" in s["problems"][0]
    write(tmp_path, "a.json", manifest("same"))
    write(tmp_path, "b.json", manifest("same"))
    s = PromptRuntimeManager(ENGINE, policy, tmp_path).summary()
    assert not s["aligned"] and "manifest name 'same' is used by both" in s["problems"][0]


def test_engine_manifest_must_carry_the_hashes(tmp_path, policy):
    with pytest.raises(ValueError, match="engine manifest has no tokenizer_info_hash"):
        PromptRuntimeManager({"engine_hash": "e"}, policy, tmp_path)


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "prompt_runtime_summary.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_exit_codes_and_output(tmp_path):
    engine = write(tmp_path, "manifest.json", ENGINE)
    folder = tmp_path / "prompt_runtimes"
    write(folder, "a.json", manifest("a"))
    ok = run_cli("--engine-manifest", engine, "--policy", POLICY, "--manifests", folder)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("aligned") and "OK       a" in ok.stdout

    write(folder, "b.json", manifest("b", engine_hash="f" * 64))
    bad = run_cli("--engine-manifest", engine, "--manifests", folder, "--json")   # default policy file
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["aligned"] is False and report["manifests"][1]["mismatches"][0]["field"] == "engine_hash"

    missing = run_cli("--engine-manifest", tmp_path / "none.json", "--manifests", folder)
    assert missing.returncode == 2 and "engine manifest" in missing.stderr
