"""A plain, one-token-at-a-time guided greedy decoder: what the in-flight batcher must reproduce exactly."""
import numpy as np
import torch
import xgrammar
from transformers import DynamicCache

from ragstack.engines.generation.guided import Utf8Guard


def reference_guided_greedy(engine, input_ids, guide_type, guide, max_new_tokens):
    """Guided greedy decoding the plain way, one request, one token at a time: KV-cached forward at batch 1,
    then xgrammar's mask for the tokens so far (with the engine's UTF-8 guard), then argmax. Returns
    (token ids, finish reason) by the engine's rules: an end id or a stop token ends it, as does a grammar that
    allows nothing but one (checked after each accepted token), or max_new_tokens."""
    end_id = engine.spec.end_id
    vocab = engine.vocab_size
    matcher = xgrammar.GrammarMatcher(engine.guides.compile(guide_type, guide), override_stop_tokens=[end_id])
    stops = set(matcher.stop_token_ids)
    utf8 = engine.guides.utf8
    tail, tokens = b"", []
    cache = DynamicCache(config=engine.model.config)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([list(input_ids)]), past_key_values=cache,
                              use_cache=True).logits[0, -1].float()
        while True:
            bitmask = xgrammar.allocate_token_bitmask(1, vocab)
            matcher.fill_next_token_bitmask(bitmask)
            bitmask &= utf8.mask(tail)
            allowed = np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab])
            if tokens and set(allowed.tolist()) <= stops:
                return tokens, "grammar_terminated"
            masked = torch.full_like(logits, float("-inf"))
            masked[torch.from_numpy(allowed)] = logits[torch.from_numpy(allowed)]
            token = int(torch.argmax(masked))
            if token == end_id:
                return tokens, "end_id"
            assert matcher.accept_token(token)
            if matcher.is_terminated():
                return tokens, "grammar_terminated"
            tail = Utf8Guard.tail(tail + utf8.token_bytes(token))
            tokens.append(token)
            if len(tokens) >= max_new_tokens:
                return tokens, "length"
            logits = engine.model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                                  use_cache=True).logits[0, -1].float()
