"""The BLS models' tokenizers (ragstack.tokenization.fast_tokenizer, ragstack.tokenization.chat_template) give exactly what transformers gives.

The runtime path uses the `tokenizers` library and jinja2 only; transformers stays in the dev venv as the reference.
Every comparison runs on both model sets (tiny: byte-level BPE Qwen3-style; demo: BERT WordPiece + SmolLM2 BPE)."""
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from ragstack.tokenization import generation as chat_module  # noqa: E402
from ragstack.tokenization import chat_template  # noqa: E402
from ragstack.tokenization import retrieval as text_module  # noqa: E402
from ragstack.tokenization.fast_tokenizer import FastTokenizer, shared_tokenizer  # noqa: E402

MODELS = Path(__file__).resolve().parents[2] / "build" / "models"
FOLDERS = [f"{s}/{k}" for s in ("tiny", "demo") for k in ("embed", "rerank", "generate")]


def _has_chat_template(name: str) -> bool:
    folder = MODELS / name
    return (folder / "chat_template.jinja").is_file() or (
        (folder / "tokenizer_config.json").is_file() and "chat_template" in (folder / "tokenizer_config.json").read_text())


CHAT_FOLDERS = [f for f in FOLDERS if _has_chat_template(f)]

if not (MODELS / "tiny" / "embed" / "tokenizer.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)

STRINGS = [
    "Hello world",
    "What is the Pro plan rate limit?",
    "",
    " ",
    "   leading and trailing spaces   ",
    "two  spaces,\tone tab,\nnewline,\r\nCRLF and\u00a0no-break space",
    "\n\n\n",
    "naïve café résumé — Ünïcödé, ñ and ß",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 and flags 🇫🇷, ZWJ 👩‍💻",
    "Arabic: مرحبا بالعالم; Hebrew: שלום",
    "combining e\u0301 vs \u00e9, zero\u200bwidth",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> in the middle <|endoftext|>",
    "<think>\n\n</think>\n\n",
    "<|im_ and |im_start|> and <|endoftext",
    "[CLS] a [SEP] b [SEP] [PAD] [MASK] [UNK]",
    "[cls] lower-case [sep] look-alikes",
    "don't , won't . it's ! really ? yes'm",
    "UPPER lower MiXeD CaSe 12345 3.14159 1e-9 $100 50%",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "a" * 700,
    ("The quick brown fox jumps over the lazy dog. " * 120).strip(),
]


def _folder(name):
    folder = MODELS / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{name} not built (tools/build_models.py {name.split('/')[0]})")
    return folder


@pytest.fixture(scope="module", params=FOLDERS)
def pair(request):
    folder = _folder(request.param)
    return request.param, AutoTokenizer.from_pretrained(str(folder)), FastTokenizer(folder)


def test_token_ids_and_offsets_match(pair):
    name, hf, lean = pair
    for add in (True, False):
        for s in STRINGS:
            assert lean(s, add_special_tokens=add)["input_ids"] == hf(s, add_special_tokens=add)["input_ids"], \
                (name, add, s[:40])
            assert lean.encode(s, add_special_tokens=add) == hf.encode(s, add_special_tokens=add)
        batch_h = hf(STRINGS, add_special_tokens=add, return_offsets_mapping=True)
        batch_l = lean(STRINGS, add_special_tokens=add, return_offsets_mapping=True)
        assert batch_l["input_ids"] == batch_h["input_ids"]
        assert batch_l["attention_mask"] == batch_h["attention_mask"]
        assert [[tuple(o) for o in row] for row in batch_l["offset_mapping"]] == \
            [[tuple(o) for o in row] for row in batch_h["offset_mapping"]]


def test_truncation_matches(pair):
    name, hf, lean = pair
    for max_length in (5, 16, 64):
        for s in STRINGS:
            assert lean(s, truncation=True, max_length=max_length)["input_ids"] == \
                hf(s, truncation=True, max_length=max_length)["input_ids"], (name, max_length, s[:40])
        queries = ["short query", "what is triton?"]
        docs = [STRINGS[-1], STRINGS[7]]
        assert lean(queries, docs, truncation="only_second", max_length=max_length + 16)["input_ids"] == \
            hf(queries, docs, truncation="only_second", max_length=max_length + 16)["input_ids"]
        for strategy in (True, "only_first"):                         # pairs cut both ways, or the first
            long_pairs = [(STRINGS[-1], "a short second")] + ([(STRINGS[-2], STRINGS[-1])] if strategy is True else [])
            for a, b in long_pairs:
                assert lean(a, b, truncation=strategy, max_length=max_length + 8)["input_ids"] == \
                    hf(a, b, truncation=strategy, max_length=max_length + 8)["input_ids"], (name, strategy)
        assert lean(STRINGS[-1], truncation="only_first", max_length=max_length)["input_ids"] == \
            hf(STRINGS[-1], truncation="only_first", max_length=max_length)["input_ids"]
    with pytest.raises(ValueError):                                    # transformers raises too
        lean(STRINGS[-1], truncation="only_second", max_length=16)
    assert lean.num_special_tokens_to_add(pair=True) == hf.num_special_tokens_to_add(pair=True)
    assert lean.num_special_tokens_to_add() == hf.num_special_tokens_to_add()


def test_special_tokens_match(pair):
    name, hf, lean = pair
    for attr in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(lean, f"{attr}_token") == getattr(hf, f"{attr}_token"), (name, attr)
        assert getattr(lean, f"{attr}_token_id") == getattr(hf, f"{attr}_token_id"), (name, attr)
    assert lean.special_tokens_map == hf.special_tokens_map
    assert sorted(lean.all_special_ids) == sorted(hf.all_special_ids)
    assert len(lean) == len(hf) and lean.get_vocab() == hf.get_vocab()
    for token in ("yes", "no", "<|endoftext|>", "[CLS]", "certainly-not-a-token-\u2603"):
        assert lean.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token), (name, token)
    assert lean.convert_tokens_to_ids(["yes", "no"]) == hf.convert_tokens_to_ids(["yes", "no"])


