"""embed_text: texts in, embeddings out. Tokenizes with the embed engine's conventions, then calls `embed`."""
import numpy as np
import triton_python_backend_utils as pb

from ragstack.triton import bls
from ragstack.contracts import tensors as contracts
from ragstack.governance import priority as prio
from ragstack.triton import adapter as ta
from ragstack.tokenization.retrieval import EmbedTokenizer

C = contracts.EMBED_TEXT


class TritonPythonModel:
    def initialize(self, args):
        ta.exit_with_server()
        params = ta.model_parameters(args)
        self.tokenizer = EmbedTokenizer(ta.resolve_engine_dir(params["engine_dir"]))
        ta.freeze_startup_heap()

    def execute(self, requests):
        levels = []

        def read(pb, request, contract):
            level = prio.for_request(request.parameters())   # urgent unless the caller lowers it
            texts = ta.input_strings(pb, request, contract, "text")
            kinds = ta.input_strings(pb, request, contract, "input_type", ["document"])
            tasks = ta.input_strings(pb, request, contract, "task", [None])
            if len(set(kinds)) != 1 or len(set(tasks)) != 1:
                raise ta.InvalidInput("embed_text: input_type and task must be the same for every row of one request")
            ids, mask, lengths = self.tokenizer.encode(texts, kinds[0], tasks[0])
            levels.append(level)
            return ids, mask, lengths

        def embed(ids, mask):
            # one engine call for the batch, at its most urgent request's level
            return bls.embed_tokens(pb, ids, mask, ta.Hop(prio.with_level({}, min(levels))))

        def outputs(rows, lengths):
            return {"embedding": rows, "num_tokens": np.asarray(lengths, dtype=np.int32).reshape(-1, 1)}
        # an engine failure fails the whole batch: the tokenizer's ids are valid, so it is the engine's (UNAVAILABLE)
        return ta.execute_token_batch(pb, requests, C, embed, self.tokenizer.spec.padding_side, read=read,
                                      outputs=outputs, isolate=False)
