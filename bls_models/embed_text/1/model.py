"""embed_text: texts in, embeddings out. Tokenizes with the embed engine's conventions, then calls `embed`."""
import numpy as np
import triton_python_backend_utils as pb

from ragstack import access, bls, contracts
from ragstack import priority as prio
from ragstack import triton_adapter as ta
from ragstack.text import EmbedTokenizer

C = contracts.EMBED_TEXT


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.tokenizer = EmbedTokenizer(ta.resolve_engine_dir(params["engine_dir"]))

    def execute(self, requests):
        responses = [None] * len(requests)
        encoded = []  # (request index, ids, mask, lengths)
        levels = []
        for i, request in enumerate(requests):
            try:
                access.require_internal(request.parameters(), C.name)
                level = prio.for_request(request.parameters())   # urgent unless the caller lowers it
                texts = ta.input_strings(pb, request, C, "text")
                kinds = ta.input_strings(pb, request, C, "input_type", ["document"])
                tasks = ta.input_strings(pb, request, C, "task", [None])
                if len(set(kinds)) != 1 or len(set(tasks)) != 1:
                    raise ta.InvalidInput("embed_text: input_type and task must be the same for every row "
                                          "of one request")
                ids, mask, lengths = self.tokenizer.encode(texts, kinds[0], tasks[0])
                encoded.append((i, ids, mask, lengths))
                levels.append(level)
            except Exception as e:  # noqa: BLE001
                responses[i] = ta.error_response(pb, e)
        if not encoded:
            return responses
        length = max(ids.shape[1] for _, ids, _, _ in encoded)
        side = self.tokenizer.spec.padding_side
        ids = np.concatenate([ta.pad_to(x, length, side) for _, x, _, _ in encoded]).astype(np.int32)
        mask = np.concatenate([ta.pad_to(m, length, side) for _, _, m, _ in encoded]).astype(np.int32)
        try:
            # one engine call for the batch, at its most urgent request's level
            embeddings = bls.embed_tokens(pb, ids, mask, ta.Hop(prio.with_level({}, min(levels))))
        except Exception as e:  # noqa: BLE001 - the engine failed the whole batch
            for i, *_ in encoded:
                responses[i] = ta.error_response(pb, e)
            return responses
        start = 0
        for i, x, _, lengths in encoded:
            rows = embeddings[start:start + len(x)]
            start += len(x)
            outputs = {"embedding": rows, "num_tokens": np.asarray(lengths, dtype=np.int32).reshape(-1, 1)}
            responses[i] = pb.InferenceResponse(
                output_tensors=ta.output_tensors(pb, C, outputs, ta.requested_outputs(requests[i])))
        return responses
