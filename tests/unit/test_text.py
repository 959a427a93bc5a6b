"""ragstack.tokenization.retrieval: the ids the BLS models hand to the embed and rerank engines."""
from pathlib import Path

import numpy as np
import pytest

from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.retrieval import (PAD_MULTIPLE, QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX, SPLIT_PROBES,
                                             EmbedTokenizer, RerankTokenizer, TokenCache, pad_batch)

MODELS = Path(__file__).resolve().parents[2] / "build" / "models"
TINY, DEMO = MODELS / "tiny", MODELS / "demo"
TASK = "Given a web search query, retrieve relevant passages that answer the query"
LONG = "the reranker scores three documents and the tokenizer reads token ids. " * 200

if not (TINY / "embed" / "engine.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)
needs_demo = pytest.mark.skipif(not (DEMO / "rerank" / "engine.json").is_file(), reason="demo set not built")


@pytest.fixture(scope="module")
def embed_tok():
    return EmbedTokenizer(TINY / "embed")


@pytest.fixture(scope="module")
def rerank_tok():
    return RerankTokenizer(TINY / "rerank")


def real_rows(input_ids, attention_mask):
    return [row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask)]


def test_query_format_and_appended_eos(embed_tok):
    assert embed_tok.format("what is triton", "query") == f"Instruct: {TASK}\nQuery:what is triton"
    assert embed_tok.format("what is triton", "query", task="Find code") == "Instruct: Find code\nQuery:what is triton"
    assert embed_tok.format("a passage", "document") == "a passage"
    eos = embed_tok.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids, mask, lengths = embed_tok.encode(["what is triton", "a passage"], "query")
    rows = real_rows(ids, mask)
    expected = embed_tok.tokenizer(f"Instruct: {TASK}\nQuery:what is triton", add_special_tokens=False)["input_ids"]
    assert rows[0] == expected + [eos]
    assert all(row[-1] == eos for row in rows)
    assert lengths.tolist() == [len(r) for r in rows]
    assert embed_tok.count_tokens("what is triton", "query") == len(rows[0])


def test_padding_to_multiple_of_16_on_the_left(embed_tok):
    ids, mask, lengths = embed_tok.encode(["short", "a somewhat longer document about the index and the cache"],
                                          "document")
    assert ids.dtype == mask.dtype == lengths.dtype == np.int32
    assert ids.shape[1] % PAD_MULTIPLE == 0 and ids.shape[1] - PAD_MULTIPLE < lengths.max() <= ids.shape[1]
    assert (mask[:, -1] == 1).all()                              # left padding: every row ends with a real token
    assert (ids[mask == 0] == embed_tok.tokenizer.pad_token_id).all()


def test_truncation_keeps_eos_last_and_caps_the_width(embed_tok):
    ids, mask, lengths = embed_tok.encode([LONG, "short"], "document")
    assert ids.shape == (2, embed_tok.spec.max_length) and lengths[0] == embed_tok.spec.max_length
    assert ids[0, -1] == embed_tok.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert embed_tok.count_tokens(LONG) > embed_tok.spec.max_length


def test_pad_batch_sides():
    left_ids, left_mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left", max_length=512)
    right_ids, right_mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right", max_length=512)
    assert left_ids.shape == right_ids.shape == (2, 16)
    assert left_ids[0, -3:].tolist() == [5, 6, 7] and left_ids[1, -1] == 8 and left_mask.sum() == 4
    assert right_ids[0, :3].tolist() == [5, 6, 7] and right_ids[1, 0] == 8 and right_mask.sum() == 4
    assert pad_batch([[1] * 20], 0, "right", max_length=24)[0].shape == (1, 24)   # 32 capped at max_length


def test_rerank_prompt_is_prefix_body_suffix(rerank_tok):
    tok = rerank_tok.tokenizer
    ids, mask = rerank_tok.encode_pairs("what is triton", ["an inference server", "a fish"])
    assert ids.shape[1] % PAD_MULTIPLE == 0 and (mask[:, -1] == 1).all()
    body = f"<Instruct>: {TASK}\n<Query>: what is triton\n<Document>: an inference server"
    expected = [tok(part, add_special_tokens=False)["input_ids"] for part in
                (QWEN3_RERANK_PREFIX, body, QWEN3_RERANK_SUFFIX)]
    assert real_rows(ids, mask)[0] == expected[0] + expected[1] + expected[2]
    assert tok.decode(real_rows(ids, mask)[1]).endswith("<Document>: a fish<|im_end|>\n<|im_start|>assistant\n"
                                                        "<think>\n\n</think>\n\n")


