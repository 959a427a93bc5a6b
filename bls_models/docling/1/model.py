"""docling: file bytes + file name or MIME type → the DoclingDocument as JSON and its Markdown.

Offline backends only (no model hub): DOCX, PPTX, XLSX, HTML, Markdown; PDF through NativePdfPipeline (the PDF's
own text with page numbers, a font-height heading rule; no layout, table-structure or OCR model). Bad input (empty,
unknown type, over 50 MB, encrypted or corrupt PDF) is INVALID_ARG; the stub stays up. See ragstack/pipeline/documents.py.
"""
import triton_python_backend_utils as pb

from ragstack.governance import access
from ragstack.contracts import tensors as contracts
from ragstack.pipeline import documents
from ragstack.triton import adapter as ta

C = contracts.DOCLING


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.converter = documents.Converter(parser_threads=int(params.get("parser_threads", "1")))
        ta.freeze_startup_heap()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._convert(request))
            except Exception as e:  # noqa: BLE001
                responses.append(ta.error_response(pb, e))
        return responses

    def _convert(self, request):
        access.require_internal(request.parameters(), C.name)    # ingest's child; clients convert through ingest
        data = ta.input_array(pb, request, C, "data").reshape(-1)
        if data.size != 1:
            raise ta.InvalidInput(f"input 'data' must hold exactly one file, got {data.size}")
        raw = data[0]
        raw = raw if isinstance(raw, bytes) else bytes(raw)
        name = ta.input_string(pb, request, C, "file_name", "") or ""
        mime = ta.input_string(pb, request, C, "mime_type", "") or ""
        fmt = documents.detect_format(name, mime)
        if fmt == "txt":
            fmt = "md"                    # plain text converts as Markdown without markup
        doc = self.converter.convert(raw, fmt, name or f"document.{fmt}")
        out = {"document": contracts.one_string(documents.to_json(doc)),
               "markdown": contracts.one_string(doc.export_to_markdown())}
        return pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, out, ta.requested_outputs(request)))
