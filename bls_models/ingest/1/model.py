"""ingest: documents (texts, or files converted by `docling`) in → token-aware, structure-aware chunks → `embed` engine → `vector_index`. Upsert or delete by doc id."""
import json

import numpy as np
import triton_python_backend_utils as pb

from ragstack import settings
from ragstack.governance import access
from ragstack.triton import bls
from ragstack.contracts import tensors as contracts
from ragstack.governance import priority as prio
from ragstack.triton import adapter as ta
from ragstack.triton.activity import ActivityBoard
from ragstack.governance.policy import RuntimePolicy
from ragstack.pipeline.chunking import chunk_text
from ragstack.pipeline.documents import from_json, structured_chunks
from ragstack.pipeline.ingest import ingest, parse_documents
from ragstack.tokenization.retrieval import EmbedTokenizer

C = contracts.INGEST
DEFAULT_OVERLAP = 32


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.tokenizer = EmbedTokenizer(ta.resolve_engine_dir(params["engine_dir"]))
        # chunk_text counts what encode() adds (special tokens, end-of-text), so a chunk always fits the engine.
        self.default_chunk_tokens = min(256, self.tokenizer.spec.max_length)
        self.policy = RuntimePolicy.load(settings.current().policy_file)
        self.activity = ActivityBoard()
        ta.freeze_startup_heap()

    def finalize(self):
        self.activity.close()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._ingest(request))
            except Exception as e:  # noqa: BLE001
                responses.append(ta.error_response(pb, e))
        return responses

    def _ingest(self, request):
        access.require_role(request.parameters(), "writer", "ingest")
        collection = ta.input_string(pb, request, C, "collection", "default")
        op = ta.input_string(pb, request, C, "op", "upsert")
        files = ta.input_array(pb, request, C, "files")
        docs = parse_documents(op, ta.input_strings(pb, request, C, "doc_ids"),
                               ta.input_strings(pb, request, C, "texts"),
                               ta.input_strings(pb, request, C, "metadata"),
                               None if files is None else list(files.reshape(-1)),
                               ta.input_strings(pb, request, C, "file_names"),
                               ta.input_strings(pb, request, C, "mime_types"))
        max_tokens = int(ta.input_scalar(pb, request, C, "chunk_tokens", self.default_chunk_tokens))
        if max_tokens > self.default_chunk_tokens:
            raise ta.InvalidInput(f"chunk_tokens must be at most {self.default_chunk_tokens} for this embedder")
        overlap = int(ta.input_scalar(pb, request, C, "overlap_tokens", min(DEFAULT_OVERLAP, max_tokens // 4)))

        # Background by default (runtime policy): every child is queued at that level, and each embed batch waits
        # first for urgent requests in flight to finish, at most background_max_yield_ms (ragstack/triton/activity.py).
        level = prio.for_request(request.parameters(), self.policy.ingest_priority)
        hop = ta.Hop.of(request, trace=False)     # as before: ingest's children are not traced
        hop.parameters = prio.with_level(hop.parameters, level)
        max_yield_s = self.policy.background_max_yield_ms / 1000.0 if level != prio.URGENT else 0.0
        yielded = [0.0, 0]                    # seconds waited, embed batches sent

        def engine_call(fn):
            # the CPU-heavy calls yield; index lookups and writes are short and only queue
            yielded[0] += self.activity.wait_quiet(max_yield_s)
            yielded[1] += 1
            return prio.retry_when_queue_full(fn)

        def embed(texts):
            ids, mask, _ = self.tokenizer.encode(texts, "document")
            # one call per engine batch, so that each batch yields on its own
            return np.concatenate([engine_call(lambda s=s: bls.embed_tokens(pb, ids[s:s + bls.EMBED_BATCH],
                                                                            mask[s:s + bls.EMBED_BATCH], hop))
                                   for s in range(0, len(ids), bls.EMBED_BATCH)])

        def index(op, payload, vectors):
            return prio.retry_when_queue_full(lambda: bls.index_op(pb, op, collection, hop, vectors=vectors,
                                                                   payload=payload))

        def chunk_file(doc):
            # Docling runs in its own model (BLS): its import and memory stay out of this stub.
            converted = bls.convert_document(pb, doc.file, doc.file_name, doc.mime_type, hop)
            return structured_chunks(from_json(converted), self.tokenizer, max_tokens, overlap)

        settings = {"chunk_tokens": max_tokens, "overlap_tokens": overlap, "embedder": self.tokenizer.spec.name,
                    "dim": self.tokenizer.spec.dim}
        report = ingest(op, collection, docs, embed=embed, index=index, settings=settings,
                        chunk=lambda text: chunk_text(text, self.tokenizer, max_tokens, overlap),
                        chunk_file=chunk_file, embed_phase=lambda: bls.phase(pb, "embed"),
                        progress=lambda msg: pb.Logger.log_info(f"ingest[{collection}] {msg}"))
        report["priority"] = prio.name(level)
        report["yielded_s"] = round(yielded[0], 3)
        report["embed_calls"] = yielded[1]
        out = {"report": contracts.one_string(json.dumps(report))}
        return pb.InferenceResponse(output_tensors=ta.output_tensors(pb, C, out))