def test_rerank_truncation_cuts_only_the_body(rerank_tok):
    tok = rerank_tok.tokenizer
    ids, mask = rerank_tok.encode_pairs("what is triton", [LONG, "short"], task="Find it")
    assert ids.shape == (2, rerank_tok.spec.max_length)
    long_row, short_row = real_rows(ids, mask)
    assert len(long_row) == rerank_tok.spec.max_length
    prefix, suffix = rerank_tok.prefix_ids, rerank_tok.suffix_ids
    assert long_row[:len(prefix)] == prefix and long_row[-len(suffix):] == suffix
    body = tok.decode(long_row[len(prefix):-len(suffix)])
    assert body.startswith("<Instruct>: Find it\n<Query>: what is triton\n<Document>: the reranker scores")
    assert len(body) < len(LONG)
    assert short_row[-len(suffix):] == suffix


def _documents(seed: int = 0) -> list:
    """The corpus cut into overlapping passages, the split probes, and random strings over the characters that
    pre-tokenizers treat specially (spaces, newlines, punctuation, digits, accents, combining marks, emoji, CJK,
    special tokens, contractions)."""
    import random

    docs = []
    for path in sorted((Path(__file__).resolve().parents[2] / "data" / "corpus").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        docs += [text[i:i + 900] for i in range(0, len(text), 700)]
    rng = random.Random(seed)
    alphabet = list("abc XYZ:;.,!?\n\t\r  '\"()-_<>|/\\0123456789") + [
        "\u00e9", "\u0301", "\U0001f642", "\u4e2d", "<|im_end|>", "<|endoftext|>", "'s", "'ll", "\u00a0"]
    docs += list(SPLIT_PROBES)
    docs += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(1500)]
    return [d for d in docs if d.strip()]


