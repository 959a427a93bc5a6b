"""Documents that are not plain text: Docling conversion (served by the ``docling`` model) and structure-aware
chunking (in ``ingest``).

Conversion (:func:`convert`): bytes + a file name or MIME type → a ``DoclingDocument``. Only Docling's offline
paths run here (no model hub): DOCX, PPTX, XLSX, HTML and Markdown through their declarative backends, PDF through
``NativePdfPipeline`` (the text the PDF encodes, one item per line with its page number and box; no layout model,
no OCR, no table-structure model). Over that PDF text a cheap heading rule runs: a short line whose font is clearly
taller than the page's body text becomes a section header. Everything a caller can get wrong is refused as
InvalidInput before or during conversion: an empty file, an unknown type, a file over :data:`MAX_FILE_BYTES`, a PDF
that is encrypted or does not parse.

Chunking (:func:`structured_chunks`): the document's items are walked in order; headings build the heading path,
consecutive paragraphs under one heading form a block that is cut token-aware (:func:`ragstack.pipeline.chunking.chunk_text`),
and each table is one chunk of its own, as a Markdown pipe table (split by rows, header repeated, only when it does
not fit the embedder). Each chunk carries ``heading_path``, ``pages`` (the pages its items come from, where the
format has pages: PDF, PPTX slides, XLSX sheets) and ``page`` (the first of them), so a citation can point to a page.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import io
import json
import os
import re
import sys
import threading
from bisect import bisect_left, bisect_right
from pathlib import PurePath

from ragstack.pipeline.chunking import Chunk, chunk_text
from ragstack.contracts.errors import InvalidInput

MAX_FILE_BYTES = 50 * 1024 * 1024

# format -> (file suffixes, MIME types)
FORMATS = {
    "pdf": ((".pdf",), ("application/pdf",)),
    "docx": ((".docx",), ("application/vnd.openxmlformats-officedocument.wordprocessingml.document",)),
    "pptx": ((".pptx",), ("application/vnd.openxmlformats-officedocument.presentationml.presentation",)),
    "xlsx": ((".xlsx",), ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",)),
    "html": ((".html", ".htm", ".xhtml"), ("text/html", "application/xhtml+xml")),
    "md": ((".md", ".markdown"), ("text/markdown", "text/x-markdown")),
    "txt": ((".txt", ".text"), ("text/plain",)),
}
TEXT_FORMATS = ("txt", "md")        # ingest keeps its plain-text path for these
_SUFFIX = {s: f for f, (suffixes, _) in FORMATS.items() for s in suffixes}
_MIME = {m: f for f, (_, mimes) in FORMATS.items() for m in mimes}


def detect_format(file_name: str | None = None, mime_type: str | None = None) -> str:
    """The format of a file from its MIME type (preferred) or its name's suffix; InvalidInput if unknown."""
    if mime_type:
        fmt = _MIME.get(mime_type.split(";")[0].strip().lower())
        if fmt:
            return fmt
    if file_name:
        fmt = _SUFFIX.get(PurePath(file_name).suffix.lower())
        if fmt:
            return fmt
    known = ", ".join(sorted(_SUFFIX))
    raise InvalidInput(f"unknown document type (file name {file_name!r}, MIME type {mime_type!r}); "
                       f"supported: {known}")


