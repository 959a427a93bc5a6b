"""The xgrammar tokenizer-info file, read the way the TensorRT-LLM backend reads it, against xgrammar's own
``TokenizerInfo.from_huggingface`` of the same tokenizer (the tiny generator's)."""
import json
import shutil
from pathlib import Path

import pytest

xgrammar = pytest.importorskip("xgrammar")
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from engine_builds.build import main as build_main  # noqa: E402
from engine_builds.tokenizer_info import (KEYS, read_tokenizer_info, runtime_tokenizer_info,  # noqa: E402
                                          tokenizer_info, write_tokenizer_info)
from ragstack.engines.generation.guided import control_token_ids  # noqa: E402
from ragstack.engines.generation.guided import tokenizer_info as guided_tokenizer_info  # noqa: E402
from ragstack.governance.manifest import read_manifest, sha256_file, update_manifest  # noqa: E402

GENERATE = Path(__file__).resolve().parents[2] / "build" / "models" / "tiny" / "generate"
if not (GENERATE / "engine.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
          "required": ["answer", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(GENERATE))


@pytest.fixture(scope="module")
def vocab_size():
    """The logits width, which the runtime takes from the engine (not from the file)."""
    return AutoConfig.from_pretrained(str(GENERATE)).vocab_size


@pytest.fixture(scope="module")
def info_file(tmp_path_factory):
    return write_tokenizer_info(GENERATE, tmp_path_factory.mktemp("info") / "tokenizer_info.json")


def test_the_file_holds_exactly_what_the_backend_reads(info_file, tokenizer):
    data = json.loads(info_file.read_text(encoding="utf-8"))
    assert sorted(data) == sorted(KEYS)
    assert read_tokenizer_info(info_file) == data
    vocab = tokenizer.get_vocab()
    control = control_token_ids(tokenizer, keep=[tokenizer.eos_token_id])
    assert control and tokenizer.convert_tokens_to_ids("<|im_start|>") in control
    assert len(data["encoded_vocab"]) == max(vocab.values()) + 1
    assert all(data["encoded_vocab"][i] == ("" if i in control else token) for token, i in vocab.items())
    assert json.loads(data["tokenizer_str"]) == json.loads(tokenizer.backend_tokenizer.to_str())
    assert data["stop_token_ids"] == [tokenizer.eos_token_id]


def test_runtime_view_equals_the_reference_engines(info_file, tokenizer, vocab_size):
    """The TensorRT-LLM runtime's view of the file is the TokenizerInfo the reference generate engine builds."""
    runtime = runtime_tokenizer_info(read_tokenizer_info(info_file), vocab_size)
    expected = guided_tokenizer_info(tokenizer, vocab_size=vocab_size)
    assert runtime.vocab_size == expected.vocab_size == vocab_size
    assert runtime.vocab_type == expected.vocab_type == xgrammar.VocabType.BYTE_LEVEL
    assert runtime.add_prefix_space == expected.add_prefix_space
    assert runtime.decoded_vocab == expected.decoded_vocab
    assert runtime.stop_token_ids == expected.stop_token_ids
    assert runtime.special_token_ids == expected.special_token_ids
    assert runtime.dump_metadata() == expected.dump_metadata()


def test_a_guide_compiles_to_the_same_token_masks(info_file, tokenizer, vocab_size):
    """Same grammar, same masks: walk a valid JSON document token by token with both infos."""
    import torch

    runtime = runtime_tokenizer_info(read_tokenizer_info(info_file), vocab_size)
    expected = guided_tokenizer_info(tokenizer, vocab_size=vocab_size)
    matchers = [xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(i).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False)) for i in (runtime, expected)]
    text = json.dumps({"answer": "yes", "n": 3})          # xgrammar's default separators: ', ' and ': '
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    for token in ids:
        masks = []
        for matcher in matchers:
            bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
            matcher.fill_next_token_bitmask(bitmask)
            masks.append(bitmask)
        assert torch.equal(masks[0], masks[1])
        assert all(m.accept_token(token) for m in matchers)
    assert all(m.is_terminated() for m in matchers)


def test_control_tokens_are_never_text_inside_a_guided_string(info_file, tokenizer, vocab_size):
    """xgrammar from_huggingface would let <|im_start|> stand for 12 characters of a string; the detokenizer
    skips it, so the text would break the schema (a minLength string came out short)."""
    runtime = runtime_tokenizer_info(read_tokenizer_info(info_file), vocab_size)
    plain = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    schema = json.dumps({"type": "string", "minLength": 1, "maxLength": 64})
    control = sorted(control_token_ids(tokenizer, keep=[tokenizer.eos_token_id]))
    allowed = {}
    for name, info in (("file", runtime), ("from_huggingface", plain)):
        matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info).compile_json_schema(schema))
        assert matcher.accept_token(tokenizer.convert_tokens_to_ids('"'))     # inside the string now
        bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        bits = xgrammar.testing._get_masked_tokens_from_bitmask(bitmask, vocab_size)  # the rejected ids
        allowed[name] = [i for i in control if i not in set(bits)]
    assert allowed["file"] == []
    assert allowed["from_huggingface"], "xgrammar changed: control tokens are masked without our help"


def test_stop_ids_can_be_given(tokenizer):
    info = tokenizer_info(tokenizer, stop_token_ids=[tokenizer.eos_token_id, tokenizer.pad_token_id])
    assert info["stop_token_ids"] == [tokenizer.eos_token_id, tokenizer.pad_token_id]


def test_a_vocabulary_the_runtime_would_misread_is_refused(tokenizer, monkeypatch):
    """If tokenizer_str made the runtime detect another vocab type, guided decoding would mis-decode tokens."""
    monkeypatch.setattr(xgrammar.TokenizerInfo, "_detect_metadata_from_hf",
                        staticmethod(lambda s: {"vocab_type": xgrammar.VocabType.RAW, "add_prefix_space": False}))
    with pytest.raises(ValueError, match="decode tokens wrongly"):
        tokenizer_info(tokenizer)


def test_the_files_the_backend_rejects_are_rejected(tmp_path, info_file):
    data = read_tokenizer_info(info_file)
    for broken in ({k: v for k, v in data.items() if k != "tokenizer_str"},
                   {**data, "stop_token_ids": ["2"]}, {**data, "encoded_vocab": "abc"}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError):
            read_tokenizer_info(path)


def test_cli_writes_the_file_into_an_engine_folder_and_its_manifest(tmp_path):
    folder = shutil.copytree(GENERATE, tmp_path / "generate")
    update_manifest(folder, kind="generate", name="tiny", step="reference", args={}, tools={})
    assert build_main(["tokenizer-info", "--tokenizer-dir", str(folder)]) == 0
    manifest = read_manifest(folder)
    assert manifest.tokenizer_info_hash == sha256_file(folder / "tokenizer_info.json")
    assert "tokenizer_info" in manifest.steps