def _rerank_folder_with(tmp_path, tokenizer_folder: Path) -> Path:
    """The tiny reranker's engine folder with another model's tokenizer files."""
    import shutil

    folder = tmp_path / f"rerank-{tokenizer_folder.parent.name}-{tokenizer_folder.name}"
    shutil.copytree(TINY / "rerank", folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


@pytest.mark.parametrize("tokenizer", ["tiny/rerank", "demo/generate"])
def test_rerank_rows_from_cached_documents_equal_the_whole_prompt(tokenizer, tmp_path):
    """The head tokenized once and each document on its own give the ids of the whole prompt, on the tiny
    reranker's tokenizer and on SmolLM2's (the demo generator: another byte-level BPE)."""
    folder = MODELS / tokenizer
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not built")
    tok = RerankTokenizer(folder if tokenizer == "tiny/rerank" else _rerank_folder_with(tmp_path, folder))
    assert tok.split
    docs = _documents()
    queries = ["what is the rate limit?", "ends in a colon:", "  spaced\nquery  ", "'s", "\U0001f642?"]
    for i in range(0, len(docs), 8):
        batch, query = docs[i:i + 8], queries[(i // 8) % len(queries)]
        whole = tok._whole_rows(query, batch, TASK)
        split = tok._split_rows(query, batch, TASK, tok._document_ids(batch))
        for w, s, doc in zip(whole, split, batch):
            assert list(s) == list(w), f"document {doc!r}"
    # and through encode_pairs, cache cold then warm, long documents cut where the whole prompt is cut
    batch = docs[:6] + [LONG]
    for _ in range(2):
        got = tok.encode_pairs("what is the rate limit?", batch)
        tok.split = False
        expected = tok.encode_pairs("what is the rate limit?", batch)
        tok.split = True
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert tok.documents.hits >= len(batch)


def test_a_tokenizer_that_merges_across_the_space_tokenizes_whole(tmp_path):
    """A byte-level BPE without the pre-tokenizer's regex merges ':' with the space after it: a document's ids
    on their own differ, so the reranker tokenizes every prompt whole (the check at load finds it)."""
    import json as json_mod

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = _rerank_folder_with(tmp_path, TINY / "rerank")
    merged = Tokenizer(models.BPE())
    merged.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    merged.decoder = decoders.ByteLevel()
    corpus = ["<Document>: a passage about the cache", "<Query>: the cache: answer"] * 50
    special = json_mod.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    merged.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[t["content"] for t in special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merged.save(str(folder / "tokenizer.json"))
    tok = RerankTokenizer(folder)
    assert not tok.split
    docs = ["a passage about the cache", "the cache"]
    split = tok._split_rows("q", docs, TASK, tok._document_ids(docs))
    assert [list(r) for r in split] != tok._whole_rows("q", docs, TASK)
    ids, mask = tok.encode_pairs("the cache", docs)
    assert real_rows(ids, mask) == tok._whole_rows("the cache", docs, TASK) and len(tok.documents) == 0


def test_token_cache_keeps_the_most_recent_within_its_token_bound():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return [[len(t)] * len(t) for t in texts]          # a text of n characters: n tokens
    cache = TokenCache(encode, max_tokens=10)
    first = cache.get(["aaaa", "bbb", "aaaa"])
    assert calls == [["aaaa", "bbb"]] and first[0] is first[2] and first[0].dtype == np.int32
    assert cache.get(["bbb"])[0] is first[1] and calls == [["aaaa", "bbb"]] and cache.hits == 1
    cache.get(["cccccc"])                                  # 4 + 3 + 6 > 10: the least recent (aaaa) goes
    assert cache.tokens == 9 and len(cache) == 2
    cache.get(["aaaa"])
    assert calls[-1] == ["aaaa"]
    cache.get(["x" * 11])                                  # longer than the bound: served, not kept
    assert cache.tokens <= 10 and "x" * 11 not in cache._ids
    off = TokenCache(encode, max_tokens=0)
    off.get(["a"])
    off.get(["a"])
    assert len(off) == 0 and off.misses == 2


@pytest.mark.parametrize("call, message", [
    (lambda t: t.encode([""], "query"), r"texts\[0\] is empty"),
    (lambda t: t.encode(["  \n"], "document"), r"texts\[0\] is empty"),
    (lambda t: t.encode(["ok", 3], "document"), r"texts\[1\] must be a string, got int"),
    (lambda t: t.encode("not a list", "document"), "must be a list"),
    (lambda t: t.encode([], "document"), "empty list"),
    (lambda t: t.encode(["ok"], "passage"), "input_type must be one of"),
    (lambda t: t.format("ok", "query", task=" "), "task is empty"),
])
def test_embed_bad_inputs(embed_tok, call, message):
    with pytest.raises(InvalidInput, match=message):
        call(embed_tok)


@pytest.mark.parametrize("query, documents, message", [
    ("", ["doc"], "query is empty"),
    (None, ["doc"], "query must be a string"),
    ("q", [], "documents is an empty list"),
    ("q", ["fine", " "], r"documents\[1\] is empty"),
    ("q", "doc", "documents must be a list"),
])
def test_rerank_bad_inputs(rerank_tok, query, documents, message):
    with pytest.raises(InvalidInput, match=message):
        rerank_tok.encode_pairs(query, documents)


@needs_demo
def test_bert_conventions():
    embed_tok, rerank_tok = EmbedTokenizer(DEMO / "embed"), RerankTokenizer(DEMO / "rerank")
    tok = rerank_tok.tokenizer
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    ids, mask, _ = embed_tok.encode(["what is triton", LONG], "query")
    rows = real_rows(ids, mask)
    assert rows[0] == [cls_id] + tok("what is triton", add_special_tokens=False)["input_ids"] + [sep_id]
    assert (mask[:, 0] == 1).all() and len(rows[1]) == ids.shape[1] == embed_tok.spec.max_length
    assert rows[1][-1] == sep_id

    ids, mask = rerank_tok.encode_pairs("what is triton", ["an inference server", LONG])
    query_ids = tok("what is triton", add_special_tokens=False)["input_ids"]
    rows = real_rows(ids, mask)
    assert rows[0] == ([cls_id] + query_ids + [sep_id]
                       + tok("an inference server", add_special_tokens=False)["input_ids"] + [sep_id])
    assert rows[1][:len(query_ids) + 2] == [cls_id] + query_ids + [sep_id]
    assert len(rows[1]) == rerank_tok.spec.max_length and rows[1][-1] == sep_id
    with pytest.raises(InvalidInput, match="query is .* tokens; this reranker takes at most"):
        rerank_tok.encode_pairs(LONG, ["doc"])