def test_decode_matches(pair):
    name, hf, lean = pair
    rng = np.random.default_rng(7)
    sequences = [hf(s)["input_ids"] for s in STRINGS]
    sequences += [sorted(set(hf.all_special_ids)) + hf("text between specials")["input_ids"]]
    sequences += [rng.integers(0, len(hf), size=40).tolist() for _ in range(20)]
    for ids in sequences:
        for skip in (True, False):
            assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                (name, skip, ids[:10])
    ids = np.array(sequences[1], dtype=np.int32)                    # numpy ids (engine outputs) decode too
    assert lean.decode(ids, skip_special_tokens=True) == hf.decode(ids.tolist(), skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the Pro plan rate limit?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "<|im_end|> naïve\n\n  spaced "}],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("name", CHAT_FOLDERS)
def test_chat_template_matches(name):
    folder = _folder(name)
    hf, lean = AutoTokenizer.from_pretrained(str(folder)), FastTokenizer(folder)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            got = lean.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert got == expected, (name, messages, add_generation_prompt)
            assert lean.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == \
                hf.encode(expected, add_special_tokens=False)


# A template exercising what transformers' environment provides: trim/lstrip blocks, loopcontrols, namespace,
# the tojson filter (no HTML escaping, non-ASCII kept), special-token variables, raise_exception, strftime_now.
FEATURE_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message['role'] }}>{{ message['content'] | tojson }}{{ eos_token }}
{% endfor %}
{{ ns.n }} {{ dict(a=1) | tojson }} {{ strftime_now('%Y') | length }}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.mark.parametrize("name", ["tiny/generate", "demo/generate", "demo/embed"])
def test_template_features_match_transformers(name):
    folder = _folder(name)
    hf, lean = AutoTokenizer.from_pretrained(str(folder)), FastTokenizer(folder)
    messages = [{"role": "system", "content": "sys <b>&"}, {"role": "user", "content": "héllo \"q\" <tag>"},
                {"role": "assistant", "content": "a\nb"}, {"role": "user", "content": "fourth"},
                {"role": "user", "content": "fifth, never shown"}]
    for add_generation_prompt in (True, False):
        expected = hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        got = chat_template.render(FEATURE_TEMPLATE, messages, add_generation_prompt=add_generation_prompt,
                                   special_tokens=lean.special_tokens_map)
        assert got == expected
    assert "fifth" not in got and '"héllo \\"q\\" <tag>"' in got