def check_file(data: bytes, fmt: str, name: str = "file") -> None:
    """Cheap checks before any parsing: size, emptiness, the container's magic bytes, PDF encryption."""
    if not data or not bytes(data[:4096]).strip():
        raise InvalidInput(f"{name} is empty")
    if len(data) > MAX_FILE_BYTES:
        raise InvalidInput(f"{name} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    if fmt == "pdf":
        if not bytes(data[:1024]).lstrip().startswith(b"%PDF-"):
            raise InvalidInput(f"{name} is not a PDF (no %PDF- header): corrupt or mislabelled")
        if re.search(rb"/Encrypt\s*[0-9<]", data):
            raise InvalidInput(f"{name} is an encrypted PDF; decrypt it before ingesting")
    elif fmt in ("docx", "pptx", "xlsx") and bytes(data[:4]) != b"PK\x03\x04":
        raise InvalidInput(f"{name} is not a {fmt.upper()} file (not a ZIP container): corrupt or mislabelled")


class _Hidden(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` fail as if the package were not installed (see :func:`_without`)."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden while Docling is imported)",
                                      name=fullname)
        return None


@contextlib.contextmanager
def _without(*names):
    """While Docling's modules are imported, torch and transformers look absent (unless already imported).

    Docling treats both as optional (its slim installs have neither): ``pipeline_options_vlm_model`` falls back to
    a placeholder when ``from transformers import StoppingCriteria`` fails, and the ASR model specs when ``import
    torch`` does. They are installed in this environment for the engines, so without this the docling stub would
    load both (~300 MiB) for pipelines it never runs."""
    finder = _Hidden(n for n in names if n not in sys.modules)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class Converter:
    """Docling's conversion without ``DocumentConverter``: each format's backend and pipeline, run directly.

    ``docling.document_converter`` imports every pipeline Docling has, among them the ASR pipeline, which imports
    torch unconditionally (~450 MiB and ~2 s in a stub that never runs a model). What ``DocumentConverter.convert``
    does for one stream is: build an ``InputDocument`` with the format's backend (and its options), refuse it when
    it is not valid, and run the format's pipeline. The same is done here with the same classes and options as
    ``WordFormatOption`` and friends (``SimplePipeline`` over the declarative backends) and ``NativePdfFormatOption``
    (``NativePdfPipeline`` over the threaded docling-parse backend), for the pinned ``docling-slim``;
    tests/unit/test_documents.py checks that the result equals ``DocumentConverter``'s, format by format.
    """

    # Each format's backend, imported at that format's first conversion: the five modules (and openpyxl,
    # python-pptx, python-docx, marko, docling-parse behind them) cost ~0.25 s and ~30 MiB that a stub converting
    # only some formats never needs, and the model loads in less than a second.
    BACKENDS = {
        "pdf": ("docling.backend.docling_parse_backend", "ThreadedDoclingParseDocumentBackend"),
        "docx": ("docling.backend.msword_backend", "MsWordDocumentBackend"),
        "pptx": ("docling.backend.mspowerpoint_backend", "MsPowerpointDocumentBackend"),
        "xlsx": ("docling.backend.msexcel_backend", "MsExcelDocumentBackend"),
        "html": ("docling.backend.html_backend", "HTMLDocumentBackend"),
        "md": ("docling.backend.md_backend", "MarkdownDocumentBackend"),
    }

    def __init__(self, parser_threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")     # a hub lookup must fail at once, not hang
        with _without("torch", "transformers"):
            from docling.datamodel.backend_options import ThreadedDoclingParseBackendOptions
            from docling.datamodel.base_models import ConversionStatus, InputFormat
            from docling.datamodel.document import InputDocument
            from docling.datamodel.pipeline_options import ConvertPipelineOptions, NativePdfPipelineOptions
            from docling.pipeline.native_pdf_pipeline import NativePdfPipeline
            from docling.pipeline.simple_pipeline import SimplePipeline
            from docling_core.types.doc.page import TextCellUnit

        self._input_document = InputDocument
        self._converted = (ConversionStatus.SUCCESS, ConversionStatus.PARTIAL_SUCCESS)
        pdf_options = NativePdfPipelineOptions(parser_threads=parser_threads, generate_page_images=False)
        # What NativePdfFormatOption derives once from the pipeline options for its docling-parse backend.
        pdf_backend_options = ThreadedDoclingParseBackendOptions(
            parser_threads=pdf_options.parser_threads, include_bitmap_images=pdf_options.generate_picture_images,
            render_pages=pdf_options.generate_page_images, render_scale=pdf_options.images_scale)
        pdf_backend_options._materialize_char_cells = pdf_options.text_cell_unit == TextCellUnit.CHAR
        declarative = SimplePipeline(pipeline_options=ConvertPipelineOptions())
        # format -> (Docling's InputFormat, its backend's options, pipeline); the backend class: _backend(fmt)
        self._formats = {
            "pdf": (InputFormat.PDF, pdf_backend_options, NativePdfPipeline(pipeline_options=pdf_options)),
            "docx": (InputFormat.DOCX, None, declarative),
            "pptx": (InputFormat.PPTX, None, declarative),
            "xlsx": (InputFormat.XLSX, None, declarative),
            "html": (InputFormat.HTML, None, declarative),
            "md": (InputFormat.MD, None, declarative),
        }
        self._backends: dict = {}
        self._lock = threading.Lock()

    def _backend(self, fmt: str):
        """The format's backend class (imported the first time; the caller holds the lock)."""
        backend = self._backends.get(fmt)
        if backend is None:
            import importlib

            module, name = self.BACKENDS[fmt]
            with _without("torch", "transformers"):
                backend = self._backends[fmt] = getattr(importlib.import_module(module), name)
        return backend

    def convert(self, data: bytes, fmt: str, file_name: str = "document"):
        """bytes → DoclingDocument; InvalidInput when the file is refused or does not convert."""
        if fmt not in self._formats:
            raise InvalidInput(f"format {fmt!r} is not converted by Docling here")
        check_file(data, fmt, repr(file_name))
        stem = PurePath(file_name).stem or "document"
        suffix = FORMATS[fmt][0][0]
        input_format, backend_options, pipeline = self._formats[fmt]
        with self._lock:
            backend = self._backend(fmt)       # outside the try: a backend that cannot be imported is no bad input
        try:
            with self._lock:
                source = self._input_document(path_or_stream=io.BytesIO(bytes(data)), format=input_format,
                                              backend=backend, backend_options=backend_options,
                                              filename=f"{stem}{suffix}")
                if not source.valid:
                    raise InvalidInput(f"{file_name!r} could not be converted as {fmt.upper()}: "
                                       f"Docling's {backend.__name__} does not accept it")
                result = pipeline.execute(source, raises_on_error=False)
        except InvalidInput:
            raise
        except Exception as e:  # noqa: BLE001 - every backend raises its own kind for a broken file
            raise InvalidInput(f"{file_name!r} could not be converted as {fmt.upper()}: "
                               f"{type(e).__name__}: {str(e)[:300]}") from None
        if result.status not in self._converted:
            errors = "; ".join(e.error_message for e in result.errors)[:300] or result.status.value
            raise InvalidInput(f"{file_name!r} could not be converted as {fmt.upper()}: {errors}")
        doc = result.document
        if fmt == "pdf":
            doc = pdf_headings(doc)
        if not any(getattr(item, "text", None) or item.label.value == "table"
                   for item, _ in doc.iterate_items()):
            raise InvalidInput(f"{file_name!r} has no text (a scanned PDF needs OCR, which this server does not run)")
        return doc


def pdf_headings(doc):
    """The PDF's lines again, in a new document where headings are marked by font height: a short line
    (<= 12 words, no final period) whose box is at least 1.3x the median line height. Levels follow the distinct
    heights, tallest first (at most three). Provenance (page, box, characters) is kept."""
    from docling_core.types.doc import DocItemLabel, DoclingDocument

    items = [item for item, _ in doc.iterate_items() if getattr(item, "prov", None) and getattr(item, "text", "")]
    height = {id(item): abs(item.prov[0].bbox.t - item.prov[0].bbox.b) for item in items}
    ordered = sorted(height.values())
    if len(ordered) < 3 or ordered[len(ordered) // 2] <= 0:
        return doc
    median = ordered[len(ordered) // 2]

    def is_heading(item) -> bool:
        return (height[id(item)] >= 1.3 * median and len(item.text.split()) <= 12
                and not item.text.rstrip().endswith((".", ",", ";", ":")))

    levels = sorted({round(height[id(i)]) for i in items if is_heading(i)}, reverse=True)[:3]
    out = DoclingDocument(name=doc.name, origin=doc.origin)
    out.pages = doc.pages
    for item in items:
        if is_heading(item):
            h = round(height[id(item)])
            level = levels.index(h) + 1 if h in levels else len(levels)
            out.add_heading(item.text, level=level, prov=item.prov[0])
        else:
            out.add_text(DocItemLabel.TEXT, item.text, prov=item.prov[0])
    return out


def to_json(doc) -> str:
    return json.dumps(doc.export_to_dict(), ensure_ascii=False)


def from_json(text: str):
    from docling_core.types.doc import DoclingDocument

    try:
        return DoclingDocument.model_validate_json(text)
    except Exception as e:  # noqa: BLE001
        raise InvalidInput(f"not a DoclingDocument JSON: {str(e)[:300]}") from None


# ------------------------------------------------------------------------------------------------ chunking
def _pages(item) -> list:
    return sorted({p.page_no for p in (getattr(item, "prov", None) or [])})


def blocks(doc) -> list[dict]:
    """The document as blocks in reading order: ``{"kind": "text"|"table", "heading_path", "parts"}``, each part
    ``(text, pages)``. A text block gathers the paragraphs under one heading; a table is a block of its own."""
    from docling_core.types.doc import DocItemLabel, TableItem

    out: list[dict] = []
    stack: list[tuple[int, str]] = []

    def path() -> str:
        return " > ".join(f"{'#' * level} {title}" for level, title in stack)

    for item, _ in doc.iterate_items():
        label = item.label
        if isinstance(item, TableItem):
            md = item.export_to_markdown(doc).strip()
            if md:
                caption = item.caption_text(doc).strip() if hasattr(item, "caption_text") else ""
                out.append({"kind": "table", "heading_path": path(),
                            "parts": [((caption + "\n\n" if caption else "") + md, _pages(item))]})
            continue
        text = (getattr(item, "text", "") or "").strip()
        if not text:
            continue
        if label in (DocItemLabel.TITLE, DocItemLabel.SECTION_HEADER):
            level = 1 if label == DocItemLabel.TITLE else int(getattr(item, "level", 1) or 1) + 1
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
            out.append({"kind": "text", "heading_path": path(), "parts": []})
            continue
        if label in (DocItemLabel.PAGE_HEADER, DocItemLabel.PAGE_FOOTER):
            continue
        if label == DocItemLabel.LIST_ITEM:
            text = f"- {text}"
        if not out or out[-1]["kind"] != "text" or out[-1]["heading_path"] != path():
            out.append({"kind": "text", "heading_path": path(), "parts": []})
        out[-1]["parts"].append((text, _pages(item)))
    return [b for b in out if b["parts"]]


def structured_chunks(doc, tokenizer, max_tokens: int, overlap_tokens: int = 0) -> list[Chunk]:
    """Chunks that follow the document's structure (see the module note). ``start``/``end`` index the text of
    the blocks joined by blank lines (the chunk's own text is a substring of it, except for a table split
    by rows, whose header row is repeated)."""
    count = (lambda s: tokenizer.count_tokens(s, "document")) if hasattr(tokenizer, "count_tokens") else \
        (lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"]))
    chunks: list[Chunk] = []
    offset = 0
    for block in blocks(doc):
        sep = "\n" if block["kind"] == "text" else ""
        body, starts, page_lists = "", [], []
        for text, pages in block["parts"]:
            if body:
                body += sep
            starts.append(len(body))
            page_lists.append(pages)
            body += text
        base = {"heading_path": block["heading_path"], "kind": block["kind"]}
        if block["kind"] == "table" and count(body) <= max_tokens:
            pieces = [(0, len(body), body, count(body))]
        elif block["kind"] == "table":
            pieces = _split_table(body, count, max_tokens)
        else:
            pieces = [(c.start, c.end, c.text, c.token_count)
                      for c in chunk_text(body, tokenizer, max_tokens, overlap_tokens, markdown=False)]
        for start, end, text, n_tokens in pieces:
            lo = max(bisect_right(starts, start) - 1, 0)
            hi = max(bisect_left(starts, end), lo + 1)
            pages = sorted({p for pl in page_lists[lo:hi] for p in pl})
            meta = dict(base)
            if pages:
                meta["pages"] = pages
                meta["page"] = pages[0]
            chunks.append(Chunk(len(chunks), text, offset + start, offset + end, n_tokens, meta))
        offset += len(body) + 2
    if not chunks:
        raise InvalidInput("document has no text to index")
    return chunks


def _split_table(md: str, count, max_tokens: int) -> list[tuple]:
    """A Markdown table too big for one chunk: runs of rows, each with the header (and its rule) repeated."""
    lines = md.split("\n")
    head_n = next((i + 1 for i, line in enumerate(lines) if re.fullmatch(r"\|?[\s:|-]+\|?", line) and "-" in line), 0)
    head, rows = lines[:head_n], lines[head_n:]
    pieces, cur, pos = [], [], sum(len(x) + 1 for x in head)
    start = pos
    for row in rows:
        trial = "\n".join(head + cur + [row])
        if cur and count(trial) > max_tokens:
            text = "\n".join(head + cur)
            pieces.append((start, pos - 1, text, count(text)))
            start, cur = pos, []
        cur.append(row[: 4 * max_tokens] if not cur and count("\n".join(head + [row])) > max_tokens else row)
        pos += len(row) + 1
    if cur:
        text = "\n".join(head + cur)
        pieces.append((start, pos - 1, text, count(text)))
    return pieces
