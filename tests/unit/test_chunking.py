"""ragstack.pipeline.chunking: token-aware chunks that are exact substrings, fit the budget and cut at natural breaks."""
from pathlib import Path

import pytest

from ragstack.pipeline.chunking import Chunk, chunk_text
from ragstack.contracts.errors import InvalidInput
from ragstack.tokenization.retrieval import EmbedTokenizer

TINY_EMBED = Path(__file__).resolve().parents[2] / "build" / "models" / "tiny" / "embed"
if not (TINY_EMBED / "engine.json").is_file():
    pytest.skip("tiny models not built: run tools/build_models.py tiny", allow_module_level=True)

MARKDOWN = """# Guide

An introduction to the guide. It explains what the stack does and why.

## Install

Run the installer first. Then check the install with the doctor command: it reports every problem.
Unicode is fine too: 日本語のテキスト, café, naïve, and an emoji 😀 here.

```sh
# a comment, not a heading
make install
```

### Options

Options go in the config file. Each option has a default value.

## Use

Start the server. Send it requests. Read the responses carefully, they carry the scores.
"""


@pytest.fixture(scope="module")
def tok():
    return EmbedTokenizer(TINY_EMBED)


def content_tokens(tok, text):
    return len(tok.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_chunks(doc, chunks, tok, max_tokens):
    """The invariants every chunking must satisfy."""
    assert chunks and [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert doc[c.start:c.end] == c.text and c.text == c.text.strip() and c.text
        assert c.token_count == tok.count_tokens(c.text) <= max_tokens
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.start < nxt.start and prev.end < nxt.end
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(ch.isspace() for i, ch in enumerate(doc) if i not in covered)


@pytest.mark.parametrize("max_tokens,overlap", [(8, 0), (8, 7), (24, 6), (64, 16), (200, 0), (512, 100)])
def test_invariants_on_markdown(tok, max_tokens, overlap):
    check_chunks(MARKDOWN, chunk_text(MARKDOWN, tok, max_tokens, overlap), tok, max_tokens)


def test_short_document_is_one_chunk(tok):
    doc = "  A short note.\n"
    assert chunk_text(doc, tok, 64, 8) == [Chunk(0, "A short note.", 2, 15, tok.count_tokens("A short note."), {})]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_blank_document_is_refused(tok, text):
    with pytest.raises(InvalidInput, match="empty"):
        chunk_text(text, tok, 64)


@pytest.mark.parametrize("max_tokens,overlap", [(7, 0), (0, 0), (64, 64), (64, 65), (64, -1), (64.0, 0), (64, 1.5),
                                                (True, 0), (513, 0)])
def test_bad_limits_are_refused(tok, max_tokens, overlap):
    with pytest.raises(InvalidInput, match="max_tokens|overlap"):
        chunk_text("some text", tok, max_tokens, overlap)


def test_not_a_string_is_refused(tok):
    with pytest.raises(InvalidInput, match="string"):
        chunk_text(b"bytes", tok, 64)


def test_cuts_at_the_paragraph_break_in_the_last_quarter(tok):
    first = "The first paragraph talks about one thing, in some detail."
    budget = tok.count_tokens(first) + 6          # the break falls in the window's last quarter
    doc = first + "\n\n" + "The second paragraph is much longer and talks about other things. " * 5
    chunks = chunk_text(doc, tok, budget, 0)
    assert chunks[0].text == first
    assert chunks[1].text.startswith("The second paragraph")


def test_cuts_after_a_sentence_rather_than_mid_sentence(tok):
    first = "One sentence here."
    rest = " And then a second sentence that runs well past the end of the window for sure."
    chunks = chunk_text(first + rest, tok, tok.count_tokens(first) + 4, 0)
    assert chunks[0].text == first


def test_prefers_the_stronger_break(tok):
    # A paragraph break, then a sentence end, both in the window's last quarter: the paragraph wins.
    first = "Alpha beta gamma delta epsilon."
    doc = first + "\n\nZeta. Theta iota kappa lambda mu nu xi omicron pi rho."
    max_tokens = tok.count_tokens(first + "\n\nZeta. Th")
    assert content_tokens(tok, first + "\n\n") >= 0.75 * (max_tokens - 1)     # the setup is what it claims
    assert chunk_text(doc, tok, max_tokens, 0)[0].text == first


def test_without_breaks_cuts_full_windows_at_token_boundaries(tok):
    doc = "abcdefghijklmnopqrstuvwxyz" * 20
    chunks = chunk_text(doc, tok, 32, 0)
    check_chunks(doc, chunks, tok, 32)
    assert all(c.token_count == 32 for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == doc


def test_never_splits_a_multibyte_character(tok):
    # Every character here is several byte-level tokens; windows of 8 tokens cannot end on every one.
    doc = "日本語😀テキスト🎉" * 30
    for max_tokens in (8, 9, 10, 13):
        chunks = chunk_text(doc, tok, max_tokens, 0)
        check_chunks(doc, chunks, tok, max_tokens)
        assert "".join(c.text for c in chunks) == doc
        for c in chunks:
            assert tok.tokenizer.decode(tok.tokenizer(c.text, add_special_tokens=False)["input_ids"]) == c.text


@pytest.mark.parametrize("overlap", [4, 10, 20])
def test_consecutive_chunks_overlap_by_about_overlap_tokens(tok, overlap):
    doc = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(doc, tok, 48, overlap)
    check_chunks(doc, chunks, tok, 48)
    for prev, nxt in zip(chunks, chunks[1:]):
        shared = doc[nxt.start:prev.end]
        assert prev.text.endswith(shared) and nxt.text.startswith(shared)
        assert overlap - overlap // 4 - 2 <= content_tokens(tok, shared) <= overlap + overlap // 4 + 1
        if overlap >= 10:     # room to move to a word start (tiny's words are several tokens)
            assert doc[nxt.start - 1] == " "


def test_no_overlap_means_disjoint_chunks_that_rebuild_the_document(tok):
    chunks = chunk_text(MARKDOWN, tok, 40, 0)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.end <= nxt.start and not MARKDOWN[prev.end:nxt.start].strip()


HEADINGS = {MARKDOWN.index(line + "\n"): line for line in ("# Guide", "## Install", "### Options", "## Use")}


def expected_heading_path(start):
    """The heading path at ``start``, spelled out for MARKDOWN."""
    current = max(pos for pos in HEADINGS if pos <= start)
    return {"# Guide": "# Guide", "## Install": "# Guide > ## Install",
            "### Options": "# Guide > ## Install > ### Options", "## Use": "# Guide > ## Use"}[HEADINGS[current]]


def test_markdown_heading_path(tok):
    chunks = chunk_text(MARKDOWN, tok, 40, 8)
    assert [c.metadata["heading_path"] for c in chunks] == [expected_heading_path(c.start) for c in chunks]
    assert {c.metadata["heading_path"] for c in chunks} == {expected_heading_path(p) for p in HEADINGS}


@pytest.mark.parametrize("max_tokens", [40, 64, 100])
def test_a_chunk_never_ends_with_a_heading(tok, max_tokens):
    # "# a comment" in the code fence is not a heading: a chunk may end there.
    for c in chunk_text(MARKDOWN, tok, max_tokens, 4)[:-1]:
        for pos, line in HEADINGS.items():
            assert not pos < c.end <= pos + len(line), c


def test_heading_path_only_for_markdown(tok):
    plain = "Just text. No headings at all, only sentences."
    assert chunk_text(plain, tok, 64)[0].metadata == {}
    assert chunk_text(plain, tok, 64, markdown=True)[0].metadata == {"heading_path": ""}
    assert chunk_text(MARKDOWN, tok, 64, markdown=False)[0].metadata == {}
    preamble = "Preamble text before any heading.\n\n# Title\n\nBody."
    assert [c.metadata["heading_path"] for c in chunk_text(preamble, tok, 16)][0] == ""


def test_deterministic(tok):
    assert chunk_text(MARKDOWN, tok, 32, 8) == chunk_text(MARKDOWN, tok, 32, 8)


def test_bare_hf_tokenizer_counts_content_tokens(tok):
    chunks = chunk_text(MARKDOWN, tok.tokenizer, 30, 5)
    for c in chunks:
        assert c.token_count == content_tokens(tok, c.text) <= 30
    # With the EmbedTokenizer the appended end-of-text counts too: one token less for the text.
    assert max(c.token_count for c in chunk_text(MARKDOWN, tok, 30, 5)) <= 30


def test_to_dict_is_what_the_store_takes(tok):
    c = chunk_text(MARKDOWN, tok, 64)[1]
    assert c.to_dict() == {"text": c.text, "metadata": c.metadata, "start": c.start, "end": c.end,
                           "token_count": c.token_count}


try:
    from hypothesis import given, settings, strategies as st
except ImportError:                      # only the property test needs it; the ones above still run
    st = None

if st is None:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_invariants():
        pass
else:
    ALPHABET = st.sampled_from(list("ab xyz.,!?\n\n#-`日😀é") + ["word", "## ", "\n# H\n", "```\n", ". ", "\t"])

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(pieces=st.lists(ALPHABET, min_size=1, max_size=120), max_tokens=st.integers(8, 40),
           overlap_fraction=st.floats(0, 0.99))
    def test_property_invariants(tok, pieces, max_tokens, overlap_fraction):
        doc = "".join(pieces)
        if not doc.strip():
            with pytest.raises(InvalidInput):
                chunk_text(doc, tok, max_tokens)
            return
        overlap = int(overlap_fraction * max_tokens)
        chunks = chunk_text(doc, tok, max_tokens, overlap)
        check_chunks(doc, chunks, tok, max_tokens)
        assert chunks == chunk_text(doc, tok, max_tokens, overlap)