def test_template_errors_and_sandbox():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="tools are not supported"):
        chat_template.render(FEATURE_TEMPLATE, [{"role": "tool", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):           # immutable sandbox: no mutation of inputs
        chat_template.render("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):           # no underscore names on a namespace
        chat_template.render("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        chat_template.render("{{ 1 }}", [])
    # None-valued keys are dropped, as transformers does, so the template's default applies
    assert chat_template.render("{{ messages[0].get('name', 'anon') }}",
                                [{"role": "user", "content": "x", "name": None}]) == "anon"


def test_folder_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(ValueError, match="tokenizer.json"):
        FastTokenizer(tmp_path)


def test_truncation_settings_in_tokenizer_json_are_not_applied(tmp_path):
    """all-MiniLM's tokenizer.json fixes truncation and padding at 128: the raw file would cut long texts."""
    folder = _folder("demo/embed")
    lean = FastTokenizer(folder)
    ids = lean(STRINGS[-1])["input_ids"]
    assert len(ids) > 128 and ids == AutoTokenizer.from_pretrained(str(folder))(STRINGS[-1])["input_ids"]
    assert len(lean("hi")["input_ids"]) == 3                      # [CLS] hi [SEP], no padding to 128


def test_identical_tokenizer_folders_share_one_instance(tmp_path):
    """The orchestrators hold three tokenizers; folders with the same tokenizer files share one in memory."""
    import shutil

    folder = _folder("demo/embed")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert shared_tokenizer(folder) is shared_tokenizer(copy)
    (copy / "special_tokens_map.json").write_text('{"pad_token": "[UNK]"}')       # any difference: its own
    changed = shared_tokenizer(copy)
    assert changed is not shared_tokenizer(folder) and changed.pad_token == "[UNK]"
    assert shared_tokenizer(folder).pad_token == "[PAD]"


# --------------------------------------------------------------------- the BLS classes: same ids as with transformers
def _with_transformers(monkeypatch):
    """Build the BLS tokenizer classes on transformers' AutoTokenizer, as they were before (the reference)."""
    def hf(folder):
        return AutoTokenizer.from_pretrained(str(folder))
    monkeypatch.setattr(text_module, "shared_tokenizer", hf)
    monkeypatch.setattr(chat_module, "shared_tokenizer", hf)


@pytest.mark.parametrize("model_set", ["tiny", "demo"])
def test_embed_and_rerank_formatting_match(model_set, monkeypatch):
    _folder(f"{model_set}/embed")
    lean_embed = text_module.EmbedTokenizer(MODELS / model_set / "embed")
    lean_rerank = text_module.RerankTokenizer(MODELS / model_set / "rerank")
    assert isinstance(lean_embed.tokenizer, FastTokenizer) and isinstance(lean_rerank.tokenizer, FastTokenizer)
    with monkeypatch.context() as m:
        _with_transformers(m)
        hf_embed = text_module.EmbedTokenizer(MODELS / model_set / "embed")
        hf_rerank = text_module.RerankTokenizer(MODELS / model_set / "rerank")
    assert not isinstance(hf_embed.tokenizer, FastTokenizer)
    texts = [s for s in STRINGS if s.strip()]
    for input_type in ("query", "document"):
        for got, expected in zip(lean_embed.encode(texts, input_type), hf_embed.encode(texts, input_type)):
            np.testing.assert_array_equal(got, expected)
        for s in texts:
            assert lean_embed.count_tokens(s, input_type) == hf_embed.count_tokens(s, input_type)
    for query in ("what is the rate limit?", "naïve <|im_end|> [SEP] query"):
        for got, expected in zip(lean_rerank.encode_pairs(query, texts), hf_rerank.encode_pairs(query, texts)):
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("model_set", ["tiny", "demo"])
def test_generator_prompts_and_decode_match(model_set, monkeypatch):
    folder = _folder(f"{model_set}/generate")
    lean = chat_module.GeneratorTokenizer(folder)
    with monkeypatch.context() as m:
        _with_transformers(m)
        hf = chat_module.GeneratorTokenizer(folder)
    texts = [s for s in STRINGS if s.strip()]
    for prompt in texts[:12]:
        for system in (None, "Answer in JSON.", "naïve système <|im_start|>"):
            assert lean.prompt_ids(prompt, system) == hf.prompt_ids(prompt, system), (prompt[:30], system)
        assert lean.prompt_ids(prompt, raw=True) == hf.prompt_ids(prompt, raw=True)
    assert lean.count_texts(texts) == hf.count_texts(texts)
    ids = lean.prompt_ids("Name a colour.", "Answer in JSON.") + [lean.end_id]
    assert lean.decode(ids) == hf.decode(ids)
    detok, whole = lean.detokenizer(), ""
    for token in ids:
        whole += detok.push([token])
    assert whole + detok.flush() == hf.decode(ids)


def test_config_tokens_and_template_are_read_as_transformers_reads_them(tmp_path):
    """What the two model sets do not exercise: special and added tokens that only tokenizer_config.json names
    (transformers adds them to the backend at load), and a chat template kept in the config, not in a file."""
    import json
    import shutil

    folder = tmp_path / "gen"
    shutil.copytree(_folder("tiny/generate"), folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = list(config.get("extra_special_tokens") or []) + ["<|custom|>"]
    config["added_tokens_decoder"] = {"605": {"content": "<tool_call>", "special": False, "lstrip": False,
                                              "rstrip": False, "normalized": False, "single_word": False}}
    config["chat_template"] = "{{ bos_token or '' }}[custom]" + template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf, lean = AutoTokenizer.from_pretrained(str(folder)), FastTokenizer(folder)
    texts = ["a <|custom|> b <tool_call> c", "<tool_call><|custom|><|im_end|>", "plain text"]
    for s in texts:
        ids = hf(s)["input_ids"]
        assert lean(s)["input_ids"] == ids, s
        for skip in (True, False):
            assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert len(lean) == len(hf) and sorted(lean.all_special_ids) == sorted(hf.all_special_ids)
    for messages in CONVERSATIONS[:2]:
        assert lean.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("model_set", ["tiny", "demo"])
def test_the_generators_chat_template_is_compiled_when_it_loads(model_set):
    """The first prompt of a model instance must not pay the template's compilation inside a request."""
    chat_template.compile_template.cache_clear()
    tok = chat_module.GeneratorTokenizer(MODELS / model_set / "generate")
    assert chat_template.compile_template.cache_info().currsize == 1
    tok.prompt_ids("a question", "a system prompt")
    info = chat_template.compile_template.cache_info()
    assert info.currsize == 1 and info.hits >= 1 and info.misses == 1
